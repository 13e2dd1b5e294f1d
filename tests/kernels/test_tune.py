"""The launch tuner: the default without a GPU, the fastest candidate on one, unusable candidates skipped."""

from __future__ import annotations

import json

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

    monkeypatch.setattr(_tune, "_TIMES", {})
    assert _tune.pick(("k", 1), ["slow", "broken", "fast"], launch, dev) == "fast"
    assert _tune.choices() == {("k", 1): "fast"}
    (slow, t_slow), (broken, t_broken), (fast, t_fast) = _tune.timings()[("k", 1)]
    assert (slow, broken, fast) == ("slow", "broken", "fast") and t_broken == float("inf") and t_slow > 10 * t_fast
    with pytest.raises(RuntimeError, match="no launch configuration"):
        _tune.pick(("k", 2), ["broken"] * 2, launch, dev)


def test_saved_choices_are_launched_again_without_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(_tune, "_LOADED", {})
    key = ("rms_norm_bwd", 3584, torch.bfloat16, True, torch.device("cuda", 0))
    cands = [(16, 4, False), (32, 2, True), {"BLOCK_M": 32, "FLAT": True}]
    monkeypatch.setattr(_tune, "_PICKED", {key: cands[1], ("attn", 128): cands[2]})
    path = tmp_path / "tuning" / "rank00000.json"
    _tune.save_choices(path)
    monkeypatch.setattr(_tune, "_PICKED", {})
    assert _tune.load_choices(path) == 2
    calls = []
    # a saved pick wins over the default even where nothing is timed (here: the CPU), and nothing is launched
    assert _tune.pick(key, cands[:2], calls.append, torch.device("cpu")) == (32, 2, True)
    assert _tune.pick(("attn", 128), cands, calls.append, torch.device("cpu")) == {"BLOCK_M": 32, "FLAT": True}
    # a saved pick that is no longer a candidate is not forced: the usual rule applies (the default here)
    assert _tune.pick(("attn", 128, "other"), cands, calls.append, torch.device("cpu")) == cands[0]
    monkeypatch.setattr(_tune, "_LOADED", {"('attn', 64)": [1, 2, 3]})
    assert _tune.pick(("attn", 64), cands, calls.append, torch.device("cpu")) == cands[0]
    assert calls == []
    # picks loaded but not used yet are kept by the next save
    _tune.save_choices(path)
    assert "('attn', 64)" in json.loads(path.read_text())["choices"]


def test_choices_of_another_device_or_a_bad_file_are_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(_tune, "_LOADED", {})
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "choices": {"('k', 1)": [32, 2, True]}}))
    monkeypatch.setattr(_tune, "_device_name", lambda: "NVIDIA H200")
    assert _tune.load_choices(path) == 0 and _tune._LOADED == {}
    for text in ("not json", json.dumps({"choices": {}}), json.dumps({"device": "x", "choices": []})):
        path.write_text(text)
        with pytest.raises(ValueError, match="not a launch-tuner choices file"):
            _tune.load_choices(path)


def test_parallel_warmup_launches_each_candidate_once_off_the_caller_thread():
    import threading

    main = threading.get_ident()
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def launch(cand: str) -> None:
        with lock:
            seen[cand] = threading.get_ident()
        if cand == "broken":
            raise RuntimeError("out of resources")  # left to pick's serial loop, which reports it

    _tune._warm_in_parallel(["a", "b", "broken", "c", "d"], launch, torch.device("cpu"), workers=3)
    assert sorted(seen) == ["a", "b", "broken", "c", "d"]
    assert seen["a"] == main  # the first one initialises lazy state before the threads start
    assert all(seen[c] != main for c in ("b", "broken", "c", "d"))


@pytest.mark.gpu
def test_parallel_warmup_tunes_real_kernels_on_the_callers_stream(monkeypatch):
    """VLR_TUNE_THREADS compiles the RMSNorm backward candidates on worker threads (benchmarks/gpu_check.sh turns
    it on for the benchmarks only if this passes): the pick runs, on a non-default stream, and the result is right."""
    from vlr_kernels.rmsnorm import rms_norm, rms_norm_ref

    monkeypatch.setattr(_tune, "_PICKED", {})
    monkeypatch.setenv("VLR_TUNE", "1")
    monkeypatch.setenv("VLR_TUNE_THREADS", "4")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3000, 3584, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(3584, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(3000, 3584, device="cuda", generator=g, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dx, dw = torch.autograd.grad(rms_norm(x, w, 1e-6, backend="triton"), (x, w), dy)
    torch.cuda.synchronize()
    assert any(k[0] == "rms_norm_bwd" for k in _tune.choices())
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(rms_norm_ref(x64, w64, 1e-6), (x64, w64), dy.double())
    assert (dx.double() - rx).abs().max() <= 2e-2 * rx.abs().max()
    assert (dw.double() - rw).abs().max() <= 2e-2 * rw.abs().max()
