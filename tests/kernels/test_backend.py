"""Backend resolution: explicit argument > per-op env var > global env var > default; clear errors."""

import pytest
import torch
from vlr_kernels._backend import BackendUnavailable, resolve_backend, set_default_backend

CPU = torch.device("cpu")


def test_precedence(monkeypatch):
    monkeypatch.delenv("VLR_KERNEL_BACKEND", raising=False)
    monkeypatch.setenv("VLR_MY_OP_BACKEND", "sdpa")
    assert resolve_backend("my_op", CPU, None, ("torch", "sdpa")) == "sdpa"
    assert resolve_backend("my_op", CPU, "torch", ("torch", "sdpa")) == "torch"
    monkeypatch.delenv("VLR_MY_OP_BACKEND")
    monkeypatch.setenv("VLR_KERNEL_BACKEND", "torch")
    assert resolve_backend("my_op", CPU, None, ("torch", "sdpa")) == "torch"


def test_default_and_automatic(monkeypatch):
    monkeypatch.delenv("VLR_KERNEL_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("my_op", CPU, None, ("triton", "torch")) == "torch"
    set_default_backend("sdpa")
    try:
        assert resolve_backend("my_op", CPU, None, ("torch", "sdpa")) == "sdpa"
    finally:
        set_default_backend(None)


def test_clear_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="not one of"):
        resolve_backend("my_op", CPU, "nope", ("torch",))
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        resolve_backend("my_op", CPU, "triton", ("triton", "torch"))
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        resolve_backend("my_op", CPU, "cuda", ("cuda", "torch"))
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        resolve_backend("my_op", CPU, "flash_attn", ("flash_attn", "torch"))


def test_resolution_traces_into_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) of code that dispatches: the resolver (its import checks included) runs once
    at trace time instead of breaking the graph (the cuda reward-loss op is compiled this way on GPUs)."""
    monkeypatch.delenv("VLR_KERNEL_BACKEND", raising=False)

    def f(x):
        name = resolve_backend("my_op", x.device, None, ("triton", "cuda", "torch"))
        return x * 2 if name == "torch" else x - 1

    x = torch.randn(5)
    expected = x * 2 if resolve_backend("my_op", CPU, None, ("triton", "cuda", "torch")) == "torch" else x - 1
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), expected)


def test_host_cdiv_and_next_power_of_2_match_triton():
    """The launchers' host-side helpers give triton's results (they exist to skip its per-call overhead)."""
    triton = pytest.importorskip("triton")
    from vlr_kernels._triton_compat import cdiv, next_power_of_2

    for n in [*range(300), 1023, 1024, 1025, 32604, 2**31 - 1, 2**31]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 8, 16, 64, 512, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
