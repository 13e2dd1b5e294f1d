"""The ``triton`` backend of :mod:`vlr_kernels.reward_loss`: its kernels and their launchers (the ``cuda`` backend,
:mod:`vlr_kernels.reward_loss_cuda`, has the same three launchers and decomposition).

Kernels: ``_reward_fwd_kernel`` (one program per scored row: reward, rstd, index checks), ``_pair_loss_kernel``
(loss, accuracy, dL/dr per row, the checks' verdict) and ``_reward_bwd_kernel`` (scored-column programs for the
scored rows of dL/dhidden and dw/dg/db, then zero programs for the unscored rows). The opt-in zero-in-forward modes
(see :mod:`vlr_kernels.reward_loss`): ``launch`` runs ``_reward_fwd_zero_kernel`` instead of ``_reward_fwd_kernel``
(the same row programs followed by zero programs over every row of the gradient buffer); ``stream`` runs
``_zero_unscored_kernel`` (the backward's zero programs alone) on a side stream beside the unchanged forward. In
both the backward then launches only its scored-column programs into that buffer.
"""

from __future__ import annotations

import torch
from vlr_kernels._triton_compat import cdiv, next_power_of_2, tl, triton_jit


@triton_jit
def _score_row(
    s, h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, row_ok_ptr, n_rows, n_cols, n_scored, stride_t, eps,
    HAS_NORM: tl.constexpr, CHECK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # reward, rstd and index verdict of scored entry s
    row = tl.load(idx_ptr + s)
    row_ok = 1
    if CHECK:
        # in bounds, and no other entry names the same row (two scored entries of one row would give its gradient
        # row two writers); a bad row is flagged and row 0 read instead, so the launch never faults
        offs = tl.arange(0, BLOCK_I)
        same = tl.zeros([BLOCK_I], dtype=tl.int32)
        for start in range(0, n_scored, BLOCK_I):
            i = start + offs
            same += (tl.load(idx_ptr + i, mask=i < n_scored, other=-1) == row).to(tl.int32)
        valid = (row >= 0) & (row < n_rows) & (tl.sum(same, axis=0) == 1)
        row = tl.where(valid, row, 0)
        row_ok = valid.to(tl.int32)
    cols = tl.arange(0, BLOCK_H)
    dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_H], dtype=tl.float32)
    # one pass: rstd is a per-row scalar, so reward = rstd * dot(x, norm_w * head_w) + b
    for start in range(0, n_cols, BLOCK_H):
        c = start + cols
        mask = c < n_cols
        x = tl.load(h_ptr + row * stride_t + c, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            w = w * tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
            sumsq += x * x
        dot += x * w
    rstd = 1.0
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(sumsq, axis=0) / n_cols + eps)
    reward = tl.sum(dot, axis=0) * rstd + tl.load(b_ptr).to(tl.float32)
    tl.store(rewards_ptr + s, reward)
    tl.store(rstd_ptr + s, rstd)
    tl.store(row_ok_ptr + s, row_ok)


@triton_jit
def _reward_fwd_kernel(
    h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, row_ok_ptr, n_rows, n_cols, n_scored, stride_t, eps,
    HAS_NORM: tl.constexpr, CHECK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr,
):
    _score_row(tl.program_id(0), h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, row_ok_ptr, n_rows,
               n_cols, n_scored, stride_t, eps, HAS_NORM, CHECK, BLOCK_H, BLOCK_I)


@triton_jit
def _reward_fwd_zero_kernel(
    h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, row_ok_ptr, dh_ptr, n_rows, n_cols, n_scored,
    stride_t, eps, HAS_NORM: tl.constexpr, CHECK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr,
    ZERO_ROWS: tl.constexpr, ZERO_COLS: tl.constexpr,
):
    # The opt-in zero-in-forward launch: programs [0, S) are _reward_fwd_kernel's; the programs after them write
    # zeros to ALL T rows of the [T, H] gradient buffer, with no index scan, because the backward's scored-column
    # programs run later in stream order and overwrite the scored rows. The latency-bound row programs then run
    # beside the bandwidth-bound write instead of before it (the pair kernel and the backward's scored columns
    # still follow the whole launch in stream order).
    pid = tl.program_id(0)
    if pid < n_scored:
        _score_row(pid, h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, row_ok_ptr, n_rows, n_cols,
                   n_scored, stride_t, eps, HAS_NORM, CHECK, BLOCK_H, BLOCK_I)
    else:
        _zero_rows(pid - n_scored, idx_ptr, dh_ptr, n_rows, n_cols, n_scored, False, ZERO_ROWS, ZERO_COLS, BLOCK_I)


@triton_jit
def _pair_loss_kernel(
    rewards_ptr, pair_ptr, margin_ptr, row_ok_ptr, loss_ptr, acc_ptr, ok_ptr, coef_ptr, n_scored, n_pairs,
    center_coef, HAS_MARGIN: tl.constexpr, CHECK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Program i writes coef = dL/dr_s (per unit upstream gradient) for its BLOCK_S scored rows, scanning every pair:
    # a pair adds -sigmoid(-d)/P to its chosen reward and +sigmoid(-d)/P to its rejected one (no atomics, so the
    # sum order is fixed). Program 0 also writes the loss, the accuracy and the index-check verdict.
    pid = tl.program_id(0)
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    p_offs = tl.arange(0, BLOCK_P)
    coef = tl.zeros([BLOCK_S], dtype=tl.float32)
    loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    correct = tl.zeros([BLOCK_P], dtype=tl.float32)
    bad = tl.zeros([BLOCK_P], dtype=tl.int32)
    for start in range(0, n_pairs, BLOCK_P):
        p = start + p_offs
        live = p < n_pairs
        ic = tl.load(pair_ptr + 2 * p, mask=live, other=0)
        ir = tl.load(pair_ptr + 2 * p + 1, mask=live, other=0)
        if CHECK:  # an out-of-range pair entry is counted and never dereferenced
            inside = (ic >= 0) & (ic < n_scored) & (ir >= 0) & (ir < n_scored)
            bad += (live & ~inside).to(tl.int32)
            live = live & inside
        d = tl.load(rewards_ptr + ic, mask=live, other=0.0) - tl.load(rewards_ptr + ir, mask=live, other=0.0)
        correct += tl.where(live & (d > 0), 1.0, 0.0)
        if HAS_MARGIN:
            d -= tl.load(margin_ptr + p, mask=live, other=0.0).to(tl.float32)
        # -logsigmoid(d) = softplus(-d) = max(-d, 0) + log(1 + e) and its slope sigmoid(-d), both from
        # e = exp(-|d|) <= 1: no overflow for any d
        e = tl.exp(-tl.abs(d))
        loss += tl.where(live, tl.maximum(-d, 0.0) + tl.log(1.0 + e), 0.0)
        sig_neg = tl.where(live, tl.where(d > 0, e, 1.0) / (1.0 + e), 0.0)
        to_c = tl.where(ic[None, :] == s[:, None], -sig_neg[None, :], 0.0)
        to_r = tl.where(ir[None, :] == s[:, None], sig_neg[None, :], 0.0)
        coef += tl.sum(to_c + to_r, axis=1)
    smask = s < n_scored
    r = tl.load(rewards_ptr + s, mask=smask, other=0.0)
    tl.store(coef_ptr + s, coef / n_pairs + 2.0 * center_coef * r / n_scored, mask=smask)
    if pid == 0:
        offs = tl.arange(0, BLOCK_S)
        sq = tl.zeros([BLOCK_S], dtype=tl.float32)
        rows_bad = tl.zeros([BLOCK_S], dtype=tl.int32)
        for start in range(0, n_scored, BLOCK_S):
            i = start + offs
            r_i = tl.load(rewards_ptr + i, mask=i < n_scored, other=0.0)
            sq += r_i * r_i
            if CHECK:
                rows_bad += (tl.load(row_ok_ptr + i, mask=i < n_scored, other=1) == 0).to(tl.int32)
        tl.store(loss_ptr, tl.sum(loss, axis=0) / n_pairs + center_coef * tl.sum(sq, axis=0) / n_scored)
        tl.store(acc_ptr, tl.sum(correct, axis=0) / n_pairs)
        tl.store(ok_ptr, ((tl.sum(bad, axis=0) + tl.sum(rows_bad, axis=0)) == 0).to(tl.int32))


@triton_jit
def _scored_columns(
    pid, h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, coef_ptr, dloss_ptr, drewards_ptr, dh_ptr,
    dw_ptr, dg_ptr, db_ptr, n_cols, n_scored, stride_t,
    HAS_NORM: tl.constexpr, HAS_DREWARDS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Columns [pid * BLOCK_C, +BLOCK_C) of every scored row: the dL/dhidden values, and the column sums of dw/dg
    # taken in registers over the S rows (deterministic, no [S, H] partials and no second kernel).
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < n_cols
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    wg = w
    if HAS_NORM:
        gn = tl.load(g_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        wg = w * gn
    bias = tl.load(b_ptr).to(tl.float32)
    dloss = tl.load(dloss_ptr)
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)  # sum_s dL/dr_s * xhat_s
    g_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    for start in range(0, n_scored, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        smask = s < n_scored
        g_r = tl.load(coef_ptr + s, mask=smask, other=0.0) * dloss
        if HAS_DREWARDS:
            g_r += tl.load(drewards_ptr + s, mask=smask, other=0.0)
        row = tl.load(idx_ptr + s, mask=smask, other=0)
        m2 = smask[:, None] & cmask[None, :]
        x = tl.load(h_ptr + row[:, None] * stride_t + c[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_NORM:
            rstd = tl.load(rstd_ptr + s, mask=smask, other=0.0)
            xhat = x * rstd[:, None]
            # mean(dL/dxhat * xhat) = g_r * (r_s - b) / H, known from the forward: no extra pass over the row
            proj = g_r * (tl.load(rewards_ptr + s, mask=smask, other=0.0) - bias) / n_cols
            dx = rstd[:, None] * (g_r[:, None] * wg[None, :] - xhat * proj[:, None])
        else:
            xhat = x
            dx = g_r[:, None] * wg[None, :]
        acc += g_r[:, None] * xhat
        g_sum += g_r
        tl.store(dh_ptr + row[:, None] * n_cols + c[None, :], dx.to(dh_ptr.dtype.element_ty), mask=m2)
    col = tl.sum(acc, axis=0)
    if HAS_NORM:
        tl.store(dw_ptr + c, (col * gn).to(dw_ptr.dtype.element_ty), mask=cmask)
        tl.store(dg_ptr + c, (col * w).to(dg_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(dw_ptr + c, col.to(dw_ptr.dtype.element_ty), mask=cmask)
    if pid == 0:
        tl.store(db_ptr, tl.sum(g_sum, axis=0).to(db_ptr.dtype.element_ty))


@triton_jit
def _zero_rows(
    z, idx_ptr, dh_ptr, n_rows, n_cols, n_scored,
    SKIP_SCORED: tl.constexpr, ZERO_ROWS: tl.constexpr, ZERO_COLS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # Rows [z * ZERO_ROWS, +ZERO_ROWS) of dL/dhidden get zeros; with SKIP_SCORED the scored rows are left to
    # _scored_columns (one writer per row), decided by a scan of the S indices (L2-resident, S * 8 bytes; it costs
    # S / H compares per byte stored).
    rows = z * ZERO_ROWS + tl.arange(0, ZERO_ROWS)
    keep = rows < n_rows
    if SKIP_SCORED:
        hits = tl.zeros([ZERO_ROWS], dtype=tl.int32)
        offs = tl.arange(0, BLOCK_I)
        for start in range(0, n_scored, BLOCK_I):
            i = start + offs
            idx = tl.load(idx_ptr + i, mask=i < n_scored, other=-1)
            hits += tl.sum((idx[None, :] == rows[:, None]).to(tl.int32), axis=1)
        keep = keep & (hits == 0)
    base = rows.to(tl.int64) * n_cols
    cols = tl.arange(0, ZERO_COLS)
    zeros = tl.zeros([ZERO_ROWS, ZERO_COLS], dtype=dh_ptr.dtype.element_ty)
    for start in range(0, n_cols, ZERO_COLS):
        c = start + cols
        tl.store(dh_ptr + base[:, None] + c[None, :], zeros, mask=keep[:, None] & (c < n_cols)[None, :])


@triton_jit
def _reward_bwd_kernel(
    h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, coef_ptr, dloss_ptr, drewards_ptr, dh_ptr, dw_ptr,
    dg_ptr, db_ptr, n_rows, n_cols, n_scored, stride_t, n_col_tiles,
    HAS_NORM: tl.constexpr, HAS_DREWARDS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ZERO_ROWS: tl.constexpr, ZERO_COLS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # The whole backward in one launch: programs [0, n_col_tiles) handle the scored rows and the parameter
    # gradients, the rest write the zeros of every other row (the memset-sized part), so each row of the
    # contiguous [T, H] gradient has exactly one writer and no separate fill precedes the kernel.
    pid = tl.program_id(0)
    if pid < n_col_tiles:
        _scored_columns(pid, h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, coef_ptr, dloss_ptr,
                        drewards_ptr, dh_ptr, dw_ptr, dg_ptr, db_ptr, n_cols, n_scored, stride_t,
                        HAS_NORM, HAS_DREWARDS, BLOCK_S, BLOCK_C)
    else:
        _zero_rows(pid - n_col_tiles, idx_ptr, dh_ptr, n_rows, n_cols, n_scored, True, ZERO_ROWS, ZERO_COLS,
                   BLOCK_I)


@triton_jit
def _zero_unscored_kernel(
    idx_ptr, dh_ptr, n_rows, n_cols, n_scored,
    ZERO_ROWS: tl.constexpr, ZERO_COLS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # The zero-in-forward ``stream`` mode's fill: _reward_bwd_kernel's zero programs on their own, so that the fill
    # can run on a side stream while the forward's row and pair kernels and the backward's scored columns (which
    # own the scored rows: one writer per row, no ordering needed) run on the caller's stream.
    _zero_rows(tl.program_id(0), idx_ptr, dh_ptr, n_rows, n_cols, n_scored, True, ZERO_ROWS, ZERO_COLS, BLOCK_I)


def _block_h(n_cols: int) -> int:
    return min(next_power_of_2(n_cols), 2048)


_BLOCK_I = 64  # scored indices per step of the index scans
_PAIR_BLOCK_S, _PAIR_BLOCK_P = 64, 64
_BWD_BLOCK_S, _BWD_BLOCK_C, _ZERO_ROWS, _ZERO_COLS = 32, 64, 8, 512


def _check_grad_buffer(dhidden: torch.Tensor, hidden: torch.Tensor) -> None:
    if dhidden.shape != hidden.shape or dhidden.dtype != hidden.dtype or not dhidden.is_contiguous():
        raise ValueError(f"dhidden must be a contiguous {hidden.dtype} {tuple(hidden.shape)} buffer")


def reward_fwd(
    hidden: torch.Tensor, scored_index: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None, eps: float, check: bool = False, dhidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher: ``(rewards [S] fp32, rstd [S] fp32, row_ok [S] int32)``; rstd = 1 without a norm; row_ok
    is 0 where ``check`` found the scored row out of ``[0, T)`` or duplicated (always 1 without ``check``).

    ``dhidden``: None, or a contiguous ``[T, H]`` buffer (hidden's dtype, any contents) that the same launch fills
    with zeros, every row (the zero-in-forward mode; pass it to :func:`reward_loss_bwd` with
    ``unscored_zeroed=True``)."""
    t_rows, n_cols = hidden.shape
    s = scored_index.numel()
    rewards = torch.empty(s, dtype=torch.float32, device=hidden.device)
    rstd = torch.empty(s, dtype=torch.float32, device=hidden.device)
    row_ok = torch.empty(s, dtype=torch.int32, device=hidden.device)
    row_args = (hidden, scored_index, head_weight, head_bias, norm_weight if norm_weight is not None else head_weight,
                rewards, rstd, row_ok)
    sizes = (t_rows, n_cols, s, hidden.stride(0), eps)
    consts = {"HAS_NORM": norm_weight is not None, "CHECK": check, "BLOCK_H": _block_h(n_cols), "BLOCK_I": _BLOCK_I,
              "num_warps": 8}  # 4 warps spilled at BLOCK_H 2048 with the norm (sm_90, H a multiple of 16)
    if dhidden is None:
        _reward_fwd_kernel[(s,)](*row_args, *sizes, **consts)
    else:
        _check_grad_buffer(dhidden, hidden)
        _reward_fwd_zero_kernel[(s + cdiv(t_rows, _ZERO_ROWS),)](
            *row_args, dhidden, *sizes, **consts, ZERO_ROWS=_ZERO_ROWS, ZERO_COLS=_ZERO_COLS)
    return rewards, rstd, row_ok


def zero_unscored(dhidden: torch.Tensor, scored_index: torch.Tensor) -> None:
    """Triton launcher: zeros in every row of the contiguous ``[T, H]`` buffer ``dhidden`` that ``scored_index``
    does not name (scored rows untouched), on the current stream. Pass the buffer to :func:`reward_loss_bwd` with
    ``unscored_zeroed=True``; the caller orders the two launches if they run on different streams."""
    if dhidden.dim() != 2 or not dhidden.is_contiguous():
        raise ValueError(f"dhidden must be a contiguous [T, H] buffer, got {tuple(dhidden.shape)}")
    t_rows, n_cols = dhidden.shape
    _zero_unscored_kernel[(cdiv(t_rows, _ZERO_ROWS),)](
        scored_index, dhidden, t_rows, n_cols, scored_index.numel(), ZERO_ROWS=_ZERO_ROWS, ZERO_COLS=_ZERO_COLS,
        BLOCK_I=_BLOCK_I, num_warps=4,
    )


def pair_loss_fwd(
    rewards: torch.Tensor, pair_index: torch.Tensor, margin: torch.Tensor | None, row_ok: torch.Tensor,
    center_coef: float, check: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher: ``(loss, accuracy, ok, coef)`` from ``rewards [S]``: loss/accuracy 0-d fp32; ok 0-d int32,
    0 when ``check`` found a pair entry out of ``[0, S)`` or a bad row in ``row_ok``; ``coef [S]`` fp32 = dloss/dr
    (what the backward scales by the upstream gradient)."""
    s, n_pairs = rewards.numel(), pair_index.shape[0]
    loss = torch.empty((), dtype=torch.float32, device=rewards.device)
    acc = torch.empty((), dtype=torch.float32, device=rewards.device)
    ok = torch.empty((), dtype=torch.int32, device=rewards.device)
    coef = torch.empty(s, dtype=torch.float32, device=rewards.device)
    _pair_loss_kernel[(cdiv(s, _PAIR_BLOCK_S),)](
        rewards, pair_index, margin if margin is not None else rewards, row_ok, loss, acc, ok, coef, s, n_pairs,
        float(center_coef), HAS_MARGIN=margin is not None, CHECK=check, BLOCK_S=_PAIR_BLOCK_S,
        BLOCK_P=_PAIR_BLOCK_P, num_warps=4,
    )
    return loss, acc, ok, coef


def reward_loss_bwd(
    dloss: torch.Tensor, drewards: torch.Tensor | None, hidden: torch.Tensor, scored_index: torch.Tensor,
    head_weight: torch.Tensor, head_bias: torch.Tensor, norm_weight: torch.Tensor | None, rewards: torch.Tensor,
    rstd: torch.Tensor, coef: torch.Tensor, dhidden: torch.Tensor | None = None, unscored_zeroed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton launcher: ``(dhidden [T, H], dhead_weight [H], dhead_bias [1], dnorm_weight [H] | None)`` in one
    kernel. ``dhidden``: a contiguous ``[T, H]`` buffer whose contents do not matter (every row is written: the S
    scored rows with their gradient, the others with zeros); allocated uninitialised when None.
    ``unscored_zeroed``: every unscored row of ``dhidden`` is zeroed by another launch (:func:`reward_fwd`'s before
    this one, or :func:`zero_unscored`'s on a side stream, which the caller joins): only the scored-column programs
    run, and their stores overwrite every element of every scored row."""
    t_rows, n_cols = hidden.shape
    s = scored_index.numel()
    if dhidden is None:
        if unscored_zeroed:
            raise ValueError("unscored_zeroed=True needs the dhidden buffer that reward_fwd zeroed")
        dhidden = torch.empty((t_rows, n_cols), dtype=hidden.dtype, device=hidden.device)
    _check_grad_buffer(dhidden, hidden)
    dw = torch.empty_like(head_weight)
    db = torch.empty_like(head_bias)
    dg = torch.empty_like(norm_weight) if norm_weight is not None else None
    n_col_tiles = cdiv(n_cols, _BWD_BLOCK_C)
    n_zero_programs = 0 if unscored_zeroed else cdiv(t_rows, _ZERO_ROWS)
    _reward_bwd_kernel[(n_col_tiles + n_zero_programs,)](
        hidden, scored_index, head_weight, head_bias, norm_weight if norm_weight is not None else head_weight,
        rewards, rstd, coef, dloss, drewards if drewards is not None else rewards, dhidden, dw,
        dg if dg is not None else dw, db, t_rows, n_cols, s, hidden.stride(0), n_col_tiles,
        HAS_NORM=norm_weight is not None, HAS_DREWARDS=drewards is not None, BLOCK_S=_BWD_BLOCK_S,
        BLOCK_C=_BWD_BLOCK_C, ZERO_ROWS=_ZERO_ROWS, ZERO_COLS=_ZERO_COLS, BLOCK_I=_BLOCK_I, num_warps=4,
    )
    return dhidden, dw, db, dg


class TritonLaunchers:
    """The three launchers of the triton backend (the interface :class:`~vlr_kernels.reward_loss_cuda.CudaLaunchers`
    shares; only these take the zero-in-forward buffer), and the ``stream`` mode's fill."""

    reward_fwd = staticmethod(reward_fwd)
    zero_unscored = staticmethod(zero_unscored)
    pair_loss_fwd = staticmethod(pair_loss_fwd)
    reward_loss_bwd = staticmethod(reward_loss_bwd)
