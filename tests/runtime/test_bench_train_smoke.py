"""``benchmarks/bench_train.py --quick`` runs end to end on the CPU: every provider timed, losses and first-step
gradients of both our layouts (shared prompt, plain) agree with stock transformers, the planner row and the CSV rows
are written."""

import csv

from tests.runtime.helpers import run_quick_benchmark


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
