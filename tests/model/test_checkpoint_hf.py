"""HF import variants (value head / score head / no head, sharded with index, transformers-5 names) and export
round trip through stock transformers."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.model.hf_reference import hf_scores, pack, write_tiny_checkpoint
from vlr_runtime.checkpoint.hf import export_hf_checkpoint, load_hf_checkpoint
from vlr_runtime.model import ModelArgs, build_reward_model


def _load(d, ctx, **kw):
    model = build_reward_model(ModelArgs.from_hf_config(d), device=ctx.device, seed=None)
    return model, load_hf_checkpoint(model, d, **kw)


def _rel(a, b):
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-3)).max())


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 60_000], ids=["single_file", "sharded"])
def test_export_loads_in_stock_transformers_with_same_scores(tp1, tiny_ckpt, inputs, tmp_path, max_shard_bytes):
    from transformers import Qwen2_5_VLForConditionalGeneration

    d, hf, _, _ = tiny_ckpt
    (d / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136}))
    model, _ = _load(d, tp1)
    out = export_hf_checkpoint(model, model.args, tmp_path / "export", source_dir=d, max_shard_bytes=max_shard_bytes)
    assert (out / "preprocessor_config.json").is_file() and (out / "value_head.safetensors").is_file()
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    if max_shard_bytes < 2**20:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    else:
        assert shards == ["model.safetensors"]
    exported, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    head = load_file(str(out / "value_head.safetensors"))
    samples, pixels, grids = inputs
    ref = hf_scores(exported.eval(), samples, pixels, grids, head["v_head.summary.weight"].view(-1),
                    head["v_head.summary.bias"])
    assert _rel(model.rewards(pack(hf, samples, pixels, grids)), ref) <= 1e-4
    again, _ = _load(out, tp1)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


def test_score_head_variant(tp1, tmp_path, inputs):
    hf, w, b = write_tiny_checkpoint(tmp_path, seed=3, head="score")
    model, info = _load(tmp_path, tp1)
    assert info["head"] == "score"
    samples, pixels, grids = inputs
    assert _rel(model.rewards(pack(hf, samples, pixels, grids)), hf_scores(hf, samples, pixels, grids, w, b)) <= 1e-4


def test_sharded_index_and_transformers5_names_match_single_file(tp1, tiny_ckpt, tmp_path):
    d = tiny_ckpt[0]
    reference, _ = _load(d, tp1)
    tensors = load_file(str(d / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.")
               else k.replace("visual.", "model.visual.", 1): v for k, v in tensors.items()}
    names = sorted(renamed)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: renamed[k] for k in shard}, str(tmp_path / fname))
        weight_map.update({k: fname for k in shard})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for f in ("config.json", "value_head.safetensors"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    model, info = _load(tmp_path, tp1)
    assert len(info["files"]) == 2
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_missing_head_is_initialised_and_logged(tp1, tiny_ckpt, tmp_path, caplog):
    d = tiny_ckpt[0]
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    with caplog.at_level(logging.WARNING):
        model, info = _load(tmp_path, tp1, head_seed=5)
    assert info["head"] == "initialised"
    assert "freshly initialised" in caplog.text
    head = model.head.weight.detach()
    assert torch.isfinite(head).all() and float(head.abs().sum()) > 0


def test_bad_directories_raise_clearly(tp1, tiny_ckpt, tmp_path):
    d = tiny_ckpt[0]
    (tmp_path / "config.json").write_bytes((d / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    model = build_reward_model(ModelArgs.from_hf_config(d), device=tp1.device, seed=None)
    with pytest.raises(ValueError, match="pickle"):
        load_hf_checkpoint(model, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    down = "model.layers.0.mlp.down_proj.weight"
    save_file({**tensors, down: tensors[down].t().contiguous()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=down):  # same number of elements, wrong layout
        load_hf_checkpoint(model, tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf_checkpoint(model, tmp_path)
    other = json.loads((d / "config.json").read_text())
    other["text_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different model"):
        load_hf_checkpoint(model, tmp_path)
