"""``benchmarks/bench_train.py --quick`` runs end to end on the CPU: every provider timed, losses and first-step
gradients of both our layouts (shared prompt, plain) agree with stock transformers, the planner row and the CSV rows
are written."""

import csv

from tests.runtime.helpers import bench_module, run_quick_benchmark


def test_bench_train_quick(tmp_path):
    out_csv = tmp_path / "rows.csv"
    stdout = run_quick_benchmark("bench_train.py", out_csv, 120, "--profile")
    assert "### profile: ours," in stdout and "### profile: ours_plain," in stdout and "aten::" in stdout
    table = stdout[stdout.index("| provider | step ms p50"):]  # the markdown tables come last
    # first cell -> row, from the step table and the planner table (the phase table repeats provider names)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| ") and line.count("|") != 5}
    phases = [line.split("|")[1:3] for line in table.splitlines() if line.count("|") == 5 and "%" in line]
    assert {(p.strip(), ph.strip()) for p, ph in phases} >= {("hf_sdpa", "optimizer"), ("ours", "forward+backward"),
                                                              ("ours", "optimizer")}
    assert {"hf_sdpa", "ours", "ours_plain", "planner"} <= set(rows)
    llm_tokens = {name: int(rows[name].split("|")[7].replace(",", "")) for name in ("hf_sdpa", "ours", "ours_plain")}
    # 2 pairs x 2 x 64 tokens; the shared layout computes each 30-token prompt once
    assert llm_tokens == {"hf_sdpa": 256, "ours": 256 - 2 * 30, "ours_plain": 256}
    assert "n/a" in rows["ours"]  # no MFU / memory on the CPU, said so instead of zeros
    assert "first-step check: ok" in table
    written = list(csv.DictReader(out_csv.open()))
    metrics = {(r["provider"], r["metric"]) for r in written}
    assert {("hf_sdpa", "ms"), ("ours", "ms"), ("ours", "tok/s"), ("ours/hf_sdpa", "tok/s ratio"),
            ("planner", "est_GiB"), ("ours_vs_hf", "rel_diff"), ("ours_plain_vs_hf", "rel_diff"),
            ("ours_plain/hf_sdpa", "tok/s ratio")} <= metrics
    assert all(float(r["p50"]) > 0 for r in written if r["metric"] in ("ms", "tok/s", "est_GiB"))
    keys = [(r["kernel"], r["provider"], r["mode"], r["metric"], r["x"]) for r in written]
    assert len(keys) == len(set(keys)), "a row was written twice"


def test_bench_models_keep_rotary_frequencies_in_fp32():
    """The stock model of bench_model/bench_train in bf16 keeps its rotary inv_freq buffers in fp32, as
    ``from_pretrained(dtype=torch.bfloat16)`` does; ``Module.to(bf16)`` alone would round them (the LLM's fastest
    rotary angle then drifts ~2 rad by position 1,000)."""
    import torch

    build_models = bench_module("bench_model").build_models

    from vlr_runtime.parallel import setup_distributed, teardown

    setup_distributed(1)
    try:
        hf, _, _, _ = build_models(True, torch.bfloat16, torch.device("cpu"))
        fp32, _, _, _ = build_models(True, torch.float32, torch.device("cpu"))
    finally:
        teardown()
    freqs = {n: b for n, b in hf.named_buffers() if n.endswith("inv_freq")}
    assert len(freqs) >= 3  # the LLM's (inv_freq, original_inv_freq) and the vision tower's
    ref = dict(fp32.named_buffers())
    for n, b in freqs.items():
        assert b.dtype == torch.float32, n
        assert torch.equal(b, ref[n]), n
        assert not torch.equal(b, b.bfloat16().float()), n  # the values bf16 would have rounded
    assert next(hf.model.language_model.parameters()).dtype == torch.bfloat16
