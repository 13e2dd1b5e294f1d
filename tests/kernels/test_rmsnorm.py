"""rms_norm: Triton (interpreter on CPU) vs the float64 reference, the reference vs HF's Qwen2.5-VL RMSNorm module,
gradcheck, bad inputs, and the bf16 rule on GPU."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm
from vlr_kernels import _tune as tune_module
from vlr_kernels import rms_norm, rms_norm_ref
from vlr_kernels import rmsnorm as rmsnorm_module

from tests.kernels.helpers import assert_bf16_rule, assert_close64, to64

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(shape, dtype, residual, backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEV, dtype).requires_grad_()
    r = torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_() if residual else None
    out = rms_norm(x, w, 1e-6, r, backend=backend)
    outs = out if residual else (out,)
    grads = [torch.randn(o.shape, generator=g).to(DEV, o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return (x, w, r), outs, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(7, 83), (2, 5, 96), (3, 3584), (1, 1)], ids=str)
def test_triton_matches_float64_reference(shape, dtype, residual):
    (x, w, r), outs, grads = _run(shape, dtype, residual, "triton")
    x64, w64, r64 = to64(x, w, r)
    outs64 = rms_norm_ref(x64, w64, 1e-6, r64)
    outs64 = outs64 if residual else (outs64,)
    torch.autograd.backward(outs64, [gr.double() for gr in grads])
    assert outs[0].dtype == dtype and outs[0].shape == x.shape
    for o, o64, name in zip(outs, outs64, ("y", "x+residual")):
        assert_close64(o, o64, dtype, name)
    assert_close64(x.grad, x64.grad, dtype, "dx")
    assert_close64(w.grad, w64.grad, dtype, "dweight", scale=8)
    if residual:
        assert_close64(r.grad, r64.grad, dtype, "dresidual")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("config", rmsnorm_module._BWD_CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(7, 83), (3, 200), (9, 1)], ids=str)
def test_every_backward_launch_config_matches_reference(monkeypatch, shape, config, residual, dtype):
    """Each candidate the launch tuner may pick (warps, programs per SM, prefetch, pipeline stages) computes the
    same gradients: rows split unevenly over programs, programs left without rows, the prefetch of a missing next
    row, pipelines longer than a program's rows."""
    monkeypatch.setattr(rmsnorm_module, "_BWD_CONFIGS", (config,))
    monkeypatch.setattr(tune_module, "_PICKED", {})
    (x, w, r), _, grads = _run(shape, dtype, residual, "triton", seed=3)
    x64, w64, r64 = to64(x, w, r)
    outs64 = rms_norm_ref(x64, w64, 1e-6, r64)
    torch.autograd.backward(outs64 if residual else (outs64,), [gr.double() for gr in grads])
    assert_close64(x.grad, x64.grad, dtype, "dx")
    assert_close64(w.grad, w64.grad, dtype, "dweight", scale=8)
    if residual:
        assert_close64(r.grad, r64.grad, dtype, "dresidual")


def test_reference_is_hf_module():
    x = torch.randn(4, 9, 64, dtype=torch.bfloat16)
    norm = Qwen2_5_VLRMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    assert torch.equal(rms_norm_ref(x, norm.weight), norm(x))
    res = torch.randn_like(x)
    y, s = rms_norm_ref(x, norm.weight, residual=res)
    assert torch.equal(s, x + res) and torch.equal(y, norm(x + res))


def test_fp32_weight_promotes_output_like_hf():
    x = torch.randn(3, 40, dtype=torch.float16)
    w = torch.rand(40)
    y = rms_norm(x, w, backend="triton")
    assert y.dtype == torch.float32
    assert_close64(y, rms_norm_ref(x.double(), w.double()), torch.float16, "y")


def test_reference_gradcheck():
    x, r = (torch.randn(3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: rms_norm_ref(a, b, 1e-6, c), (x, w, r))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(backend):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(7), backend=backend)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, torch.ones(8), residual=torch.randn(4, 8, dtype=torch.float64), backend=backend)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("config", rmsnorm_module._FWD_CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(7, 83), (9, 1)], ids=str)
def test_every_forward_launch_config_matches_reference(monkeypatch, shape, config, residual):
    """Each forward candidate (warps, rows per program): 7 and 9 rows fill no program of 2 or 4 rows (the last
    program's missing rows are masked), outputs and the saved rstd through the backward."""
    monkeypatch.setattr(rmsnorm_module, "_FWD_CONFIGS", (config,))
    monkeypatch.setattr(tune_module, "_PICKED", {})
    (x, w, r), outs, grads = _run(shape, torch.float32, residual, "triton", seed=5)
    x64, w64, r64 = to64(x, w, r)
    outs64 = rms_norm_ref(x64, w64, 1e-6, r64)
    outs64 = outs64 if residual else (outs64,)
    torch.autograd.backward(outs64, [gr.double() for gr in grads])
    for o, o64, name in zip(outs, outs64, ("y", "x+residual")):
        assert_close64(o, o64, torch.float32, name)
    assert_close64(x.grad, x64.grad, torch.float32, "dx")
    assert_close64(w.grad, w64.grad, torch.float32, "dweight", scale=8)


def _assert_bf16_rule(shape, residual):
    """Triton bf16 outputs and every gradient within the design.md bf16 rule (vs plain torch in bf16, both
    against float64)."""
    (x, w, r), outs, grads = _run(shape, torch.bfloat16, residual, "triton")
    ins_t = [t.detach().clone().requires_grad_() for t in (x, w) + ((r,) if residual else ())]
    outs_t = rms_norm_ref(ins_t[0], ins_t[1], 1e-6, ins_t[2] if residual else None)
    outs_t = outs_t if residual else (outs_t,)
    torch.autograd.backward(outs_t, grads)
    ins64 = to64(*ins_t)
    outs64 = rms_norm_ref(ins64[0], ins64[1], 1e-6, ins64[2] if residual else None)
    outs64 = outs64 if residual else (outs64,)
    torch.autograd.backward(outs64, [gr.double() for gr in grads])
    for o, ot, o64 in zip(outs, outs_t, outs64):
        assert_bf16_rule(o, ot, o64, "output")
    for name, gk, gt, g64 in zip(("dx", "dw", "dr"), (x.grad, w.grad, r.grad if residual else None),
                                 [t.grad for t in ins_t], [t.grad for t in ins64]):
        assert_bf16_rule(gk, gt, g64, name)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_bf16_rule_on_gpu(residual):
    _assert_bf16_rule((4096, 3584), residual)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_every_backward_launch_config_on_gpu(monkeypatch, residual):
    """Each launch candidate compiled for the GPU (the interpreter runs none of the register prefetch scheduling
    or the cp.async pipelines), forced in turn: 1031 rows of 3584 give every program several rows, more than a
    pipeline's depth, and an uneven last slice."""
    for config in rmsnorm_module._BWD_CONFIGS:
        monkeypatch.setattr(rmsnorm_module, "_BWD_CONFIGS", (config,))
        monkeypatch.setattr(tune_module, "_PICKED", {})
        _assert_bf16_rule((1031, 3584), residual)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_every_forward_launch_config_on_gpu(monkeypatch, residual):
    """Each forward candidate compiled for the GPU, forced in turn (1031 rows: no program of 2 or 4 rows full at
    the end)."""
    for config in rmsnorm_module._FWD_CONFIGS:
        monkeypatch.setattr(rmsnorm_module, "_FWD_CONFIGS", (config,))
        monkeypatch.setattr(tune_module, "_PICKED", {})
        _assert_bf16_rule((1031, 3584), residual)
