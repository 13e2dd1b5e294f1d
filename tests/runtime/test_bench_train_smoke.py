"""``benchmarks/bench_train.py --quick`` runs end to end on the CPU: both providers timed, losses and first-step
gradients agree, the planner row and the CSV rows are written."""

import csv

from tests.runtime.helpers import run_quick_benchmark


def test_bench_train_quick(tmp_path):
    out_csv = tmp_path / "rows.csv"
    stdout = run_quick_benchmark("bench_train.py", out_csv, timeout_s=120)
    table = stdout[stdout.index("| provider | step ms p50"):]  # the markdown tables come last
    # first cell -> row, from the step table and the planner table (the phase table repeats provider names)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| ") and line.count("|") != 5}
    phases = [line.split("|")[1:3] for line in table.splitlines() if line.count("|") == 5 and "%" in line]
    assert {(p.strip(), ph.strip()) for p, ph in phases} >= {("hf_sdpa", "optimizer"), ("ours", "forward+backward"),
                                                              ("ours", "optimizer")}
    assert {"hf_sdpa", "ours", "planner"} <= set(rows)
    assert "n/a" in rows["ours"]  # no MFU / memory on the CPU, said so instead of zeros
    assert "first-step check: ok" in table
    written = list(csv.DictReader(out_csv.open()))
    metrics = {(r["provider"], r["metric"]) for r in written}
    assert {("hf_sdpa", "ms"), ("ours", "ms"), ("ours", "tok/s"), ("ours/hf_sdpa", "tok/s ratio"),
            ("planner", "est_GiB"), ("ours_vs_hf", "rel_diff")} <= metrics
    assert all(float(r["p50"]) > 0 for r in written if r["metric"] in ("ms", "tok/s", "est_GiB"))
