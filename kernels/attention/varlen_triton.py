"""FlashAttention-2 style Triton kernels for :func:`vlr_kernels.varlen_attention` (semantics in that module).

Work decomposition. Every segment is cut into ``cdiv(len, BLOCK)`` tiles; ``cu_tiles`` (a device-side prefix
sum, no host sync) numbers the tiles of all segments consecutively and each program finds its segment by a
binary search. The grid is therefore ``min(cdiv(T + N*(BLOCK-1), BLOCK), N*cdiv(max_seqlen, BLOCK))`` tiles
per head: tight for 545 windows of <= 64 tokens as for one 16k-token image, and ``max_seqlen`` only bounds it.

Forward: one program per (q tile, q head); online softmax in the exp2 domain; saves ``lse [Hq, Tq]`` (natural
log, ``-inf`` for rows that see no key). Backward (recompute, no atomics, deterministic): ``delta = rowsum(dO
* O)``; one program per (kv tile, kv head) accumulates dK/dV over all q heads of its GQA group; one program
per (q tile, q head) accumulates dQ. The KV (or Q) range of a tile is split into blocks that need no mask
(bulk of the work) and boundary blocks that do (segment end, causal diagonal, the chosen part of a
shared-prompt pair). Blocks that a rejected-only q tile cannot see (the chosen part) are skipped, which is
where shared-prompt pairs save their work.

head_dim is covered by two power-of-two chunks ``D0 + D1`` (80 = 64 + 16, 96 = 64 + 32) instead of padding to
the next power of two (80 -> 128 would waste 37% of the matmul work).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = 1.4426950408889634
LN2: tl.constexpr = 0.6931471805599453


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """Split ``head_dim`` into power-of-two chunks ``(D0, D1)`` (``D1 = 0``: one); tl.dot needs >= 16."""
    if head_dim > 256:
        raise ValueError(f"varlen_attention (triton): head_dim must be <= 256, got {head_dim}")
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


@triton.jit
def _segment_of_tile(cu_tiles, tile, n_seg):
    """Largest segment ``s`` with ``cu_tiles[s] <= tile`` (``n_seg`` when the tile is past the last one)."""
    lo = tile * 0
    hi = tile * 0 + n_seg
    while lo < hi:
        mid = (lo + hi + 1) // 2
        go_right = tl.load(cu_tiles + mid) <= tile
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo


@triton.jit
def _allowed(rows, cols, len_k, diff, prefix, split, CAUSAL: tl.constexpr, SHARED: tl.constexpr):
    """(q row, k col) pairs of one segment that may attend; ``diff = len_k - len_q`` aligns causal ends."""
    ok = cols < len_k
    if CAUSAL:
        ok = ok & (cols <= rows + diff)
    if SHARED:
        ok = ok & ((rows < split) | (cols < prefix) | (cols >= split))
    return ok


@triton.jit
def _load_rows(base, rows, row_ok, stride_t, offs_d, HEAD_DIM: tl.constexpr):
    """``[len(rows), len(offs_d)]`` tile of a ``[T, H, D]`` tensor (``base`` already points at the head)."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(base, rows, row_ok, stride_t, offs_d, val, HEAD_DIM: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _kv_ranges(m0, len_q, len_k, prefix, split, CAUSAL: tl.constexpr, SHARED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KV column ranges of the q tile at row ``m0``: ``[0, full_hi)`` needs no mask, ``[full_hi, hi1)``
    and ``[lo2, hi)`` do; the gap ``[hi1, lo2)`` is the chosen part that a rejected-only tile never sees."""
    diff = len_k - len_q
    hi = len_k
    full_hi = (len_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + diff), 0)
        full_hi = tl.minimum(full_hi, tl.maximum((m0 + diff + 1) // BLOCK_N, 0) * BLOCK_N)
    hi1 = hi
    lo2 = hi
    if SHARED:
        sees_split = m0 + BLOCK_M > split
        full_hi = tl.where(sees_split, tl.minimum(full_hi, (prefix // BLOCK_N) * BLOCK_N), full_hi)
        rejected_only = m0 >= split
        hi1 = tl.where(rejected_only, tl.minimum(hi, tl.cdiv(prefix, BLOCK_N) * BLOCK_N), hi)
        lo2 = tl.where(rejected_only, tl.maximum(hi1, (split // BLOCK_N) * BLOCK_N), hi)
    full_hi = tl.minimum(full_hi, hi1)
    return full_hi, hi1, lo2, hi


@triton.jit
def _fwd_blocks(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d0, offs_d1,
                lo, hi, len_k, diff, prefix, split, qk_scale,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, SHARED: tl.constexpr, BLOCK_N: tl.constexpr,
                D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < len_k
        k0 = _load_rows(k_base, offs_n, col_ok, stride_kt, offs_d0, HEAD_DIM)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        if D1 > 0:
            k1 = _load_rows(k_base, offs_n, col_ok, stride_kt, offs_d1, HEAD_DIM)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
        s = s * qk_scale
        if MASK:
            ok = _allowed(offs_m[:, None], offs_n[None, :], len_k, diff, prefix, split, CAUSAL, SHARED)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no key yet keep max -inf; shifting them by 0 keeps every exp2 at exactly 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(v_base.dtype.element_ty)
        v0 = _load_rows(v_base, offs_n, col_ok, stride_vt, offs_d0, HEAD_DIM)
        acc0 = tl.dot(pv, v0, acc0 * alpha[:, None], input_precision=PREC)
        if D1 > 0:
            v1 = _load_rows(v_base, offs_n, col_ok, stride_vt, offs_d1, HEAD_DIM)
            acc1 = tl.dot(pv, v1, acc1 * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc0, acc1, m_i, l_i


@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, Out, LSE, cu_q, cu_k, cu_tiles, prefix_lens, split_lens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    n_seg, total_q, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SHARED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    hq = tl.program_id(1)
    seg = _segment_of_tile(cu_tiles, tile, n_seg)
    if seg < n_seg:
        q_start = tl.load(cu_q + seg)
        len_q = tl.load(cu_q + seg + 1) - q_start
        k_start = tl.load(cu_k + seg)
        len_k = tl.load(cu_k + seg + 1) - k_start
        # the last tiles of a causal segment have the most work: schedule them first
        m0 = (tl.load(cu_tiles + seg + 1) - 1 - tile) * BLOCK_M
        prefix = 0
        split = 0
        if SHARED:
            prefix = tl.load(prefix_lens + seg)
            split = tl.load(split_lens + seg)
        hk = hq // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < len_q
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
        q_base = Q + q_start.to(tl.int64) * stride_qt + hq * stride_qh
        k_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh
        q0 = _load_rows(q_base, offs_m, row_ok, stride_qt, offs_d0, HEAD_DIM)
        q1 = q0
        if D1 > 0:
            q1 = _load_rows(q_base, offs_m, row_ok, stride_qt, offs_d1, HEAD_DIM)
        acc0 = tl.zeros((BLOCK_M, D0), tl.float32)
        acc1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        diff = len_k - len_q
        full_hi, hi1, lo2, hi = _kv_ranges(m0, len_q, len_k, prefix, split, CAUSAL, SHARED, BLOCK_M, BLOCK_N)
        acc0, acc1, m_i, l_i = _fwd_blocks(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                           offs_m, offs_d0, offs_d1, 0, full_hi, len_k, diff, prefix, split,
                                           qk_scale, False, CAUSAL, SHARED, BLOCK_N, D1, HEAD_DIM, PREC)
        acc0, acc1, m_i, l_i = _fwd_blocks(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                           offs_m, offs_d0, offs_d1, full_hi, hi1, len_k, diff, prefix, split,
                                           qk_scale, True, CAUSAL, SHARED, BLOCK_N, D1, HEAD_DIM, PREC)
        if SHARED:
            acc0, acc1, m_i, l_i = _fwd_blocks(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt,
                                               stride_vt, offs_m, offs_d0, offs_d1, lo2, hi, len_k, diff,
                                               prefix, split, qk_scale, True, CAUSAL, SHARED, BLOCK_N, D1,
                                               HEAD_DIM, PREC)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        o_base = Out + q_start.to(tl.int64) * stride_ot + hq * stride_oh
        _store_rows(o_base, offs_m, row_ok, stride_ot, offs_d0, acc0 / l_safe[:, None], HEAD_DIM)
        if D1 > 0:
            _store_rows(o_base, offs_m, row_ok, stride_ot, offs_d1, acc1 / l_safe[:, None], HEAD_DIM)
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
        tl.store(LSE + hq.to(tl.int64) * total_q + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _delta_kernel(Out, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total_q,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``delta[h, t] = sum_d O[t, h, d] * dO[t, h, d]`` in fp32."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < total_q
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + h * stride_oh, rows, ok, stride_ot, offs_d, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO + h * stride_doh, rows, ok, stride_dot, offs_d, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + h.to(tl.int64) * total_q + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _q_ranges(n0, len_q, len_k, prefix, split, CAUSAL: tl.constexpr, SHARED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Q row ranges that see the kv tile starting at column ``n0``: ``[lo, full_lo)`` and ``[full_hi, hi)``
    need a mask, ``[full_lo, full_hi)`` does not. Rows past the segment end load as zeros and contribute
    exactly 0."""
    diff = len_k - len_q
    lo = n0 * 0
    hi = len_q
    full_lo = lo
    full_hi = hi
    if CAUSAL:
        lo = (tl.maximum(n0 - diff, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diff, 0), BLOCK_M) * BLOCK_M
    if SHARED:
        touches_chosen = (n0 < split) & (n0 + BLOCK_N > prefix)
        chosen_only = (n0 >= prefix) & (n0 + BLOCK_N <= split)
        hi = tl.where(chosen_only, tl.minimum(hi, split), hi)
        full_hi = tl.where(touches_chosen, (split // BLOCK_M) * BLOCK_M, full_hi)
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _dkdv_blocks(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_ptr, delta_ptr, stride_qt,
                 stride_dot, offs_n, offs_d0, offs_d1, lo, hi, len_q, len_k, diff, prefix, split, qk_scale,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr, SHARED: tl.constexpr, BLOCK_M: tl.constexpr,
                 D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < len_q
        q0 = _load_rows(q_base, offs_m, row_ok, stride_qt, offs_d0, HEAD_DIM)
        st = tl.dot(k0, tl.trans(q0), input_precision=PREC)
        if D1 > 0:
            q1 = _load_rows(q_base, offs_m, row_ok, stride_qt, offs_d1, HEAD_DIM)
            st = tl.dot(k1, tl.trans(q1), st, input_precision=PREC)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0) * LOG2E
        pt = tl.exp2(st * qk_scale - lse[None, :])
        if MASK:
            ok = _allowed(offs_m[None, :], offs_n[:, None], len_k, diff, prefix, split, CAUSAL, SHARED)
            pt = tl.where(ok, pt, 0.0)
        p_in = pt.to(q_base.dtype.element_ty)
        do0 = _load_rows(do_base, offs_m, row_ok, stride_dot, offs_d0, HEAD_DIM)
        dv0 = tl.dot(p_in, do0, dv0, input_precision=PREC)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=PREC)
        if D1 > 0:
            do1 = _load_rows(do_base, offs_m, row_ok, stride_dot, offs_d1, HEAD_DIM)
            dv1 = tl.dot(p_in, do1, dv1, input_precision=PREC)
            dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=PREC)
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        ds = (pt * (dpt - delta[None, :])).to(q_base.dtype.element_ty)
        dk0 = tl.dot(ds, q0, dk0, input_precision=PREC)
        if D1 > 0:
            dk1 = tl.dot(ds, q1, dk1, input_precision=PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _varlen_attn_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_q, cu_k, cu_tiles, prefix_lens, split_lens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    n_seg, total_q, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SHARED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    seg = _segment_of_tile(cu_tiles, tile, n_seg)
    if seg < n_seg:
        q_start = tl.load(cu_q + seg)
        len_q = tl.load(cu_q + seg + 1) - q_start
        k_start = tl.load(cu_k + seg)
        len_k = tl.load(cu_k + seg + 1) - k_start
        n0 = (tile - tl.load(cu_tiles + seg)) * BLOCK_N
        prefix = 0
        split = 0
        if SHARED:
            prefix = tl.load(prefix_lens + seg)
            split = tl.load(split_lens + seg)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < len_k
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
        k_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh
        k0 = _load_rows(k_base, offs_n, col_ok, stride_kt, offs_d0, HEAD_DIM)
        v0 = _load_rows(v_base, offs_n, col_ok, stride_vt, offs_d0, HEAD_DIM)
        k1 = k0
        v1 = v0
        if D1 > 0:
            k1 = _load_rows(k_base, offs_n, col_ok, stride_kt, offs_d1, HEAD_DIM)
            v1 = _load_rows(v_base, offs_n, col_ok, stride_vt, offs_d1, HEAD_DIM)
        dk0 = tl.zeros((BLOCK_N, D0), tl.float32)
        dv0 = tl.zeros((BLOCK_N, D0), tl.float32)
        dk1 = tl.zeros((BLOCK_N, D1 if D1 > 0 else 16), tl.float32)
        dv1 = tl.zeros((BLOCK_N, D1 if D1 > 0 else 16), tl.float32)
        diff = len_k - len_q
        lo, full_lo, full_hi, hi = _q_ranges(n0, len_q, len_k, prefix, split, CAUSAL, SHARED, BLOCK_M,
                                             BLOCK_N)
        # dK/dV of a kv head sum over the q heads of its GQA group here, in registers, instead of with atomics
        for g in range(GROUP):
            hq = hk * GROUP + g
            q_base = Q + q_start.to(tl.int64) * stride_qt + hq * stride_qh
            do_base = DO + q_start.to(tl.int64) * stride_dot + hq * stride_doh
            lse_ptr = LSE + hq.to(tl.int64) * total_q + q_start
            delta_ptr = DELTA + hq.to(tl.int64) * total_q + q_start
            dk0, dk1, dv0, dv1 = _dkdv_blocks(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_ptr,
                                              delta_ptr, stride_qt, stride_dot, offs_n, offs_d0, offs_d1,
                                              lo, full_lo, len_q, len_k, diff, prefix, split, qk_scale,
                                              True, CAUSAL, SHARED, BLOCK_M, D1, HEAD_DIM, PREC)
            dk0, dk1, dv0, dv1 = _dkdv_blocks(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_ptr,
                                              delta_ptr, stride_qt, stride_dot, offs_n, offs_d0, offs_d1,
                                              full_lo, full_hi, len_q, len_k, diff, prefix, split, qk_scale,
                                              False, CAUSAL, SHARED, BLOCK_M, D1, HEAD_DIM, PREC)
            dk0, dk1, dv0, dv1 = _dkdv_blocks(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_ptr,
                                              delta_ptr, stride_qt, stride_dot, offs_n, offs_d0, offs_d1,
                                              full_hi, hi, len_q, len_k, diff, prefix, split, qk_scale,
                                              True, CAUSAL, SHARED, BLOCK_M, D1, HEAD_DIM, PREC)
        dk_base = DK + k_start.to(tl.int64) * stride_dkt + hk * stride_dkh
        dv_base = DV + k_start.to(tl.int64) * stride_dvt + hk * stride_dvh
        _store_rows(dk_base, offs_n, col_ok, stride_dkt, offs_d0, dk0 * sm_scale, HEAD_DIM)
        _store_rows(dv_base, offs_n, col_ok, stride_dvt, offs_d0, dv0, HEAD_DIM)
        if D1 > 0:
            _store_rows(dk_base, offs_n, col_ok, stride_dkt, offs_d1, dk1 * sm_scale, HEAD_DIM)
            _store_rows(dv_base, offs_n, col_ok, stride_dvt, offs_d1, dv1, HEAD_DIM)


@triton.jit
def _dq_blocks(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d0,
               offs_d1, lo, hi, len_k, diff, prefix, split, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, SHARED: tl.constexpr, BLOCK_N: tl.constexpr,
               D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < len_k
        k0 = _load_rows(k_base, offs_n, col_ok, stride_kt, offs_d0, HEAD_DIM)
        v0 = _load_rows(v_base, offs_n, col_ok, stride_vt, offs_d0, HEAD_DIM)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PREC)
        if D1 > 0:
            k1 = _load_rows(k_base, offs_n, col_ok, stride_kt, offs_d1, HEAD_DIM)
            v1 = _load_rows(v_base, offs_n, col_ok, stride_vt, offs_d1, HEAD_DIM)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK:
            ok = _allowed(offs_m[:, None], offs_n[None, :], len_k, diff, prefix, split, CAUSAL, SHARED)
            p = tl.where(ok, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k_base.dtype.element_ty)
        dq0 = tl.dot(ds, k0, dq0, input_precision=PREC)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=PREC)
    return dq0, dq1


@triton.jit
def _varlen_attn_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, cu_q, cu_k, cu_tiles, prefix_lens, split_lens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt,
    stride_dqh, n_seg, total_q, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SHARED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    hq = tl.program_id(1)
    seg = _segment_of_tile(cu_tiles, tile, n_seg)
    if seg < n_seg:
        q_start = tl.load(cu_q + seg)
        len_q = tl.load(cu_q + seg + 1) - q_start
        k_start = tl.load(cu_k + seg)
        len_k = tl.load(cu_k + seg + 1) - k_start
        m0 = (tl.load(cu_tiles + seg + 1) - 1 - tile) * BLOCK_M
        prefix = 0
        split = 0
        if SHARED:
            prefix = tl.load(prefix_lens + seg)
            split = tl.load(split_lens + seg)
        hk = hq // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < len_q
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
        q_base = Q + q_start.to(tl.int64) * stride_qt + hq * stride_qh
        do_base = DO + q_start.to(tl.int64) * stride_dot + hq * stride_doh
        k_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh
        q0 = _load_rows(q_base, offs_m, row_ok, stride_qt, offs_d0, HEAD_DIM)
        do0 = _load_rows(do_base, offs_m, row_ok, stride_dot, offs_d0, HEAD_DIM)
        q1 = q0
        do1 = do0
        if D1 > 0:
            q1 = _load_rows(q_base, offs_m, row_ok, stride_qt, offs_d1, HEAD_DIM)
            do1 = _load_rows(do_base, offs_m, row_ok, stride_dot, offs_d1, HEAD_DIM)
        lse = tl.load(LSE + hq.to(tl.int64) * total_q + q_start + offs_m, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + hq.to(tl.int64) * total_q + q_start + offs_m, mask=row_ok, other=0.0)
        dq0 = tl.zeros((BLOCK_M, D0), tl.float32)
        dq1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), tl.float32)
        diff = len_k - len_q
        full_hi, hi1, lo2, hi = _kv_ranges(m0, len_q, len_k, prefix, split, CAUSAL, SHARED, BLOCK_M, BLOCK_N)
        dq0, dq1 = _dq_blocks(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
                              offs_m, offs_d0, offs_d1, 0, full_hi, len_k, diff, prefix, split, qk_scale,
                              False, CAUSAL, SHARED, BLOCK_N, D1, HEAD_DIM, PREC)
        dq0, dq1 = _dq_blocks(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
                              offs_m, offs_d0, offs_d1, full_hi, hi1, len_k, diff, prefix, split, qk_scale,
                              True, CAUSAL, SHARED, BLOCK_N, D1, HEAD_DIM, PREC)
        if SHARED:
            dq0, dq1 = _dq_blocks(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt,
                                  stride_vt, offs_m, offs_d0, offs_d1, lo2, hi, len_k, diff, prefix, split,
                                  qk_scale, True, CAUSAL, SHARED, BLOCK_N, D1, HEAD_DIM, PREC)
        dq_base = DQ + q_start.to(tl.int64) * stride_dqt + hq * stride_dqh
        _store_rows(dq_base, offs_m, row_ok, stride_dqt, offs_d0, dq0 * sm_scale, HEAD_DIM)
        if D1 > 0:
            _store_rows(dq_base, offs_m, row_ok, stride_dqt, offs_d1, dq1 * sm_scale, HEAD_DIM)


def _tile_prefix(cu_seqlens: torch.Tensor, block: int) -> torch.Tensor:
    """``[N+1]`` int32 prefix sum of ``cdiv(segment length, block)``, on the device (no host sync)."""
    tiles = (cu_seqlens[1:] - cu_seqlens[:-1] + (block - 1)) // block
    return torch.nn.functional.pad(torch.cumsum(tiles, 0, dtype=torch.int32), (1, 0))


def _grid_tiles(total: int, n_seg: int, max_seqlen: int, block: int) -> int:
    """Upper bound on the number of tiles of all segments, from host-known sizes only."""
    return min(triton.cdiv(total + n_seg * (block - 1), block), n_seg * triton.cdiv(max_seqlen, block))


def _block(max_seqlen: int, cap: int) -> int:
    """Smallest power-of-two tile (>= 16, tl.dot's minimum) covering ``max_seqlen``, capped at ``cap``."""
    return min(cap, max(16, triton.next_power_of_2(max(int(max_seqlen), 1))))


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs are the CPU-test / reference dtype: keep them exact instead of TF32 on GPU
    return "ieee" if dtype == torch.float32 else None


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def varlen_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    prefix_lens: torch.Tensor | None = None,
    split_lens: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher (inputs already validated). Returns ``out [Tq, Hq, D]`` and ``lse [Hq, Tq]`` fp32
    (natural log). ``block_m``/``block_n`` override the tile sizes (tests use them to exercise multi-tile
    paths)."""
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    tq, hq, d = q.shape
    n_seg = cu_seqlens_q.numel() - 1
    d0, d1 = head_dim_chunks(d)
    bm = block_m or _block(max_seqlen_q, 128)
    bn = block_n or _block(max_seqlen_k, 64 if d <= 128 else 32)
    out = torch.empty_like(q)
    lse = torch.full((hq, tq), float("-inf"), device=q.device, dtype=torch.float32)
    n_tiles = _grid_tiles(tq, n_seg, max_seqlen_q, bm)
    if n_tiles == 0 or hq == 0:
        return out.zero_(), lse
    shared = prefix_lens is not None
    _varlen_attn_fwd_kernel[(n_tiles, hq)](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, _tile_prefix(cu_seqlens_q, bm),
        prefix_lens if shared else cu_seqlens_q, split_lens if shared else cu_seqlens_q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        out.stride(1), n_seg, tq, softmax_scale * LOG2E,
        GROUP=hq // k.shape[1], CAUSAL=causal, SHARED=shared, BLOCK_M=bm, BLOCK_N=bn, D0=d0, D1=d1,
        HEAD_DIM=d, PREC=_precision(q.dtype), num_warps=8 if bm >= 128 else 4,
        num_stages=3 if d <= 128 else 2,
    )
    return out, lse


def varlen_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    prefix_lens: torch.Tensor | None = None,
    split_lens: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: ``dq [Tq, Hq, D]``, ``dk, dv [Tk, Hkv, D]`` from ``dout [Tq, Hq, D]`` and the saved
    ``out``/``lse`` of :func:`varlen_attention_fwd`."""
    q, k, v, out, dout = (_rows_contiguous(x) for x in (q, k, v, out, dout))
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    n_seg = cu_seqlens_q.numel() - 1
    d0, d1 = head_dim_chunks(d)
    bm = block_m or _block(max_seqlen_q, 64)
    bn = block_n or _block(max_seqlen_k, 64)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if tq == 0 or tk == 0 or hq == 0 or n_seg == 0:
        return dq, dk, dv
    delta = torch.empty((hq, tq), device=q.device, dtype=torch.float32)
    block_t = 64
    _delta_kernel[(triton.cdiv(tq, block_t), hq)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), tq,
        BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d), HEAD_DIM=d,
    )
    shared = prefix_lens is not None
    meta = dict(GROUP=hq // hkv, CAUSAL=causal, SHARED=shared, BLOCK_M=bm, BLOCK_N=bn, D0=d0, D1=d1,
                HEAD_DIM=d, PREC=_precision(q.dtype), num_warps=4, num_stages=2)
    seg_meta = (cu_seqlens_q, cu_seqlens_k)
    pair_meta = (prefix_lens, split_lens) if shared else (cu_seqlens_q, cu_seqlens_q)
    common_strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      dout.stride(0), dout.stride(1))
    kv_tiles = _grid_tiles(tk, n_seg, max_seqlen_k, bn)
    if kv_tiles > 0:
        _varlen_attn_dkdv_kernel[(kv_tiles, hkv)](
            q, k, v, dout, lse, delta, dk, dv, *seg_meta, _tile_prefix(cu_seqlens_k, bn), *pair_meta,
            *common_strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            n_seg, tq, softmax_scale * LOG2E, softmax_scale, **meta,
        )
    q_tiles = _grid_tiles(tq, n_seg, max_seqlen_q, bm)
    if q_tiles > 0:
        _varlen_attn_dq_kernel[(q_tiles, hq)](
            q, k, v, dout, lse, delta, dq, *seg_meta, _tile_prefix(cu_seqlens_q, bm), *pair_meta,
            *common_strides, dq.stride(0), dq.stride(1),
            n_seg, tq, softmax_scale * LOG2E, softmax_scale, **meta,
        )
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton forward/backward (arguments as :func:`vlr_kernels.varlen_attention`)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                prefix_lens, split_lens):
        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        causal, softmax_scale, prefix_lens, split_lens)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, split_lens)
        ctx.meta = (max_seqlen_q, max_seqlen_k, causal, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k, prefix_lens, split_lens = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.meta
        dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale,
                                          prefix_lens, split_lens)
        return dq, dk, dv, None, None, None, None, None, None, None, None
