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
    capsys.readouterr()
    rows = {}
    for flag in ("--distributed-optimizer", "--no-distributed-optimizer"):
        assert main(["--hf-config", str(path), "--gpus", "8", "--json", flag]) == 0
        rows[flag] = {(r["tp"], r["pp"], r["dp"]): r for r in map(json.loads, capsys.readouterr().out.splitlines()[:-1])}
    sharded, replicated = rows["--distributed-optimizer"][(1, 1, 8)], rows["--no-distributed-optimizer"][(1, 1, 8)]
    assert replicated["optimizer_gib"] == pytest.approx(8 * sharded["optimizer_gib"])


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


@pytest.mark.parametrize("distributed", [True, False])
def test_peak_is_the_larger_of_backward_and_optimizer_step(distributed):
    """Activations are gone when the optimizer steps: the estimate adds the larger of the two, never both. The
    trainer's two optimizer paths hold different gradients: megatron DDP's fp32 buffer (4 B), whose torch AdamW
    allocates sqrt(v) of its shard during the step (4 B / dp), or autograd's bf16 gradients (2 B), which
    MasterAdamW's fused kernel reads in place (no step transient, so the activations are the peak's other term)."""
    counts = parameter_counts(QWEN25_VL_7B)
    trained = counts["merger"] + counts["llm"] + counts["head"]
    for tokens in (1024, 1 << 18):  # step transient larger / activations larger
        work = Workload(micro_batch_tokens=tokens, microbatches=1, distributed_optimizer=distributed)
        e = estimate(QWEN25_VL_7B, work, tp=1, pp=1, dp=2, gpu_mem_gib=80, overhead_gib=3.0)
        assert e.grads_gib == pytest.approx((4 if distributed else 2) * trained / 2**30)
        assert e.optimizer_gib == pytest.approx(12 * trained / (2 if distributed else 1) / 2**30)
        assert e.optimizer_step_gib == pytest.approx((4 / 2 if distributed else 0) * trained / 2**30)
        peak = e.weights_gib + e.grads_gib + e.optimizer_gib + max(e.activations_gib, e.optimizer_step_gib) + 3.0
        assert e.total_gib == pytest.approx(peak)
    assert e.activations_gib > e.optimizer_step_gib  # the long microbatch did exercise the other branch
    if distributed:  # and the short one the step transient's
        short = estimate(QWEN25_VL_7B, Workload(micro_batch_tokens=1024, microbatches=1, distributed_optimizer=True),
                         tp=1, pp=1, dp=2, gpu_mem_gib=80, overhead_gib=3.0)
        assert short.optimizer_step_gib > short.activations_gib


@pytest.mark.gpu
def test_master_adamw_step_transient_on_cuda():
    """The planner's MasterAdamW step term, measured above what is held before the step (weights, bf16 gradients,
    fp32 masters and moments): the fused kernel (the default on CUDA, what the planner assumes) allocates nothing per
    element; the torch path's fp32 gradient copies take 4 B per trained element (the fused torch AdamW adds
    nothing)."""
    from vlr_runtime.config import OptimConfig
    from vlr_runtime.training.optim import MasterAdamW

    dev = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(shape, device=dev, dtype=torch.bfloat16))
              for shape in [(4096, 4096), (1000, 3001), (513,)]]
    n = sum(p.numel() for p in params)
    transient = {}
    for fused in (True, False):
        opt = MasterAdamW(params, OptimConfig(), fused=fused)
        for _ in range(2):  # the first step creates the moments; the second is the steady state the planner models
            opt.zero_grad()
            for p in params:
                p.grad = torch.randn_like(p)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            opt.step()
            torch.cuda.synchronize()
        transient[fused] = torch.cuda.max_memory_allocated() - base
        del opt
    assert transient[True] < 0.01 * 4 * n  # a few scalars, nothing per element
    assert transient[False] == pytest.approx(4 * n, rel=0.05)
