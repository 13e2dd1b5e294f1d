"""RMSNorm with an optional fused residual add (Hugging Face Qwen2 semantics), Triton forward and backward.

``y = weight * (s * rsqrt(mean(s**2) + eps))`` with ``s = x`` or ``s = x + residual`` (the sum rounded to x's dtype,
as the eager decoder does). Math in fp32; the output dtype is ``promote(x.dtype, weight.dtype)`` like HF's module.
Backward stores only ``s`` and the per-row ``rstd`` (fp32, 4 bytes a row).
"""

from __future__ import annotations

import torch
from vlr_kernels._backend import resolve_backend, sm_count
from vlr_kernels._triton_compat import cdiv, next_power_of_2, tl, triton_jit
from vlr_kernels._tune import pick

_BACKENDS = ("triton", "torch")


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager reference: exactly ``Qwen2RMSNorm`` (fp32 statistics, normalised value cast back, times weight).
    float64 inputs stay float64 so tests can use it as the high-precision reference."""
    s = x if residual is None else x + residual
    ct = torch.promote_types(s.dtype, torch.float32)
    h = s.to(ct)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(s.dtype)
    return y if residual is None else (y, s)


@triton_jit
def _rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    """``ROWS`` consecutive rows per program, loaded together (more bytes in flight per program)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    offs = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        # round the sum to the storage dtype first: that rounded sum is what the next layer's residual sees
        x = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (xf * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton_jit
def _rms_norm_bwd_row(dy_raw, s_raw, rstd, w, ds_ptr, dx_ptr, offs, mask, n_cols, HAS_DS: tl.constexpr):
    # one row's dx, stored; returns its dweight term dy * xhat. The row sum takes s, not xhat = s * rstd, so
    # it does not wait for the rstd load: sum(dy * w * xhat) = rstd * sum(dy * w * s)
    dy = dy_raw.to(tl.float32)
    s = s_raw.to(tl.float32)
    dyw = dy * w
    c = tl.sum(dyw * s, axis=0) * (rstd * rstd * rstd / n_cols)
    dx = rstd * dyw - c * s
    if HAS_DS:
        dx += tl.load(ds_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return dy * (s * rstd)


@triton_jit
def _rms_norm_bwd_kernel(
    dy_ptr, ds_ptr, s_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, n_cols,
    HAS_DS: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program per contiguous slice of rows, its dweight partial kept in registers. Rows in flight per
    # program: PREFETCH loads the next row's dy, s and rstd into registers before this row's math; STAGES > 1
    # lets the compiler's pipeliner copy the next STAGES - 1 rows into shared memory asynchronously (cp.async on
    # sm_80+, no registers held), so a program waits on one row's latency per STAGES - 1 rows
    pid = tl.program_id(0)
    rows_per_program = tl.cdiv(n_rows, tl.num_programs(0))
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    if PREFETCH:
        row_off = row_start.to(tl.int64) * n_cols  # scalar 64-bit row offset (T*H may exceed 2**31), 32-bit cols
        zero = cols * 0  # row tests broadcast to a vector: a scalar bool in a mask is rejected by the interpreter
        first = mask & (zero + row_start < row_end)
        dy_next = tl.load(dy_ptr + row_off + cols, mask=first, other=0.0)
        s_next = tl.load(s_ptr + row_off + cols, mask=first, other=0.0)
        rstd_next = tl.load(rstd_ptr + tl.minimum(row_start, n_rows - 1))
        for row in range(row_start, row_end):
            dy_raw, s_raw, rstd = dy_next, s_next, rstd_next
            more = mask & (zero + row + 1 < row_end)
            dy_next = tl.load(dy_ptr + row_off + n_cols + cols, mask=more, other=0.0)
            s_next = tl.load(s_ptr + row_off + n_cols + cols, mask=more, other=0.0)
            rstd_next = tl.load(rstd_ptr + tl.minimum(row + 1, n_rows - 1))
            dw_acc += _rms_norm_bwd_row(dy_raw, s_raw, rstd, w, ds_ptr, dx_ptr, row_off + cols, mask, n_cols,
                                        HAS_DS)
            row_off += n_cols
    else:
        for row in tl.range(row_start, row_end, num_stages=STAGES):
            offs = tl.cast(row, tl.int64) * n_cols + cols
            dy_raw = tl.load(dy_ptr + offs, mask=mask, other=0.0)
            s_raw = tl.load(s_ptr + offs, mask=mask, other=0.0)
            rstd = tl.load(rstd_ptr + row)
            dw_acc += _rms_norm_bwd_row(dy_raw, s_raw, rstd, w, ds_ptr, dx_ptr, offs, mask, n_cols, HAS_DS)
    tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=mask)


# Backward launch shapes (num_warps, programs per SM, prefetch, stages), the first the default. One row in flight
# per program is latency-bound: sm_90 at N=3584 (BLOCK_N 4096) fits 2 programs of 16 warps per SM (~64
# registers), so the default keeps at most 2 rows in flight per SM and none while it computes. The candidates
# raise that: register prefetch at 32 warps (1 program per SM), or 3-4 stage shared-memory pipelines at 16 or 8
# warps x 2 programs per SM (2-3 rows ahead per program; the grid matches what is resident, so no second wave).
# The fastest is picked once per shape on the device.
_BWD_CONFIGS = (
    (16, 4, False, 1), (32, 1, True, 1), (32, 2, True, 1), (32, 1, False, 1), (32, 4, False, 1),
    (16, 2, False, 3), (16, 2, False, 4), (8, 2, False, 4),
)


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


# Forward launch shapes (num_warps, rows per program), the first the default (v1: one row per 16-warp program).
# H200 run E: the plain forward moved its 235 MB at 76% of the copy ceiling, the residual one (twice the bytes per
# row) at 94%: with one row per program at most 4 programs (rows) fit an SM (2,048 threads), ~28 KB of loads in
# flight per SM at N=3584, short of what the HBM's latency needs. More rows per program (or smaller programs,
# more of them resident) put more bytes in flight; the fastest is picked once per shape on the device.
_FWD_CONFIGS = ((16, 1), (16, 2), (8, 2), (8, 4), (4, 1), (4, 2))


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on ``x [M, N]`` (contiguous). Returns ``(y [M, N], s [M, N], rstd [M] fp32)``;
    ``s`` is ``x`` itself without a residual."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = x if residual is None else torch.empty_like(x)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block_n = next_power_of_2(n)
    if m == 0:
        return y, s, rstd

    def launch(cfg: tuple[int, int]) -> None:
        warps, rows = cfg
        _rms_norm_fwd_kernel[(cdiv(m, rows),)](
            x, residual if residual is not None else x, weight, y, s, rstd, m, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, ROWS=rows, num_warps=min(warps, _num_warps(block_n)),
        )

    launch(pick(("rms_norm_fwd", n, x.dtype, residual is not None, x.device), _FWD_CONFIGS, launch, x.device))
    return y, s, rstd


def rms_norm_bwd(
    dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. ``dy [M, N]`` grad of y, ``ds [M, N]`` grad of the residual-sum output (or None).
    Returns ``(dx [M, N] in s's dtype, dweight [N] in weight's dtype)``."""
    m, n = s.shape
    dx = torch.empty_like(s)
    block_n = next_power_of_2(n)
    sms = sm_count(s.device) if s.is_cuda else 1
    partials: list[torch.Tensor] = []

    def launch(cfg: tuple[int, int, bool, int]) -> None:
        # dweight partials sized to this launch's grid: every row is written (a program without rows writes
        # zeros), so no stale row of an earlier launch with a larger grid can enter the sum
        warps, per_sm, prefetch, stages = cfg
        programs = min(m, per_sm * sms) if s.is_cuda else min(m, 4)
        dw_part = torch.empty((programs, n), dtype=torch.float32, device=s.device)
        _rms_norm_bwd_kernel[(programs,)](
            dy, ds if ds is not None else dy, s, weight, rstd, dx, dw_part, m, n,
            HAS_DS=ds is not None, PREFETCH=prefetch, STAGES=stages, BLOCK_N=block_n,
            num_warps=min(warps, _num_warps(block_n) * 2),
        )
        partials[:] = [dw_part]

    launch(pick(("rms_norm_bwd", n, s.dtype, ds is not None, s.device), _BWD_CONFIGS, launch, s.device))
    return dx, partials[0].sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels: outputs ``y`` or ``(y, x + residual)``."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        r2 = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
        y, s, rstd = rms_norm_fwd(x2, weight.contiguous(), eps, r2)
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_residual = residual is not None
        ctx.shape = shape
        if x.dim() != 2:  # a view costs microseconds of host time; 2-D inputs need none
            y, s = y.view(shape), s.view(shape)
        return y if residual is None else (y, s)

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, rstd = ctx.saved_tensors
        n = ctx.shape[-1]
        ds2 = ds.reshape(-1, n).contiguous() if ds is not None else None
        dx, dw = rms_norm_bwd(dy.reshape(-1, n).contiguous(), ds2, s, weight, rstd)
        if len(ctx.shape) != 2:
            dx = dx.view(ctx.shape)
        return dx, dw, (dx if ctx.has_residual else None), None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim.

    Args:
        x: ``[..., N]``; weight: ``[N]``; residual: ``[..., N]`` like x, or None.
    Returns:
        ``y [..., N]`` (dtype ``promote(x, weight)``), or with a residual ``(y, x + residual)`` - the sum is the next
        residual stream, so callers need not add it again.
    """
    # plain int comparisons: torch.Size against a tuple goes through symbolic-shape code (microseconds a call)
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1] if x.dim() else '?'}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual must match x {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if weight.device != x.device or (residual is not None and residual.device != x.device):
        raise ValueError("rms_norm: x, weight and residual must be on the same device")
    name = resolve_backend("rms_norm", x.device, backend, _BACKENDS)
    if name == "torch":
        return rms_norm_ref(x, weight, eps, residual)
    return RMSNormFunction.apply(x, weight, residual, eps)
