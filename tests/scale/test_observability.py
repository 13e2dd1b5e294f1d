"""Metrics sinks: every numeric metric goes to metrics.jsonl and TensorBoard; W&B is used only when installed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from vlr_runtime.training.metrics import MetricsLog


def test_tensorboard_gets_every_numeric_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, total_steps=2, first_step=0, progress=False)
    log.write({"step": 1, "loss": 0.7, "accuracy": 0.5, "pairs": 4, "mfu_llm": 0.31, "peak_mem_gb": 1.5})
    log.write({"step": 2, "split": "eval", "loss": 0.6, "accuracy_by_category": {"a": 1.0}})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"train/loss", "train/accuracy", "train/pairs", "train/mfu_llm", "train/peak_mem_gb", "eval/loss"}
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/mfu_llm")] == [(1, 0.31)]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_requested_but_missing_is_an_error(tmp_path):
    with pytest.raises(ImportError, match="wandb"):
        MetricsLog(tmp_path / "metrics.jsonl", enabled=True, total_steps=1, first_step=0, progress=False,
                   wandb_config={})
