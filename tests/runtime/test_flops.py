"""The analytic FLOP counts against torch's FlopCounterMode on stock transformers modules (an independent count)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vlr_runtime.flops import batch_step_flops, llm_forward_flops, mfu, training_step_flops, vision_forward_flops


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


def _brute_force_keys(length: int, prefix: int, split: int) -> int:
    """Allowed (query, key) pairs of one shared-prompt segment, enumerated: causal, except that a rejected token
    (index >= split) never sees a chosen token (prefix <= index < split)."""
    return sum(1 for i in range(length) for j in range(i + 1) if not (i >= split and prefix <= j < split))


@pytest.mark.parametrize("length, prefix, split", [(30, 11, 19), (30, 0, 12), (25, 7, 25), (9, 4, 4), (1, 0, 1)])
def test_shared_prompt_attention_keys(length, prefix, split):
    cfg = _tiny_config().to_dict()
    t = cfg["text_config"]
    per_key = 4 * t["num_attention_heads"] * (t["hidden_size"] // t["num_attention_heads"]) * t["num_hidden_layers"]
    shared = llm_forward_flops(cfg, [length], prefix_lens=[prefix], split_lens=[split])
    linear = llm_forward_flops(cfg, [length]) - per_key * length * (length + 1) / 2
    assert shared - linear == pytest.approx(per_key * _brute_force_keys(length, prefix, split), rel=1e-12)
    # the same pair as two causal sequences [prompt | chosen], [prompt | rejected] costs one prompt more
    rejected = length - split
    dup = llm_forward_flops(cfg, [split, prefix + rejected])
    dup_linear_extra = llm_forward_flops(cfg, [prefix]) - per_key * prefix * (prefix + 1) / 2
    assert dup - shared == pytest.approx(dup_linear_extra + per_key * prefix * (prefix + 1) / 2, rel=1e-12)


def test_shared_prompt_flops_reject_bad_layouts():
    cfg = _tiny_config().to_dict()
    with pytest.raises(ValueError, match="go together"):
        llm_forward_flops(cfg, [10], prefix_lens=[3])
    with pytest.raises(ValueError, match="prefix <= split <= length"):
        llm_forward_flops(cfg, [10], prefix_lens=[5], split_lens=[4])
    with pytest.raises(ValueError, match="2 segments"):
        llm_forward_flops(cfg, [10, 8], prefix_lens=[3], split_lens=[5])
    with pytest.raises(ValueError, match="causal"):
        llm_forward_flops(cfg, [10], causal_seq_lens=False, prefix_lens=[3], split_lens=[5])


def test_batch_step_flops_reads_the_packed_layout():
    """A shared-prompt batch with one image and a plain text-only one: segments, prefix/split, grids and scored
    tokens are taken from the batch fields."""
    from types import SimpleNamespace

    cfg = _tiny_config().to_dict()
    shared = SimpleNamespace(cu_seqlens=torch.tensor([0, 30, 50], dtype=torch.int32),
                             prefix_lens=torch.tensor([11, 0], dtype=torch.int32),
                             split_lens=torch.tensor([19, 20], dtype=torch.int32),
                             image_grid_thw=torch.tensor([[1, 8, 8]]), scored_index=torch.tensor([18, 29, 49]))
    assert batch_step_flops(cfg, shared, merger_trained=False) == training_step_flops(
        cfg, [30, 20], [[1, 8, 8]], merger_trained=False, num_scored=3, prefix_lens=[11, 0], split_lens=[19, 20])
    plain = SimpleNamespace(cu_seqlens=torch.tensor([0, 7, 12], dtype=torch.int32), prefix_lens=None,
                            split_lens=None, image_grid_thw=None, scored_index=torch.tensor([6, 11]))
    assert batch_step_flops(cfg, plain, vision_trained=True) == training_step_flops(
        cfg, [7, 5], [], vision_trained=True, num_scored=2)
