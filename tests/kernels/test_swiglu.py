"""swiglu: Triton (interpreter on CPU) vs the float64 reference, the reference vs HF's activation, gradcheck, bad
inputs, the bf16 rule on GPU."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.activations import ACT2FN
from vlr_kernels import swiglu, swiglu_ref

from tests.kernels.helpers import assert_bf16_rule, assert_close64, to64

DEV = "cuda" if torch.cuda.is_available() else "cpu"
swiglu_module = importlib.import_module("vlr_kernels.swiglu")  # the package exports a function of that name
tune_module = importlib.import_module("vlr_kernels._tune")


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(shape, generator=g)).to(DEV, dtype).requires_grad_() for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 1031), (1,), (3, 18944 // 16)], ids=str)
def test_triton_matches_float64_reference(shape, dtype):
    _check_vs_float64(*_inputs(shape, dtype), dtype)


def _check_vs_float64(gate, up, dtype):
    """The Triton path's output and both gradients against the float64 reference."""
    y = swiglu(gate, up, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    g64, u64 = to64(gate, up)
    y64 = swiglu_ref(g64, u64)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == gate.shape
    assert_close64(y, y64, dtype, "y", scale=4)
    assert_close64(gate.grad, g64.grad, dtype, "dgate", scale=4)
    assert_close64(up.grad, u64.grad, dtype, "dup", scale=4)


def test_triton_accepts_non_contiguous_inputs():
    fused = torch.randn(6, 2, 50, device=DEV)
    gate, up = fused[:, 0], fused[:, 1]
    assert not gate.is_contiguous()
    assert_close64(swiglu(gate, up, backend="triton"), swiglu_ref(gate.double(), up.double()), torch.float32, "y")


def test_reference_is_hf_mlp_activation():
    gate, up = (torch.randn(4, 64, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(swiglu_ref(gate, up), ACT2FN["silu"](gate) * up)


def test_reference_gradcheck():
    gate, up = (torch.randn(3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu_ref, (gate, up))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(backend):
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5), backend=backend)
    with pytest.raises(ValueError, match="floating point"):
        swiglu(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), backend=backend)


@pytest.mark.gpu
def test_bf16_rule_on_gpu():
    gate, up = _inputs((4096, 18944), torch.bfloat16)
    y = swiglu(gate, up, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    gt, ut = (t.detach().clone().requires_grad_() for t in (gate, up))
    yt = torch.nn.functional.silu(gt) * ut  # what HF computes in bf16
    yt.backward(dy)
    g64, u64 = to64(gate, up)
    y64 = swiglu_ref(g64, u64)
    y64.backward(dy.double())
    assert_bf16_rule(y, yt, y64, "y")
    assert_bf16_rule(gate.grad, gt.grad, g64.grad, "dgate")
    assert_bf16_rule(up.grad, ut.grad, u64.grad, "dup")


@pytest.mark.parametrize("cfg", swiglu_module._CONFIGS, ids=str)
def test_every_launch_config_matches_float64(monkeypatch, cfg):
    """Each launch shape the device tuner may pick (block size, warps, streaming cache hints), forced on its own,
    on a size that is a multiple of no block (masked tail) and crosses several programs."""
    monkeypatch.setattr(swiglu_module, "_CONFIGS", (cfg,))
    _check_vs_float64(*_inputs((3, 2731), torch.float32, seed=3), torch.float32)


@pytest.mark.gpu
def test_every_launch_config_bf16_rule_on_gpu(monkeypatch):
    """Each launch shape compiled for the GPU, forced in turn, under the bf16 rule; 4099 x 18944 fills no block
    of 2048 or 4096."""
    for cfg in swiglu_module._CONFIGS:
        monkeypatch.setattr(swiglu_module, "_CONFIGS", (cfg,))
        monkeypatch.setattr(tune_module, "_PICKED", {})
        gate, up = _inputs((4099, 18944 // 4), torch.bfloat16, seed=5)
        y = swiglu(gate, up, backend="triton")
        dy = torch.randn_like(y)
        y.backward(dy)
        gt, ut = (t.detach().clone().requires_grad_() for t in (gate, up))
        yt = torch.nn.functional.silu(gt) * ut
        yt.backward(dy)
        g64, u64 = to64(gate, up)
        y64 = swiglu_ref(g64, u64)
        y64.backward(dy.double())
        for name, a, b, c in (("y", y, yt, y64), ("dgate", gate.grad, gt.grad, g64.grad),
                              ("dup", up.grad, ut.grad, u64.grad)):
            assert_bf16_rule(a, b, c, f"{cfg} {name}")
