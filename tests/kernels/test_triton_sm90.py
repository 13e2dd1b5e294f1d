"""Every Triton kernel compiles for sm_90 with bf16 pointers and spills no registers (see triton_sm90.py). Runs in a
subprocess because the suite enables the Triton interpreter, which replaces the kernels at import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_triton_kernels_compile_for_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.triton_sm90"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=580, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("spill_bytes=0") >= 13, proc.stdout
