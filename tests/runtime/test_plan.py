"""Planner: parameter counts against stock transformers on the meta device; memory terms move the right way."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vlr_runtime.plan import Workload, candidates, estimate, main, parameter_counts

QWEN25_VL_7B = {
    "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "in_channels": 3},
}


def _hf_counts(cfg_dict):
    cfg = Qwen2_5_VLConfig(text_config=cfg_dict["text_config"], vision_config=cfg_dict["vision_config"])
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    groups = {"vision": 0, "merger": 0, "llm": 0}
    for name, p in model.named_parameters():
        if name.startswith("lm_head"):
            continue
        if ".visual.merger." in f".{name}":
            groups["merger"] += p.numel()
        elif ".visual." in f".{name}":
            groups["vision"] += p.numel()
        else:
            groups["llm"] += p.numel()
    return groups


@pytest.mark.parametrize("cfg", [QWEN25_VL_7B], ids=["7b"])
def test_parameter_counts_match_transformers(cfg):
    ours = parameter_counts(cfg)
    hf = _hf_counts(cfg)
    assert {k: ours[k] for k in hf} == hf
    assert ours["head"] == 3584 + 1


def test_memory_terms_move_the_right_way():
    work = Workload(micro_batch_tokens=8192, microbatches=8)
    base = estimate(QWEN25_VL_7B, work, tp=2, pp=1, dp=4, gpu_mem_gib=80)
    more_dp = estimate(QWEN25_VL_7B, work, tp=2, pp=1, dp=8, gpu_mem_gib=80)
    full = estimate(QWEN25_VL_7B, Workload(micro_batch_tokens=8192, microbatches=8, recompute="full"),
                    tp=2, pp=1, dp=4, gpu_mem_gib=80)
    assert more_dp.optimizer_gib == pytest.approx(base.optimizer_gib / 2)
    assert full.activations_gib < base.activations_gib / 5
    assert base.weights_gib == pytest.approx(2 * sum(parameter_counts(QWEN25_VL_7B).values()) / 2 / 2**30)
    pp2 = estimate(QWEN25_VL_7B, work, tp=2, pp=2, dp=2, gpu_mem_gib=80)
    assert pp2.weights_gib < base.weights_gib and pp2.step_time_s > 0


def test_candidates_respect_head_divisibility():
    layouts = candidates(QWEN25_VL_7B, 16)
    assert all(tp * pp * dp == 16 for tp, pp, dp in layouts)
    assert {tp for tp, _, _ in layouts} == {1, 2, 4}  # 4 KV heads rule out TP=8


def test_cli_recommends_a_fitting_layout(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN25_VL_7B))
    assert main(["--hf-config", str(path), "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "recommended: tp=" in out
    assert main(["--hf-config", str(path), "--gpus", "1", "--gpu-mem", "10"]) == 2


def test_cli_reads_the_model_of_a_run_config(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_VL_7B))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  path: {model}\nparallel:\n  tp: 4\n")
    assert main(["--config", str(cfg), "--gpus", "16", "--gpu-mem", "80", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {(r["tp"], r["pp"], r["dp"]) for r in rows} >= {(4, 1, 4), (2, 2, 4)}
    (tmp_path / "bad.yaml").write_text("optim:\n  lrr: 1.0\n")
    assert main(["--config", str(tmp_path / "bad.yaml"), "--gpus", "8"]) == 1
    assert "optim.lrr" in capsys.readouterr().err
