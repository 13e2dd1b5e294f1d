"""ModelArgs from both config.json layouts, and real-size models built on the meta device (no allocation) whose
parameter count equals the HF checkpoint's tensors without lm_head, plus the head's H+1."""

import copy

import pytest
import torch

from vlr_runtime.model import ModelArgs, build_reward_model

# Qwen2.5-VL-7B-Instruct config.json as released (transformers 4.x layout: text fields at the top level).
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def _variant(**text):
    cfg = copy.deepcopy(QWEN25_VL_7B)
    cfg.update(text)
    cfg["vision_config"]["out_hidden_size"] = cfg["hidden_size"]
    return cfg


SIZES = {
    "7b": QWEN25_VL_7B,
    "3b": _variant(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "72b": _variant(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                    num_key_value_heads=8),
}


def hf_param_count_without_lm_head(cfg: dict) -> int:
    """Independent count: stock transformers' module shapes, instantiated on the meta device."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(cfg)))
    return sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith("lm_head"))


def test_7b_fields_from_released_config():
    a = ModelArgs.from_hf_config(QWEN25_VL_7B)
    t, v = a.text, a.vision
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size, t.vocab_size) == \
        (3584, 28, 28, 4, 18944, 152064)
    assert (v.depth, v.hidden_size, v.num_heads, v.fullatt_block_indexes, v.in_channels) == \
        (32, 1280, 16, [7, 15, 23, 31], 3)
    assert (t.mrope_section, t.rope_theta, t.rms_norm_eps) == ([16, 24, 24], 1e6, 1e-6)


@pytest.mark.parametrize("size", ["7b", "3b", "72b"])
def test_meta_build_parameter_count(tp1, size):
    cfg = SIZES[size]
    args = ModelArgs.from_hf_config(cfg)
    model = build_reward_model(args, dtype=torch.bfloat16, device="meta")
    assert all(p.is_meta for p in model.parameters())
    ours = sum(p.numel() for p in model.parameters())
    assert ours == hf_param_count_without_lm_head(cfg) + args.hidden_size + 1
    if size == "7b":
        # The released 7B checkpoint holds 8,292,166,656 parameters, lm_head 152064 x 3584 of them.
        assert ours == 8_292_166_656 - 152064 * 3584 + 3584 + 1


def test_transformers5_layout_round_trips_through_to_hf_config():
    a = ModelArgs.from_hf_config(QWEN25_VL_7B)
    cfg = a.to_hf_config()
    assert "text_config" in cfg and "hidden_size" not in cfg
    b = ModelArgs.from_hf_config(cfg)
    assert (b.text, b.vision) == (a.text, a.vision)
    assert b.image_token_id == 151655


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update(model_type="llava"), "Qwen2.5-VL"),
    (lambda c: c.pop("vision_config"), "vision_config"),
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c.update(num_key_value_heads=5), "num_kv_heads"),
    (lambda c: c["rope_scaling"].update(mrope_section=[16, 24, 23]), "mrope_section"),
    (lambda c: c["vision_config"].update(fullatt_block_indexes=[40]), "fullatt"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
])
def test_bad_configs_raise(mutate, match):
    cfg = copy.deepcopy(QWEN25_VL_7B)
    mutate(cfg)
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_hf_config(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ModelArgs.from_hf_config(tmp_path)


def test_vision_parallel_choice_is_checked(tp1):
    with pytest.raises(ValueError, match="vision_parallel"):
        build_reward_model(ModelArgs.tiny(), vision_parallel="pipeline")


@pytest.mark.parametrize("patches, ranks, expected", [
    ([60, 180], 2, [0, 1]),
    ([100, 100, 100, 100], 2, [0, 0, 1, 1]),
    ([1000, 4, 4, 4], 2, [0, 1, 1, 1]),
    ([16], 4, [2]),
    ([4, 4], 8, [2, 6]),
])
def test_image_owners_contiguous_and_balanced(patches, ranks, expected):
    from vlr_runtime.model.vision import image_owners

    assert image_owners(torch.tensor(patches), ranks).tolist() == expected
