"""Fused reward head + pairwise (Bradley-Terry) loss over packed hidden states.

Only the ``S`` scored rows of ``hidden [T, H]`` are read (optionally RMS-normalised with the final norm weight) and
projected by the scalar head; the ``T - S`` other tokens are never normalised or projected.

Device work per training step (triton and cuda backends, the same decomposition): forward = row kernel (rewards,
rstd, index checks) + pair kernel (loss, accuracy, dloss/dr per row, the checks' verdict); backward = ONE kernel
whose first programs write the scored rows of ``dL/dhidden`` and the head/norm weight gradients (column sums in
registers) while the others write zeros to every unscored row. The gradient is allocated uninitialised: no
separate fill, no ``[T, H]`` buffer in the forward, peak memory = the gradient + O(S) scalars. ``check_indices``
adds one ``torch._assert_async`` on CUDA.

Forward, per scored row ``s`` (fp32 math whatever the input dtype)::

    x = hidden[scored_index[s]];  n = x * rsqrt(mean(x**2) + eps) * norm_weight   (or n = x without norm_weight)
    rewards[s] = dot(n, head_weight) + head_bias
    d_p  = rewards[chosen_p] - rewards[rejected_p] - margin_p
    loss = mean_p(softplus(-d_p)) + center_coef * mean_s(rewards**2)

Sequence parallelism: scored rows are *gathered before the op* (:func:`gather_scored_rows`): each rank copies its
local scored rows into an ``[S, H]`` buffer and one all-reduce makes the buffer whole on every rank, so every rank
computes the same loss and the head/norm weight gradients need no extra reduction. Backward of the gather routes each
row's gradient back to the rank that holds it. ``S * H`` is tiny next to ``T * H``, so the all-reduce is cheap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from vlr_kernels._backend import resolve_backend
from vlr_kernels._triton_compat import tl, triton, triton_jit
from vlr_kernels.reward_loss_cuda import CudaLaunchers
from vlr_kernels.reward_loss_cuda import load_cuda_ops as _load_cuda_ops

_BACKENDS = ("triton", "cuda", "torch")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (references in tests); everything else is computed in float32."""
    return torch.promote_types(t.dtype, torch.float32)


def check_reward_inputs(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    pair_index: torch.Tensor | None,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None,
    margin: torch.Tensor | None,
    check_indices: bool = True,
) -> None:
    """Raise ValueError naming the first bad argument; with ``check_indices`` also :func:`check_index_values`.
    (The triton/cuda paths check index values inside their forward kernels instead.)"""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    h = hidden.shape[1]
    if scored_index.dim() != 1 or scored_index.dtype != torch.int64:
        raise ValueError(f"scored_index must be a 1-D int64 tensor, got {scored_index.dtype} {tuple(scored_index.shape)}")
    if scored_index.numel() == 0:
        raise ValueError("scored_index is empty: nothing to score")
    if head_weight.shape != (h,):
        raise ValueError(f"head_weight must be [H]=[{h}], got {tuple(head_weight.shape)}")
    if head_bias.numel() != 1 or head_bias.dim() > 1:
        raise ValueError(f"head_bias must be 0-d or [1], got {tuple(head_bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (h,):
        raise ValueError(f"norm_weight must be [H]=[{h}], got {tuple(norm_weight.shape)}")
    tensors = [("scored_index", scored_index), ("head_weight", head_weight), ("head_bias", head_bias)]
    if norm_weight is not None:
        tensors.append(("norm_weight", norm_weight))
    if pair_index is not None:
        if pair_index.dim() != 2 or pair_index.shape[1] != 2 or pair_index.dtype != torch.int64:
            raise ValueError(f"pair_index must be [P, 2] int64, got {pair_index.dtype} {tuple(pair_index.shape)}")
        if pair_index.shape[0] == 0:
            raise ValueError("pair_index is empty: the loss needs at least one pair")
        tensors.append(("pair_index", pair_index))
        if margin is not None:
            if margin.shape != (pair_index.shape[0],) or not margin.is_floating_point():
                raise ValueError(f"margin must be float [P]=[{pair_index.shape[0]}], got {tuple(margin.shape)}")
            tensors.append(("margin", margin))
    for name, t in tensors:
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if check_indices:
        check_index_values(hidden.shape[0], scored_index, pair_index)


def check_index_values(t_rows: int, scored_index: torch.Tensor, pair_index: torch.Tensor | None) -> None:
    """Index bounds/uniqueness with PyTorch ops: a ValueError naming the check on CPU, ``torch._assert_async`` (no
    host sync, one small kernel per check) on CUDA."""
    s = scored_index.numel()
    checks = [
        (scored_index.min() >= 0, "scored_index has entries < 0"),
        (scored_index.max() < t_rows, f"scored_index has entries >= T={t_rows}"),
        ((scored_index.sort().values.diff() != 0).all(), "scored_index has duplicate rows"),
    ]
    if pair_index is not None:
        checks += [
            (pair_index.min() >= 0, "pair_index has entries < 0"),
            (pair_index.max() < s, f"pair_index has entries >= S={s} (it indexes scored_index)"),
        ]
    for ok, msg in checks:
        if scored_index.device.type == "cuda":
            torch._assert_async(ok, msg)
        elif not bool(ok):
            raise ValueError(msg)


def _scored_rewards_ref(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    ct = _compute_dtype(hidden)
    rows = hidden.index_select(0, scored_index).to(ct)
    if norm_weight is not None:
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(ct)
    return rows @ head_weight.to(ct) + head_bias.to(ct).reshape(())


def pairwise_loss_from_rewards(
    rewards: torch.Tensor, pair_index: torch.Tensor, margin: torch.Tensor | None, center_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, accuracy)`` from ``rewards [S]`` - the loss part of the reference, also usable on its own."""
    diff = rewards[pair_index[:, 0]] - rewards[pair_index[:, 1]]
    accuracy = (diff.detach() > 0).float().mean()
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = F.softplus(-diff).mean()  # softplus(-d) == -logsigmoid(d), stable for any |d|
    if center_coef:
        loss = loss + center_coef * rewards.pow(2).mean()
    return loss, accuracy


def fused_reward_loss_ref(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    pair_index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of :func:`fused_reward_loss` (autograd through plain PyTorch ops)."""
    rewards = _scored_rewards_ref(hidden, scored_index, head_weight, head_bias, norm_weight, eps)
    loss, accuracy = pairwise_loss_from_rewards(rewards, pair_index, margin, center_coef)
    return loss, rewards, accuracy


@triton_jit
def _reward_fwd_kernel(
    h_ptr, idx_ptr, w_ptr, b_ptr, g_ptr, rewards_ptr, rstd_ptr, row_ok_ptr, n_rows, n_cols, n_scored, stride_t, eps,
    HAS_NORM: tl.constexpr, CHECK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr,
):
    s = tl.program_id(0)
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
def _zero_unscored_rows(
    z, idx_ptr, dh_ptr, n_rows, n_cols, n_scored,
    ZERO_ROWS: tl.constexpr, ZERO_COLS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # Rows [z * ZERO_ROWS, +ZERO_ROWS) of dL/dhidden get zeros unless scored (those belong to _scored_columns).
    # A scan of the S indices (L2-resident, S * 8 bytes) decides; it costs S / H compares per byte stored.
    rows = z * ZERO_ROWS + tl.arange(0, ZERO_ROWS)
    hits = tl.zeros([ZERO_ROWS], dtype=tl.int32)
    offs = tl.arange(0, BLOCK_I)
    for start in range(0, n_scored, BLOCK_I):
        i = start + offs
        idx = tl.load(idx_ptr + i, mask=i < n_scored, other=-1)
        hits += tl.sum((idx[None, :] == rows[:, None]).to(tl.int32), axis=1)
    keep = (rows < n_rows) & (hits == 0)
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
        _zero_unscored_rows(pid - n_col_tiles, idx_ptr, dh_ptr, n_rows, n_cols, n_scored,
                            ZERO_ROWS, ZERO_COLS, BLOCK_I)


def _block_h(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), 2048)


_BLOCK_I = 64  # scored indices per step of the index scans
_PAIR_BLOCK_S, _PAIR_BLOCK_P = 64, 64
_BWD_BLOCK_S, _BWD_BLOCK_C, _ZERO_ROWS, _ZERO_COLS = 32, 64, 8, 512


def reward_fwd(
    hidden: torch.Tensor, scored_index: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None, eps: float, check: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher: ``(rewards [S] fp32, rstd [S] fp32, row_ok [S] int32)``; rstd = 1 without a norm; row_ok
    is 0 where ``check`` found the scored row out of ``[0, T)`` or duplicated (always 1 without ``check``)."""
    s = scored_index.numel()
    rewards = torch.empty(s, dtype=torch.float32, device=hidden.device)
    rstd = torch.empty(s, dtype=torch.float32, device=hidden.device)
    row_ok = torch.empty(s, dtype=torch.int32, device=hidden.device)
    _reward_fwd_kernel[(s,)](
        hidden, scored_index, head_weight, head_bias, norm_weight if norm_weight is not None else head_weight,
        rewards, rstd, row_ok, hidden.shape[0], hidden.shape[1], s, hidden.stride(0), eps,
        HAS_NORM=norm_weight is not None, CHECK=check, BLOCK_H=_block_h(hidden.shape[1]), BLOCK_I=_BLOCK_I,
        num_warps=8,  # 4 warps spilled at BLOCK_H 2048 with the norm (sm_90, H a multiple of 16)
    )
    return rewards, rstd, row_ok


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
    _pair_loss_kernel[(triton.cdiv(s, _PAIR_BLOCK_S),)](
        rewards, pair_index, margin if margin is not None else rewards, row_ok, loss, acc, ok, coef, s, n_pairs,
        float(center_coef), HAS_MARGIN=margin is not None, CHECK=check, BLOCK_S=_PAIR_BLOCK_S,
        BLOCK_P=_PAIR_BLOCK_P, num_warps=4,
    )
    return loss, acc, ok, coef


def reward_loss_bwd(
    dloss: torch.Tensor, drewards: torch.Tensor | None, hidden: torch.Tensor, scored_index: torch.Tensor,
    head_weight: torch.Tensor, head_bias: torch.Tensor, norm_weight: torch.Tensor | None, rewards: torch.Tensor,
    rstd: torch.Tensor, coef: torch.Tensor, dhidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton launcher: ``(dhidden [T, H], dhead_weight [H], dhead_bias [1], dnorm_weight [H] | None)`` in one
    kernel. ``dhidden``: a contiguous ``[T, H]`` buffer whose contents do not matter (every row is written: the S
    scored rows with their gradient, the others with zeros); allocated uninitialised when None."""
    t_rows, n_cols = hidden.shape
    s = scored_index.numel()
    if dhidden is None:
        dhidden = torch.empty((t_rows, n_cols), dtype=hidden.dtype, device=hidden.device)
    if dhidden.shape != hidden.shape or dhidden.dtype != hidden.dtype or not dhidden.is_contiguous():
        raise ValueError(f"dhidden must be a contiguous {hidden.dtype} {tuple(hidden.shape)} buffer")
    dw = torch.empty_like(head_weight)
    db = torch.empty_like(head_bias)
    dg = torch.empty_like(norm_weight) if norm_weight is not None else None
    n_col_tiles = triton.cdiv(n_cols, _BWD_BLOCK_C)
    _reward_bwd_kernel[(n_col_tiles + triton.cdiv(t_rows, _ZERO_ROWS),)](
        hidden, scored_index, head_weight, head_bias, norm_weight if norm_weight is not None else head_weight,
        rewards, rstd, coef, dloss, drewards if drewards is not None else rewards, dhidden, dw,
        dg if dg is not None else dw, db, t_rows, n_cols, s, hidden.stride(0), n_col_tiles,
        HAS_NORM=norm_weight is not None, HAS_DREWARDS=drewards is not None, BLOCK_S=_BWD_BLOCK_S,
        BLOCK_C=_BWD_BLOCK_C, ZERO_ROWS=_ZERO_ROWS, ZERO_COLS=_ZERO_COLS, BLOCK_I=_BLOCK_I, num_warps=4,
    )
    return dhidden, dw, db, dg


_BAD_INDEX_MSG = (
    "fused_reward_loss: bad indices: scored_index must hold distinct rows in [0, T) and pair_index entries in "
    "[0, S) (a CPU run or backend='torch' names the exact check that failed)"
)


def _raise_on_bad_indices(ok: torch.Tensor, t_rows: int, scored_index: torch.Tensor,
                          pair_index: torch.Tensor | None) -> None:
    """Act on the kernels' index-check verdict ``ok`` (0-d, nonzero = fine): on CUDA one ``torch._assert_async``
    (no host sync); on CPU a ValueError naming the failed check."""
    if ok.device.type == "cuda":
        torch._assert_async(ok, _BAD_INDEX_MSG)
    elif not bool(ok):
        check_index_values(t_rows, scored_index, pair_index)  # raises with the exact reason
        raise RuntimeError("fused_reward_loss: the kernels' index check failed where the reference check passed "
                           "(a kernel bug)")


class FusedRewardLossFunction(torch.autograd.Function):
    """Autograd wrapper: forward = rewards of the scored rows + pair loss (2 kernels); backward = grads of hidden
    (every row, in the same kernel as the head/norm weight grads). ``impl`` is ``"triton"`` or ``"cuda"``;
    ``check`` runs the index checks inside the forward kernels (one ``_assert_async`` on CUDA)."""

    @staticmethod
    def forward(ctx, hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin,
                center_coef, impl, check):
        ops = _launchers(impl)
        rewards, rstd, row_ok = ops.reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps, check)
        loss, acc, ok, coef = ops.pair_loss_fwd(rewards, pair_index, margin, row_ok, center_coef, check)
        if check:
            _raise_on_bad_indices(ok, hidden.shape[0], scored_index, pair_index)
        ctx.save_for_backward(hidden, scored_index, head_weight, head_bias, norm_weight, rewards, rstd, coef)
        ctx.impl = impl
        ctx.mark_non_differentiable(acc)
        ctx.set_materialize_grads(False)  # an unused rewards output then costs no zero-filled gradient
        return loss, rewards, acc

    @staticmethod
    def backward(ctx, dloss, drewards, _dacc):
        hidden, scored_index, head_weight, head_bias, norm_weight, rewards, rstd, coef = ctx.saved_tensors
        dloss = dloss if dloss is not None else torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh, dw, db, dg = _launchers(ctx.impl).reward_loss_bwd(
            dloss.float().contiguous(), drewards.float().contiguous() if drewards is not None else None, hidden,
            scored_index, head_weight, head_bias, norm_weight, rewards, rstd, coef,
        )
        return dh, None, None, dw, db, dg, None, None, None, None, None


class _TritonLaunchers:
    reward_fwd = staticmethod(reward_fwd)
    pair_loss_fwd = staticmethod(pair_loss_fwd)
    reward_loss_bwd = staticmethod(reward_loss_bwd)


def _launchers(impl: str):
    if impl == "cuda":
        _load_cuda_ops()
        return CudaLaunchers
    return _TritonLaunchers


def _kernel_inputs(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin):
    """Kernels index rows with a row stride but need unit stride along H and contiguous small tensors."""
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    contig = [t.contiguous() if t is not None else None
              for t in (scored_index, pair_index, head_weight, head_bias.reshape(-1), norm_weight, margin)]
    return (hidden, *contig)


def fused_reward_loss(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    pair_index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    backend: str | None = None,
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reward head (+ optional final RMSNorm) on the scored rows and the pairwise Bradley-Terry loss.

    Args:
        hidden: ``[T, H]`` packed hidden states (fp32/fp16/bf16), before the final norm if ``norm_weight`` is given.
        scored_index: ``[S]`` int64, the row of ``hidden`` holding each sequence's scored token (unique rows).
        pair_index: ``[P, 2]`` int64 positions in ``scored_index``: (chosen, rejected). One chosen vs k rejected is
            k rows sharing the same chosen.
        head_weight: ``[H]``; head_bias: 0-d or ``[1]``; norm_weight: ``[H]`` or None (hidden is already normalised).
        margin: ``[P]`` or None: ``loss = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean(rewards**2)``.
        backend: ``"triton"``, ``"cuda"``, ``"torch"`` or None (automatic, see :mod:`vlr_kernels._backend`).
        check_indices: verify index bounds/uniqueness. triton/cuda: inside the forward kernels, reported by one
            ``torch._assert_async`` on CUDA (no host sync) or a ValueError on CPU; torch: with PyTorch ops.

    Returns:
        ``loss`` 0-d float32, ``rewards [S]`` float32 (the torch backend keeps float64 for float64 hidden),
        ``accuracy`` 0-d float32 =
        fraction of pairs with ``r_c > r_r`` (no gradient). Differentiable w.r.t. hidden, norm_weight, head_weight
        and head_bias.
    """
    check_reward_inputs(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin, False)
    name = resolve_backend("fused_reward_loss", hidden.device, backend, _BACKENDS)
    if name == "torch":
        if check_indices:
            check_index_values(hidden.shape[0], scored_index, pair_index)
        return fused_reward_loss_ref(
            hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin, center_coef
        )
    hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin = _kernel_inputs(
        hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, margin
    )
    loss, rewards, accuracy = FusedRewardLossFunction.apply(
        hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps, margin, center_coef, name,
        check_indices,
    )
    return loss, rewards, accuracy


@torch.no_grad()
def reward_scores(
    hidden: torch.Tensor,
    scored_index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Scoring only (no grad, no loss, one kernel): ``rewards [S]`` float32 for the scored rows of
    ``hidden [T, H]``. Arguments as in :func:`fused_reward_loss`."""
    check_reward_inputs(hidden, scored_index, None, head_weight, head_bias, norm_weight, None, False)
    name = resolve_backend("fused_reward_loss", hidden.device, backend, _BACKENDS)
    if name == "torch":
        if check_indices:
            check_index_values(hidden.shape[0], scored_index, None)
        return _scored_rewards_ref(hidden, scored_index, head_weight, head_bias, norm_weight, eps)
    hidden, scored_index, _, head_weight, head_bias, norm_weight, _ = _kernel_inputs(
        hidden, scored_index, None, head_weight, head_bias, norm_weight, None
    )
    rewards, _, row_ok = _launchers(name).reward_fwd(hidden, scored_index, head_weight, head_bias, norm_weight, eps,
                                                     check_indices)
    if check_indices:
        _raise_on_bad_indices(row_ok.all(), hidden.shape[0], scored_index, None)
    return rewards


class _GatherScoredRows(torch.autograd.Function):
    """Sequence-parallel gather of the scored rows: local rows in, all ``[S, H]`` rows out on every rank."""

    @staticmethod
    def forward(ctx, hidden_local, rows, is_local, group):
        out = torch.where(is_local[:, None], hidden_local.index_select(0, rows), 0)
        dist.all_reduce(out, group=group)
        ctx.save_for_backward(rows, is_local)
        ctx.num_local = hidden_local.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Every rank computes the same loss from the same rows, so each rank's local rows receive exactly the
        # replicated gradient; summing across ranks here would count it tp times.
        rows, is_local = ctx.saved_tensors
        grad = grad_out.new_zeros(ctx.num_local, grad_out.shape[1])
        grad.index_add_(0, rows, torch.where(is_local[:, None], grad_out, 0))
        return grad, None, None, None


def gather_scored_rows(
    hidden_local: torch.Tensor, scored_index: torch.Tensor, token_offset: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sequence-parallel helper: ``[S, H]`` scored rows on every rank of ``group``, differentiable, no host sync.

    Args:
        hidden_local: ``[T_local, H]`` this rank's slice of the packed tokens, global rows
            ``[token_offset, token_offset + T_local)``.
        scored_index: ``[S]`` int64 *global* row indices (the same tensor on every rank).
    Returns ``[S, H]``; call :func:`fused_reward_loss` on it with ``scored_index = arange(S)``.

    The loss, and the head/norm weight gradients it yields, are then complete and identical on every rank: do not
    all-reduce those weight gradients again across the group (e.g. a final-norm weight that megatron marks
    ``sequence_parallel`` gets its gradient all-reduced over TP; apply that norm in the model, or pass it here only
    if its gradient is not reduced again).
    """
    if hidden_local.dim() != 2 or scored_index.dim() != 1 or scored_index.dtype != torch.int64:
        raise ValueError("gather_scored_rows needs hidden_local [T_local, H] and scored_index [S] int64")
    local_rows = scored_index - token_offset
    is_local = (local_rows >= 0) & (local_rows < hidden_local.shape[0])
    rows = local_rows.clamp(0, hidden_local.shape[0] - 1)  # rows of other ranks read a valid row, then masked
    return _GatherScoredRows.apply(hidden_local, rows, is_local, group)
