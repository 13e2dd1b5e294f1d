"""One-tile varlen attention kernels: every segment fits ONE ``BLOCK x BLOCK`` tile (the ViT's <= 64-token
windows), so a program needs no loop over key blocks and no online softmax.

One program per (segment, group of q heads) runs a head loop whose body is straight-line code (load, two or
five small dots, store); ``tl.range(..., num_stages=STAGES)`` software-pipelines it, so (at 3 stages, see
:func:`window_candidates`) the loads of head ``h + 1`` are in flight while head ``h`` computes - the
windows workload is memory-bound (~0.24 ms floor fwd+bwd on an H200) and the one-program-per-(window,
head) kernels issue their loads, then wait, then compute. A program also finds its segment without the tile
map (program ``i`` is segment ``i``: one tile per segment, empty ones exit) and amortises the segment lookup
over its heads. The ``PERSIST`` variant instead launches a few programs per SM, each looping over a run of
consecutive (segment, head) items with the segment bounds carried from item to item, so that its pipeline
stays full from the first item to the last (see :func:`window_candidates`).

The backward computes ``delta`` in the same program (the general path runs a separate pass that reads O and
dO once more) and writes dQ, dK and dV directly: a one-tile segment has one contributor to each of them.
``delta = rowsum(O * dO)`` with P from the saved LSE, or (``RECOMPUTE=1``) - the tile holding whole rows - P
from the forward's softmax again and ``delta = rowsum(P * dP)``, equal for ``O = P V``: O and LSE unread, 4
of 5 ``[T, H, D]`` reads (-12.5% of the bytes with the three gradient writes); ``RECOMPUTE=2``: P from the
saved LSE and delta from ``P * dP`` (O unread, one row reduction instead of three). GQA: a program owns whole kv
heads and sums their group's dK/dV in registers.

The launchers offer these kernels to the launch tuner next to the general ones (varlen_triton); they take
no shared-prompt metadata (windows are plain segments).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from vlr_kernels._backend import sm_count
from vlr_kernels._triton_compat import cdiv, next_power_of_2
from vlr_kernels.attention.varlen_tiles import (
    LN2,
    LOG2E,
    NEW_ENV,
    allowed,
    load_head,
    new_candidate_allowed,
    scores,
    store_rows,
)


@triton.jit
def _softmax_parts(s, ok):
    """The whole rows of scaled scores ``s`` (log2 units) under mask ``ok``: unnormalised ``p = exp2(s - m)``,
    the row shift ``m``, row sums ``l``, rows without any key (``empty``) and ``1 / l`` (1 for those)."""
    s = tl.where(ok, s, float("-inf"))
    m = tl.max(s, 1)
    # rows that see no key keep max -inf; shifting them by 0 keeps every exp2 at exactly 0
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m_safe[:, None])
    l_i = tl.sum(p, 1)
    empty = l_i == 0.0
    return p, m_safe, l_i, empty, 1.0 / tl.where(empty, 1.0, l_i)


@triton.jit
def _masks(len_q, len_k, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Offsets, row and column masks over the one tile of a segment of ``len_q`` x ``len_k``, and its
    attention mask ([queries, keys]; ``TRANSPOSED``: [keys, queries])."""
    offs = tl.arange(0, BLOCK)
    if TRANSPOSED:
        ok = allowed(offs[None, :], offs[:, None], len_k, len_k - len_q, 0, 0, CAUSAL, False)
    else:
        ok = allowed(offs[:, None], offs[None, :], len_k, len_k - len_q, 0, 0, CAUSAL, False)
    return offs, offs < len_q, offs < len_k, ok


@triton.jit
def _window(cu_q, cu_k, seg, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Segment ``seg``'s q/k starts, row and column masks over the one tile, and its attention mask."""
    q_start = tl.load(cu_q + seg)
    k_start = tl.load(cu_k + seg)
    offs, row_ok, col_ok, ok = _masks(tl.load(cu_q + seg + 1) - q_start, tl.load(cu_k + seg + 1) - k_start,
                                      CAUSAL, BLOCK, TRANSPOSED)
    return q_start.to(tl.int64), k_start.to(tl.int64), offs, row_ok, col_ok, ok


@triton.jit
def _first_item(cu_q, cu_k, per, n_items, heads):
    """A persistent program's first (segment, head) item, its item count (program ``p`` owns the ``per`` items
    from ``p * per``, the last one fewer) and the segment's q and k bounds."""
    start = tl.program_id(0) * per
    seg = start // heads
    return (seg, start - seg * heads, tl.minimum(per, n_items - start), tl.load(cu_q + seg),
            tl.load(cu_q + seg + 1), tl.load(cu_k + seg), tl.load(cu_k + seg + 1))


@triton.jit
def _next_item(cu_q, cu_k, seg, h, heads, n_items, q_lo, q_hi, k_lo, k_hi):
    """The (segment, head) item after ``(seg, h)`` in segment-major order, with its segment's bounds:
    counters and bounds carried from item to item. The software pipeliner issues an item's tile loads
    ``STAGES - 1`` items ahead only when their addresses come from carried values; with ``cu_q[seg]`` loaded
    in the item itself (as :func:`_window` does) triton 3.9 issued them and waited at once (sm_90 TTGIR:
    ``async_wait num = 0``, shared memory of one stage)."""
    h = h + 1
    wrap = h == heads
    seg = tl.where(wrap, seg + 1, seg)
    more = (seg + 1) * heads <= n_items  # the last item's successor is past the last segment
    next_q = tl.load(cu_q + seg + 1, mask=more, other=0)
    next_k = tl.load(cu_k + seg + 1, mask=more, other=0)
    return (seg, tl.where(wrap, 0, h), tl.where(wrap, q_hi, q_lo), next_q, tl.where(wrap, k_hi, k_lo),
            next_k)


@triton.jit
def _fwd_head(Q, K, V, Out, LSE, q_start, k_start, offs, row_ok, col_ok, ok, h, stride_qt, stride_qh,
              stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, total_q, qk_scale,
              GROUP: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr,
              PREC: tl.constexpr):
    """Output rows and LSE of q head ``h`` in one window."""
    hk = h // GROUP
    q0, q1 = load_head(Q + q_start * stride_qt + h * stride_qh, offs, row_ok, stride_qt, D0, D1, HEAD_DIM)
    k0, k1 = load_head(K + k_start * stride_kt + hk * stride_kh, offs, col_ok, stride_kt, D0, D1, HEAD_DIM)
    v0, v1 = load_head(V + k_start * stride_vt + hk * stride_vh, offs, col_ok, stride_vt, D0, D1, HEAD_DIM)
    p, m_safe, l_i, empty, inv_l = _softmax_parts(scores(q0, q1, k0, k1, D1, PREC) * qk_scale, ok)
    pv = p.to(v0.dtype)
    o_base = Out + q_start * stride_ot + h * stride_oh
    store_rows(o_base, offs, row_ok, stride_ot, tl.dot(pv, v0, input_precision=PREC) * inv_l[:, None], 0,
               D0, HEAD_DIM)
    if D1 > 0:
        store_rows(o_base, offs, row_ok, stride_ot, tl.dot(pv, v1, input_precision=PREC) * inv_l[:, None],
                   D0, D1, HEAD_DIM)
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(LSE + h.to(tl.int64) * total_q + q_start + offs, lse, mask=row_ok)


@triton.jit
def _window_fwd_kernel(
    Q, K, V, Out, LSE, cu_q, cu_k, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, total_q, qk_scale, per, n_items, heads,
    GROUP: tl.constexpr, HEADS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, D0: tl.constexpr,
    D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
    PERSIST: tl.constexpr,
):
    """``PERSIST``: a grid of a few programs per SM, each looping over ``per`` consecutive (window, q head)
    items of the ``n_items = windows x heads``; else one program per window and ``HEADS`` q heads."""
    if PERSIST:
        seg, h, n, q_lo, q_hi, k_lo, k_hi = _first_item(cu_q, cu_k, per, n_items, heads)
        for _ in tl.range(0, n, num_stages=STAGES):
            offs, row_ok, col_ok, ok = _masks(q_hi - q_lo, k_hi - k_lo, CAUSAL, BLOCK)
            _fwd_head(Q, K, V, Out, LSE, q_lo.to(tl.int64), k_lo.to(tl.int64), offs, row_ok, col_ok, ok, h,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                      total_q, qk_scale, GROUP, D0, D1, HEAD_DIM, PREC)
            seg, h, q_lo, q_hi, k_lo, k_hi = _next_item(cu_q, cu_k, seg, h, heads, n_items, q_lo, q_hi, k_lo,
                                                        k_hi)
    else:
        h0 = tl.program_id(1) * HEADS
        q_start, k_start, offs, row_ok, col_ok, ok = _window(cu_q, cu_k, tl.program_id(0), CAUSAL, BLOCK)
        for i in tl.range(0, HEADS, num_stages=STAGES):
            _fwd_head(Q, K, V, Out, LSE, q_start, k_start, offs, row_ok, col_ok, ok, h0 + i, stride_qt,
                      stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, total_q,
                      qk_scale, GROUP, D0, D1, HEAD_DIM, PREC)


@triton.jit
def _delta_from_out(o_base, offs, row_ok, stride_ot, do0, do1, D0: tl.constexpr, D1: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
    """``rowsum(O * dO)`` of one head's rows (fp32), O read from ``o_base``."""
    o0, o1 = load_head(o_base, offs, row_ok, stride_ot, D0, D1, HEAD_DIM)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    return delta


@triton.jit
def _bwd_head(
    Q, K, V, Out, DO, LSE, DQ, DK, DV, q_off, k_off, offs, row_ok, col_ok, ok, hk, stride_qt, stride_qh,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt,
    stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, total_q, qk_scale, sm_scale,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr, RECOMPUTE: tl.constexpr, KV_MAJOR: tl.constexpr = False,
):
    """dK, dV of kv head ``hk`` in one window and dQ of its ``GROUP`` q heads (``KV_MAJOR``: the products
    computed transposed, keys as rows; ``ok`` then [keys, queries]; RECOMPUTE 0 or 2 only)."""
    k0, k1 = load_head(K + k_off * stride_kt + hk * stride_kh, offs, col_ok, stride_kt, D0, D1, HEAD_DIM)
    v0, v1 = load_head(V + k_off * stride_vt + hk * stride_vh, offs, col_ok, stride_vt, D0, D1, HEAD_DIM)
    dk0 = tl.zeros((BLOCK, D0), tl.float32)
    dv0 = tl.zeros((BLOCK, D0), tl.float32)
    dk1 = tl.zeros((BLOCK, D1 if D1 > 0 else 16), tl.float32)
    dv1 = tl.zeros((BLOCK, D1 if D1 > 0 else 16), tl.float32)
    for g in tl.static_range(GROUP):
        h = hk * GROUP + g
        q0, q1 = load_head(Q + q_off * stride_qt + h * stride_qh, offs, row_ok, stride_qt, D0, D1, HEAD_DIM)
        do0, do1 = load_head(DO + q_off * stride_dot + h * stride_doh, offs, row_ok, stride_dot, D0, D1,
                             HEAD_DIM)
        if RECOMPUTE == 0:
            delta = _delta_from_out(Out + q_off * stride_ot + h * stride_oh, offs, row_ok, stride_ot, do0, do1,
                                    D0, D1, HEAD_DIM)
        if RECOMPUTE != 1:
            lse = tl.load(LSE + h.to(tl.int64) * total_q + q_off + offs, mask=row_ok, other=0.0) * LOG2E
        if KV_MAJOR:
            # S^T = K Q^T: P^T and dS^T come out of their products already as the left operands of dV = P^T dO
            # and dK = dS^T Q, so only dS is transposed (for dQ = dS K); ``ok`` is the transposed mask here
            p_t = tl.where(ok, tl.exp2(scores(k0, k1, q0, q1, D1, PREC) * qk_scale - lse[None, :]), 0.0)
            dp_t = scores(v0, v1, do0, do1, D1, PREC)
            if RECOMPUTE != 0:
                delta = tl.sum(p_t * dp_t, 0)  # over the keys: a column sum of P^T * dP^T
            dst = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
            pt = p_t.to(q0.dtype)
            ds = tl.trans(dst)
        else:
            if RECOMPUTE == 1:
                # the tile holds whole rows: the forward's softmax again instead of reading LSE
                p, _, _, _, inv_l = _softmax_parts(scores(q0, q1, k0, k1, D1, PREC) * qk_scale, ok)
                p = p * inv_l[:, None]
            else:
                p = tl.where(ok, tl.exp2(scores(q0, q1, k0, k1, D1, PREC) * qk_scale - lse[:, None]), 0.0)
            dp = scores(do0, do1, v0, v1, D1, PREC)
            if RECOMPUTE != 0:
                # rowsum(P * dP) = rowsum(dO * O) for O = P V, without reading O (nor its bf16 rounding)
                delta = tl.sum(p * dp, 1)
            ds = (p * (dp - delta[:, None])).to(q0.dtype)
            pt = tl.trans(p.to(q0.dtype))
            dst = tl.trans(ds)
        dv0 = tl.dot(pt, do0, dv0, input_precision=PREC)
        dk0 = tl.dot(dst, q0, dk0, input_precision=PREC)
        dq_base = DQ + q_off * stride_dqt + h * stride_dqh
        store_rows(dq_base, offs, row_ok, stride_dqt, tl.dot(ds, k0, input_precision=PREC) * sm_scale, 0,
                   D0, HEAD_DIM)
        if D1 > 0:
            dv1 = tl.dot(pt, do1, dv1, input_precision=PREC)
            dk1 = tl.dot(dst, q1, dk1, input_precision=PREC)
            store_rows(dq_base, offs, row_ok, stride_dqt, tl.dot(ds, k1, input_precision=PREC) * sm_scale,
                       D0, D1, HEAD_DIM)
    dk_base = DK + k_off * stride_dkt + hk * stride_dkh
    dv_base = DV + k_off * stride_dvt + hk * stride_dvh
    store_rows(dk_base, offs, col_ok, stride_dkt, dk0 * sm_scale, 0, D0, HEAD_DIM)
    store_rows(dv_base, offs, col_ok, stride_dvt, dv0, 0, D0, HEAD_DIM)
    if D1 > 0:
        store_rows(dk_base, offs, col_ok, stride_dkt, dk1 * sm_scale, D0, D1, HEAD_DIM)
        store_rows(dv_base, offs, col_ok, stride_dvt, dv1, D0, D1, HEAD_DIM)


@triton.jit
def _window_bwd_kernel(
    Q, K, V, Out, DO, LSE, DQ, DK, DV, cu_q, cu_k, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
    stride_vh, stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
    stride_dvt, stride_dvh, total_q, qk_scale, sm_scale, per, n_items, heads,
    GROUP: tl.constexpr, HEADS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
    RECOMPUTE: tl.constexpr, PERSIST: tl.constexpr, KV_MAJOR: tl.constexpr = False,
):
    """Items are (window, kv head); ``PERSIST`` and ``HEADS`` as in the forward, ``heads`` = kv heads."""
    if PERSIST:
        seg, hk, n, q_lo, q_hi, k_lo, k_hi = _first_item(cu_q, cu_k, per, n_items, heads)
        for _ in tl.range(0, n, num_stages=STAGES):
            offs, row_ok, col_ok, ok = _masks(q_hi - q_lo, k_hi - k_lo, CAUSAL, BLOCK, KV_MAJOR)
            _bwd_head(Q, K, V, Out, DO, LSE, DQ, DK, DV, q_lo.to(tl.int64), k_lo.to(tl.int64), offs, row_ok,
                      col_ok, ok, hk, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt,
                      stride_dkh, stride_dvt, stride_dvh, total_q, qk_scale, sm_scale, GROUP, BLOCK, D0, D1,
                      HEAD_DIM, PREC, RECOMPUTE, KV_MAJOR)
            seg, hk, q_lo, q_hi, k_lo, k_hi = _next_item(cu_q, cu_k, seg, hk, heads, n_items, q_lo, q_hi, k_lo,
                                                         k_hi)
    else:
        hk0 = tl.program_id(1) * HEADS
        q_off, k_off, offs, row_ok, col_ok, ok = _window(cu_q, cu_k, tl.program_id(0), CAUSAL, BLOCK, KV_MAJOR)
        for i in tl.range(0, HEADS, num_stages=STAGES):
            _bwd_head(Q, K, V, Out, DO, LSE, DQ, DK, DV, q_off, k_off, offs, row_ok, col_ok, ok, hk0 + i,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                      stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt,
                      stride_dvh, total_q, qk_scale, sm_scale, GROUP, BLOCK, D0, D1, HEAD_DIM, PREC, RECOMPUTE,
                      KV_MAJOR)


def window_candidates(head_dim: int, max_seqlen_q: int, max_seqlen_k: int, heads: int, group: int,
                      kernel: str, new: bool | None = None) -> list[dict[str, int]]:
    """One-tile configurations (``WINDOW`` marks them for the launchers) for ``fwd`` or ``dkdv`` when every
    segment fits a 64-row tile and ``head_dim <= 96`` (the vision tower's class, which the sm_90 compile test
    covers), else none. ``HEADS`` (q heads for ``fwd``, kv heads for ``dkdv``) per program where they divide
    ``heads``; ``STAGES`` of the head loop's pipeline. With triton 3.9 at sm_90 a 2-stage loop waits for ALL
    its copies at the top of each iteration (``async_wait num=0`` in the TTGIR): no load overlaps the math of
    the same program, only other programs' (fwd: 68 KiB of shared memory, 3 programs per SM); 3 stages keep
    the next head's loads in flight (fwd 98 KiB: 2 per SM; bwd 154.5 KiB). The backward needs 8 warps (4
    spill; at sm_90, hd 80 its 219-255 registers a thread then allow one program per SM whatever the shared
    memory) and ``group == 1`` (its unrolled GQA loop does not fit shared memory at group 7).

    ``dkdv`` also offers each of its configurations with ``RECOMPUTE`` (after the measured ones, the first of
    which stays the default): the softmax and delta recomputed in the tile instead of reading O and LSE, 4
    instead of 5 ``[T, H, D]`` reads (ViT windows, 32,604 tokens x 16 heads x hd 80 in bf16, with the dQ, dK,
    dV writes: ~584 instead of ~667 MB). At sm_90, non-causal hd 80: 223 registers and 104 KiB of shared
    memory at 4 heads x 2 stages (O-reading: 244, 104.25 KiB), 219 and 144 KiB at 2 x 3 (255, 154.5 KiB);
    no spills (at 4 warps it spills).

    Last come the ``PERSIST`` configurations: ``PROGS`` programs per SM, each looping over a contiguous run of
    (window, head) items, so its pipeline stays full across windows. A 2-head program's loop has 2 iterations:
    its 3-stage pipeline loads both heads, computes them and ends, and at one backward program per SM the
    next program's loads start only then (run C, H100: the backward moved 1.76 TB/s, ~59% of copy). The
    persistent loop of ~66 items per SM (8,720 items of the ViT windows over 132 SMs) overlaps the loads of
    items ``i + 1 ...`` with the math of item ``i`` for the whole kernel and has no wave tail. At sm_90, hd 80
    (TTGIR waits and ptxas): forward 160 / 184 / 186 registers, 68 / 98 / 128 KiB at 2 / 3 / 4 stages;
    backward (recomputing) 223 / 229 registers, 144 / 184 KiB at 3 / 4 stages, the next 1 / 2 items' loads in
    flight (``async_wait num = 8 / 16``); no spills. The O-reading backward spills 8 bytes in this loop: not
    offered. Then the shapes of ``_MORE_BWD`` (two 4-warp programs per SM: H200 run G's pick; 16 warps), the
    ``RECOMPUTE=2`` ones (8 warps, P from the saved LSE) and the ``KV_MAJOR`` ones. A configuration in
    ``_NEW_WINDOWS`` (none since run G ran them all) has not run on a GPU: it reaches the tuner per
    :func:`~vlr_kernels.attention.varlen_tiles.new_candidate_allowed` (``new`` False: none). The list's order
    is the tests' and the tuner's; :func:`window_default` says which one an untuned launch takes."""
    key = (head_dim, max_seqlen_q, max_seqlen_k, heads, group, kernel, new, os.environ.get(NEW_ENV), _NEW_WINDOWS)
    if key not in _CANDIDATES:  # once per arguments, environment and new set (called on every launch), copied out
        _CANDIDATES[key] = _window_candidates(head_dim, max_seqlen_q, max_seqlen_k, heads, group, kernel, new)
    return [dict(cfg) for cfg in _CANDIDATES[key]]


_CANDIDATES: dict[tuple, list[dict[str, int]]] = {}


def _window_candidates(head_dim: int, max_seqlen_q: int, max_seqlen_k: int, heads: int, group: int,
                       kernel: str, new: bool | None) -> list[dict[str, int]]:
    if max(max_seqlen_q, max_seqlen_k) > 64 or head_dim > 96 or (kernel == "dkdv" and group != 1):
        return []
    block = max(16, next_power_of_2(max(max_seqlen_q, max_seqlen_k, 1)))
    warps = 4 if kernel == "fwd" else 8
    base = {"WINDOW": 1, "BLOCK": block, "num_warps": warps, "num_stages": 2}
    shapes = [{**base, "HEADS": n, "STAGES": stages, "PERSIST": 0} for n, stages in ((4, 2), (2, 3))
              if heads % n == 0]
    # forward: 3 programs per SM fit at 2 stages (68 KiB), 2 at 3 (98 KiB), 1 at 4 (128 KiB); backward: one per
    # SM at 8 warps (registers), recomputing only (the O-reading one spills in the persistent loop at sm_90),
    # then the shapes of _MORE_BWD
    shapes_p = ((3, 2, warps), (2, 3, warps), (1, 4, warps)) if kernel == "fwd" else (
        (1, 3, warps), (1, 4, warps), *_MORE_BWD)
    persist = [{**base, "num_warps": w, "HEADS": 1, "STAGES": stages, "PERSIST": 1, "PROGS": progs}
               for progs, stages, w in shapes_p]
    if kernel == "fwd":
        found = shapes + persist
    else:
        found = [{**cfg, "RECOMPUTE": r} for r in (0, 1) for cfg in shapes] + [
            {**cfg, "RECOMPUTE": 1} for cfg in persist] + [
            {**cfg, "RECOMPUTE": 2} for cfg in persist if cfg["num_warps"] == 8] + [
            {**cfg, "RECOMPUTE": r, "KV_MAJOR": 1} for r in (0, 2) for cfg in persist if cfg["num_warps"] == 8]
    return [cfg for cfg in found if not _is_new(kernel, cfg) or new_candidate_allowed(kernel, head_dim, cfg, new)]


# Persistent backward shapes (programs per SM, stages, warps) added after H200 run E, where the 8-warp one at one
# program per SM moved its 584 MB at 48% of the copy ceiling (0.284 ms; the forward reached 77%): a program
# holds one (window, head) item's five dependent 64x64 products at a time, and with one program per SM nothing
# else runs while they wait on each other. sm_90 (triton 3.9, hd 80, recomputing): 4 warps at 2 stages are 253
# registers and 104 KiB, so TWO programs fit an SM (2 x 128 threads x 256 registers = the 64K register file,
# 208 of 227 KiB): one's loads and math overlap the other's; 16 warps at 3 / 2 stages are 128 registers (the
# same items' element-wise softmax, dS and conversions spread over twice the threads), 144 / 104 KiB, one
# program per SM. No spills (4 warps at 3 stages spill 40 B: not offered). H200 run G: the two 4-warp programs
# 0.198 ms against 0.288 for the 8-warp one (70% of copy against 48%); 16 warps 0.40-0.49 ms.
_MORE_BWD = ((2, 2, 4), (1, 3, 16), (1, 2, 16))
# RECOMPUTE=2 (after run E too): P from the forward's LSE (2 MB for the ViT windows, not O's 83 MB) and delta =
# rowsum(P * dP): of the three row reductions of the recomputing backward (max, sum, delta) only delta is left;
# with 8 warps the two warpgroups split each 64-column row, so every row reduction is an exchange through shared
# memory and a barrier. sm_90: 231 / 237 registers at 3 / 4 stages, no spills (4 and 16 warps spill: not offered)


# KV_MAJOR (after run E too): the products computed transposed, S^T = K Q^T and dP^T = V dO^T, as FlashAttention-2's
# dK/dV kernel does: P^T and dS^T are then already the left operands of dV = P^T dO and dK = dS^T Q, and only dS is
# transposed through shared memory (for dQ), one round trip of the two per item; with the LSE (RECOMPUTE 2: delta
# a column sum) or O (RECOMPUTE 0: no reduction over the tile at all, at +83 MB read). sm_90, 8 warps, 3 / 4
# stages: 236 / 244 registers (LSE), 252 / 252 (O; the q-major O-reading loop spills 8 B), no spills


def window_key(cfg: dict[str, int]) -> tuple[int, ...]:
    """A persistent backward window configuration as (PROGS, STAGES, num_warps, RECOMPUTE, KV_MAJOR)."""
    return (cfg["PROGS"], cfg["STAGES"], cfg["num_warps"], cfg.get("RECOMPUTE", 0), cfg.get("KV_MAJOR", 0))


# Persistent dK/dV window configurations (window_key) that have not run on a GPU yet. Empty: H200 run G (5e09106)
# ran every one offered (all their GPU tests passed, the tuner timed them); the next ones go here.
_NEW_WINDOWS: frozenset[tuple[int, ...]] = frozenset()


def _is_new(kernel: str, cfg: dict[str, int]) -> bool:
    """A window candidate that has not run on a GPU yet (see ``_NEW_WINDOWS``)."""
    return kernel == "dkdv" and bool(cfg["PERSIST"]) and window_key(cfg) in _NEW_WINDOWS


# The configuration an untuned launch on a GPU takes (VLR_TUNE=0, a launch under CUDA-graph capture before any
# tuning): H200 run G's tuner picks for the ViT windows. Forward: 4 heads a program at 2 stages (0.0998 ms in the
# tuner's loop; the general table's default tile 0.349 ms); backward: two 4-warp persistent recomputing programs per
# SM (0.198 ms; the general default dK/dV tile 0.509 ms, plus its dQ pass).
_DEFAULT = {"fwd": {"PERSIST": 0, "HEADS": 4, "STAGES": 2},
            "dkdv": {"PERSIST": 1, "PROGS": 2, "STAGES": 2, "num_warps": 4, "RECOMPUTE": 1, "KV_MAJOR": 0}}


def window_default(kernel: str, cands: list[dict[str, int]]) -> dict[str, int] | None:
    """The candidate of ``cands`` (a :func:`window_candidates` list) that an untuned GPU launch takes: the one
    matching ``_DEFAULT[kernel]`` (absent keys count as 0), else the first; None for an empty list."""
    want = _DEFAULT[kernel]
    match = [c for c in cands if all(c.get(k, 0) == v for k, v in want.items())]
    return match[0] if match else (cands[0] if cands else None)


def window_grid(cfg: dict[str, int], n_seg: int, heads: int, device) -> tuple[tuple[int, ...], dict[str, int]]:
    """Grid of a window kernel launch and its runtime item arguments (``per``, ``n_items``, ``heads``), from
    a :func:`window_candidates` configuration (``PROGS`` x the device's SMs persistent programs, each owning
    ``per`` consecutive (window, head) items; the interpreter counts 3 SMs, so that a CPU test's programs
    cross windows inside their loops and the last one gets fewer items)."""
    n_items = n_seg * heads
    if not cfg["PERSIST"]:
        return (n_seg, heads // cfg["HEADS"]), {"per": 0, "n_items": n_items, "heads": heads}
    programs = cfg["PROGS"] * (sm_count(device) if device.type == "cuda" else 3)
    per = max(1, cdiv(n_items, max(1, min(programs, n_items))))
    return (max(1, cdiv(n_items, per)),), {"per": per, "n_items": n_items, "heads": heads}
