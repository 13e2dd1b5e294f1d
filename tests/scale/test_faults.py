"""Faults: a NaN loss injected on ONE data-parallel rank stops every rank before the optimizer step with a message
naming the rank, the step and the batch ids; a loss spike is logged; a hung rank ends the job after
``parallel.timeout_s`` (5 s here) instead of blocking it."""

from __future__ import annotations

import json
import re
import subprocess
import types
from collections import deque

import pytest

from tests.training.helpers import run_args, subprocess_env, torchrun
from vlr_runtime.config import Config
from vlr_runtime.training.trainer import Trainer

TIMEOUT_S = 180


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_before_the_optimizer(tmp_path):
    run = tmp_path / "run"
    args = run_args(tmp_path, "--run.dir", str(run), "--parallel.tp", "1", "--train.max_steps", "3",
                    "--train.pairs_per_step", "4", "--data.validate", "false", "--checkpoint.interval", "1",
                    "--checkpoint.export", "false")
    env = {**subprocess_env(), "VLR_INJECT_NAN": "1:2"}
    proc = subprocess.run(torchrun(2) + args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, env=env)
    assert proc.returncode != 0
    messages = re.findall(r"TrainingDiverged: (step .*)", proc.stderr)
    assert len(messages) == 2, proc.stderr[-4000:]  # raised on both ranks, the poisoned one and its peer
    for msg in messages:
        assert msg.startswith("step 2: non-finite loss on rank(s) [1], non-finite gradients on rank(s) [1]; "
                              "batch ids on rank 1: ['"), msg
        assert "before the optimizer step" in msg
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    # Step 1's checkpoint is the last one: the run stopped inside step 2.
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000001"]


def test_loss_spike_is_logged():
    logged: list[str] = []
    fake = types.SimpleNamespace(cfg=Config(), recent_losses=deque(maxlen=50), step=0,
                                 metrics=types.SimpleNamespace(message=logged.append))
    for step, loss in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 4.0, 5.5], start=1):
        fake.step = step
        Trainer._check_spike(fake, loss)
    assert len(logged) == 1 and logged[0].startswith("loss spike at step 7: 5.5 > 5 x median 1.02"), logged
    fake.cfg.train.spike_factor = 0.0
    Trainer._check_spike(fake, 100.0)
    assert len(logged) == 1


@pytest.mark.slow
def test_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    args = run_args(tmp_path, "--run.dir", str(tmp_path / "run"), "--parallel.tp", "1", "--train.max_steps", "3",
                    "--train.pairs_per_step", "4", "--data.validate", "false", "--checkpoint.export", "false",
                    "--parallel.timeout_s", "5")
    env = {**subprocess_env(), "VLR_INJECT_HANG": "1:2"}
    proc = subprocess.run(torchrun(2) + args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, env=env)
    assert proc.returncode != 0
    # gloo: "[rank0]: RuntimeError: [...] Timed out waiting 5000ms for send operation to complete"
    assert re.search(r"\[rank0\]: RuntimeError: .*Timed out waiting 5000ms", proc.stderr), proc.stderr[-3000:]
