"""The launch tuner: the default without a GPU, the fastest candidate on one, unusable candidates skipped."""

from __future__ import annotations

import pytest
import torch
from vlr_kernels import _tune


def test_cpu_uses_the_default_without_timing(monkeypatch):
    monkeypatch.setattr(_tune, "_PICKED", {})
    monkeypatch.setenv("VLR_TUNE", "1")
    calls = []
    assert _tune.pick("k", ["a", "b"], calls.append, torch.device("cpu")) == "a"
    assert calls == [] and _tune.choices() == {}


@pytest.mark.gpu
def test_gpu_picks_the_fastest_and_skips_failures(monkeypatch):
    monkeypatch.setattr(_tune, "_PICKED", {})
    monkeypatch.setenv("VLR_TUNE", "1")  # benchmarks/gpu_check.sh runs the other GPU tests untuned
    dev = torch.device("cuda")
    cycles = {"slow": 2_000_000, "fast": 20_000}

    def launch(cand: str) -> None:
        if cand == "broken":
            raise RuntimeError("out of resources")
        torch.cuda._sleep(cycles[cand])

    assert _tune.pick(("k", 1), ["slow", "broken", "fast"], launch, dev) == "fast"
    assert _tune.choices() == {("k", 1): "fast"}
    with pytest.raises(RuntimeError, match="no launch configuration"):
        _tune.pick(("k", 2), ["broken"] * 2, launch, dev)
