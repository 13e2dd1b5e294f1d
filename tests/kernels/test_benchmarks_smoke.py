"""The kernel benchmark scripts run end to end at --quick sizes (eager + Triton providers, on CPU through the
interpreter) and append rows in the one CSV schema. Guards benchmarks/_common.py and the scripts against rot; the
GPU numbers themselves come from benchmarks/gpu_check.sh."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCHEMA = ["kernel", "provider", "mode", "metric", "x", "p50", "p20", "p80", "gpu", "torch", "triton", "sha", "time"]


@pytest.mark.timeout(300)
def test_quick_benchmarks_write_rows(tmp_path):
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, str(BENCH / "run_all.py"), "--quick", "--providers", "hf_eager,triton", "--csv", str(out),
           "--rep", "2", "--only", "bench_reward_loss.py,bench_swiglu.py"]
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == SCHEMA
    timed = {(r["kernel"], r["provider"], r["mode"]) for r in rows if r["metric"] == "ms"}
    for kernel in ("reward_loss", "swiglu"):
        for provider in ("hf_eager", "triton"):
            for mode in ("fwd", "bwd", "fwd+bwd"):
                assert (kernel, provider, mode) in timed
    assert all(float(r["p50"]) > 0 for r in rows), "a zero was written as data"
    assert "## All kernel benchmarks" in proc.stdout
