"""Shared pieces of the trainer tests: a tiny synthetic set in a tmp dir and the arguments of a fast run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.ports import free_port

TINY_TRAIN_PAIRS = 32
TINY_EVAL_PAIRS = 12


def run_args(tmp: Path, *extra: str) -> list[str]:
    """Config overrides of a small, fast run on a tiny synthetic set cached under ``tmp/cache``."""
    return ["--data.cache_dir", str(tmp / "cache"), "--data.synthetic_train_pairs", str(TINY_TRAIN_PAIRS),
            "--data.synthetic_eval_pairs", str(TINY_EVAL_PAIRS), "--model.kernel_backend", "torch",
            "--log.progress", "false", "--train.pairs_per_step", "8", *extra]


def subprocess_env() -> dict[str, str]:
    """Environment for child runs: no Triton interpreter (the suite sets it; runs use the eager references), one
    thread per process, and the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]))
    return env


def torchrun(nproc: int) -> list[str]:
    """``torchrun --nproc-per-node N -m vlr_runtime.train`` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "vlr_runtime.train"]
