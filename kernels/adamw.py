"""One AdamW step for one parameter in a single pass: the mixed-precision update of an fp32 master (and its 16-bit
parameter copy) from a 16-bit gradient, with the gradient-clipping factor folded in.

Per element (torch.optim.AdamW's order, as its fused CUDA kernel computes it)::

    g      = float(grad) * grad_scale
    master = master * (1 - lr * weight_decay)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g * g
    master = master - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)      bc_i = 1 - beta_i ** step
    param  = master rounded to the parameter's dtype

Memory traffic per element with a bf16 parameter: read grad (2 B), master, m, v (12 B); write master, m, v (12 B)
and param (2 B) = 28 B, against ~44 B for "scale the bf16 grad in place, copy it to fp32, torch's fused AdamW on the
fp32 master, copy back". The gradient is only read: ``grad_scale`` replaces an in-place clip of the gradients.

The bias corrections are computed on the device from the ``step`` tensor (float64 arithmetic, like torch's fused
kernel), so a step needs no host synchronisation and can be captured in a CUDA graph; ``grad_scale`` may likewise be
a 0-d fp32 device tensor (a clip factor computed from a device-side norm).
"""

from __future__ import annotations

import torch
from vlr_kernels._backend import resolve_backend
from vlr_kernels._triton_compat import cdiv, tl, triton_jit

_BACKENDS = ("triton", "torch")
_BLOCK = 1024
_PARAM_DTYPES = (torch.bfloat16, torch.float16)


@triton_jit
def _adamw_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, param_ptr, step_ptr, grad_scale, lr, decay,
                  eps, n, BETA1: tl.constexpr, BETA2: tl.constexpr, SCALE_IS_PTR: tl.constexpr,
                  HAS_PARAM: tl.constexpr, BLOCK: tl.constexpr):
    # The block's loads are issued before the scalar loop below so their latency overlaps it.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(master_ptr + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    if SCALE_IS_PTR:
        scale = tl.load(grad_scale).to(tl.float32)
    else:
        scale = grad_scale

    # The betas are compile-time float64 constants: 1 - beta2 ** step at step 1 is 1e-3 for beta2 = 0.999, and
    # beta2 rounded to fp32 would already be 3e-5 off there. beta ** step by repeated squaring (step is an
    # integer-valued float >= 1, as torch keeps it): float64 pow is not available to every backend (the
    # interpreter's libdevice), and log2(step) iterations of a scalar loop cost little next to the block's loads.
    count = tl.load(step_ptr).to(tl.int64)
    base1 = tl.full((), BETA1, tl.float64)
    base2 = tl.full((), BETA2, tl.float64)
    pow1 = tl.full((), 1.0, tl.float64)
    pow2 = tl.full((), 1.0, tl.float64)
    while count > 0:
        odd = (count & 1) == 1
        pow1 = tl.where(odd, pow1 * base1, pow1)
        pow2 = tl.where(odd, pow2 * base2, pow2)
        base1 = base1 * base1
        base2 = base2 * base2
        count = count >> 1
    step_size = (tl.cast(lr, tl.float64) / (1.0 - pow1)).to(tl.float32)
    bc2_sqrt = tl.sqrt_rn((1.0 - pow2).to(tl.float32))
    one_minus_b1 = (1.0 - tl.full((), BETA1, tl.float64)).to(tl.float32)
    one_minus_b2 = (1.0 - tl.full((), BETA2, tl.float64)).to(tl.float32)
    b1 = tl.full((), BETA1, tl.float64).to(tl.float32)
    b2 = tl.full((), BETA2, tl.float64).to(tl.float32)

    g = g * scale
    w = w * decay
    m = b1 * m + one_minus_b1 * g
    v = b2 * v + one_minus_b2 * (g * g)
    # IEEE square root and division, as the CUDA kernel torch compiles without fast-math (triton's defaults are
    # approximate); the kernel is bound by memory, not by these
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w - tl.div_rn(step_size * m, denom)
    tl.store(master_ptr + offs, w, mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if HAS_PARAM:
        tl.store(param_ptr + offs, w.to(param_ptr.dtype.element_ty), mask=mask)


def adamw_step_ref(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   step: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float = 0.0, grad_scale: float | torch.Tensor = 1.0,
                   param: torch.Tensor | None = None) -> None:
    """Eager reference of :func:`adamw_step` in the master's dtype (fp32, or float64 for a float64 reference),
    in place. Reads ``step`` on the host."""
    with torch.no_grad():
        g = grad.to(master.dtype) * (grad_scale.to(master.dtype) if torch.is_tensor(grad_scale) else grad_scale)
        count = float(step)
        bc1, bc2 = 1.0 - beta1**count, 1.0 - beta2**count
        master.mul_(1.0 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt() / bc2**0.5 + eps
        master.sub_((lr / bc1) * exp_avg / denom)
        if param is not None:
            param.copy_(master)


def adamw_triton(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 grad_scale: float | torch.Tensor, param: torch.Tensor | None) -> None:
    """Launch the kernel on validated contiguous tensors (see :func:`adamw_step`)."""
    n = master.numel()
    if n == 0:
        return
    scale_is_ptr = torch.is_tensor(grad_scale)
    _adamw_kernel[(cdiv(n, _BLOCK),)](
        master, grad, exp_avg, exp_avg_sq, master if param is None else param, step,
        grad_scale if scale_is_ptr else float(grad_scale), float(lr), 1.0 - lr * weight_decay, float(eps), n,
        BETA1=float(beta1), BETA2=float(beta2), SCALE_IS_PTR=scale_is_ptr, HAS_PARAM=param is not None,
        BLOCK=_BLOCK, num_warps=4,
    )


def adamw_step(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
               grad_scale: float | torch.Tensor = 1.0, param: torch.Tensor | None = None,
               backend: str | None = None) -> None:
    """One AdamW update of one parameter, in place (torch.optim.AdamW's math; see the module docstring).

    ``master``, ``exp_avg``, ``exp_avg_sq``: ``[...]`` fp32 (float64 with ``backend="torch"`` only), contiguous,
    same shape; updated. ``grad``: ``[...]`` bf16/fp16/fp32 (float64 with the torch backend), same shape; only read
    - the scaled gradient is never written back. ``step``: 0-d float tensor holding the number of this update (1 for the
    first; the caller increments it, as torch's AdamW does before its kernel); on the master's device for triton.
    ``grad_scale``: multiplies the gradient (a clipping factor): a python float or a 0-d fp32 tensor (on the device
    for triton: no host synchronisation). ``param``: ``[...]`` 16-bit copy of the master, overwritten with the updated
    master rounded to its dtype; None when the master is the parameter itself.
    """
    _check_inputs(master, grad, exp_avg, exp_avg_sq, step, grad_scale, param)
    name = resolve_backend("adamw", master.device, backend, _BACKENDS)
    kwargs = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
              "grad_scale": grad_scale, "param": param}
    if name == "torch":
        adamw_step_ref(master, grad, exp_avg, exp_avg_sq, step, **kwargs)
        return
    if master.dtype != torch.float32:
        raise ValueError(f"adamw_step: the triton backend updates fp32 masters, got {master.dtype}")
    on_host = [k for k, t in (("step", step), ("grad_scale", grad_scale)) if torch.is_tensor(t)
               and t.device != master.device]
    if on_host:
        raise ValueError(f"adamw_step: the triton backend reads {on_host} on the device; move them to "
                         f"{master.device}")
    adamw_triton(master, grad, exp_avg, exp_avg_sq, step, **kwargs)


def _check_inputs(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: torch.Tensor, grad_scale: float | torch.Tensor, param: torch.Tensor | None) -> None:
    """Raise ValueError naming the first argument that the kernel cannot take."""
    named = {"master": master, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if param is not None:
        named["param"] = param
    for key, t in named.items():
        if t.shape != master.shape or t.device != master.device:
            raise ValueError(f"adamw_step: {key} {tuple(t.shape)} on {t.device} does not match master "
                             f"{tuple(master.shape)} on {master.device}")
        if not t.is_contiguous():
            raise ValueError(f"adamw_step: {key} must be contiguous (the update runs over the flat storage)")
    if master.dtype not in (torch.float32, torch.float64) or exp_avg.dtype != master.dtype \
            or exp_avg_sq.dtype != master.dtype:
        raise ValueError(f"adamw_step: master and moments must share an fp32/float64 dtype, got {master.dtype}, "
                         f"{exp_avg.dtype}, {exp_avg_sq.dtype}")
    if not grad.is_floating_point():
        raise ValueError(f"adamw_step: grad must be floating point, got {grad.dtype}")
    if param is not None and (param.dtype not in _PARAM_DTYPES or param.data_ptr() == master.data_ptr()):
        raise ValueError(f"adamw_step: param must be a separate bf16/fp16 copy of the master, got {param.dtype}")
    if step.numel() != 1 or not step.is_floating_point():
        raise ValueError(f"adamw_step: step must be a one-element float tensor, got {tuple(step.shape)} "
                         f"{step.dtype}")
    if torch.is_tensor(grad_scale) and (grad_scale.numel() != 1 or grad_scale.dtype != torch.float32):
        raise ValueError(f"adamw_step: a tensor grad_scale must be one fp32 element, got "
                         f"{tuple(grad_scale.shape)} {grad_scale.dtype}")
