"""Running a benchmark script's ``--quick`` CPU smoke mode from a test."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_quick_benchmark(script: str, csv_path: Path, timeout_s: float, *extra: str, interpret: bool = False) -> str:
    """``python benchmarks/<script> --quick --csv <csv_path> [extra...]`` on the CPU, with eager kernels (the Triton
    interpreter that conftest switches on would make the model benchmarks minutes slow) unless ``interpret``;
    returns its stdout, fails the test on a non-zero exit with the output's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TRITON_INTERPRET": "1" if interpret else "0"}
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--csv", str(csv_path), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def bench_module(name: str):
    """The module ``benchmarks/<name>.py``, imported with ``benchmarks/`` on ``sys.path`` for the import (its own
    imports of ``_common`` and siblings resolve there) and off it again afterwards."""
    path = str(REPO / "benchmarks")
    sys.path.insert(0, path)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(path)
