"""The analytic FLOP counts against torch's FlopCounterMode on stock transformers modules (an independent count)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vlr_runtime.flops import llm_forward_flops, mfu, training_step_flops, vision_forward_flops


def _tiny_config():
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
    )


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = _tiny_config()
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return cfg, Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _count(fn):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fn()
    return counter.get_total_flops()


def test_vision_flops_match_flop_counter(hf_model):
    cfg, model = hf_model
    # grids chosen so windows are ragged at the image edges (10 and 6 merged units are not multiples of 4)
    grids = [[1, 20, 12], [1, 8, 16]]
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, 3 * 2 * 14 * 14)
    measured = _count(lambda: model.model.visual(pixels, grid_thw=torch.tensor(grids)))
    tower, merger = vision_forward_flops(cfg.to_dict(), grids)
    assert tower + merger == pytest.approx(measured, rel=1e-9)


def test_llm_flops_match_flop_counter(hf_model):
    cfg, model = hf_model
    seq = 37
    embeds = torch.randn(1, seq, 64)
    lm = model.model.language_model
    measured = _count(lambda: lm(inputs_embeds=embeds))
    # eager attention multiplies the full s x s score matrix, so compare against the non-causal count
    assert llm_forward_flops(cfg.to_dict(), [seq], causal_seq_lens=False) == pytest.approx(measured, rel=1e-9)
    assert llm_forward_flops(cfg.to_dict(), [seq]) < measured


def test_training_step_flops_and_mfu():
    cfg = _tiny_config().to_dict()
    frozen = training_step_flops(cfg, [10, 12], [[1, 8, 8]], vision_trained=False)
    trained = training_step_flops(cfg, [10, 12], [[1, 8, 8]], vision_trained=True)
    assert trained.vision == pytest.approx(3 * frozen.vision)
    assert trained.llm == frozen.llm > 0
    assert mfu(1e12, 0.5, 1e12, num_devices=2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)
