"""``benchmarks/bench_train.py --quick`` runs end to end on the CPU: both providers timed, losses and first updates
agree, the planner row and the CSV rows are written."""

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_train_quick(tmp_path):
    out_csv = tmp_path / "rows.csv"
    # The Triton interpreter (switched on by conftest) would make "ours" minutes slow: the CPU run uses the eager
    # reference kernels, as the script does when started by hand.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--quick", "--csv",
                           str(out_csv)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| provider | step ms p50"):]  # the markdown table comes last
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"hf_sdpa", "ours", "planner"} <= set(rows)
    assert "n/a" in rows["ours"]  # no MFU / memory on the CPU, said so instead of zeros
    assert "first-step check: ok" in table
    written = list(csv.DictReader(out_csv.open()))
    metrics = {(r["provider"], r["metric"]) for r in written}
    assert {("hf_sdpa", "ms"), ("ours", "ms"), ("ours", "tok/s"), ("ours/hf_sdpa", "tok/s ratio"),
            ("planner", "est_GiB"), ("ours_vs_hf", "rel_diff")} <= metrics
    assert all(float(r["p50"]) > 0 for r in written if r["metric"] in ("ms", "tok/s", "est_GiB"))
