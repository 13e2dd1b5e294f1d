"""One-tile varlen attention kernels: every segment fits ONE ``BLOCK x BLOCK`` tile (the ViT's <= 64-token
windows), so a program needs no loop over key blocks and no online softmax.

One program per (segment, group of q heads) runs a head loop whose body is straight-line code (load, two or
five small dots, store); ``tl.range(..., num_stages=STAGES)`` software-pipelines it, so (at 3 stages, see
:func:`window_candidates`) the loads of head ``h + 1`` are in flight while head ``h`` computes - the
windows workload is memory-bound (~0.24 ms floor fwd+bwd on an H200) and the one-program-per-(window,
head) kernels issue their loads, then wait, then compute. A program also finds its segment without the tile
map (program ``i`` is segment ``i``: one tile per segment, empty ones exit) and amortises the segment lookup
over its heads.

The backward computes ``delta`` in the same program (the general path runs a separate pass that reads O and
dO once more) and writes dQ, dK and dV directly: a one-tile segment has one contributor to each of them.
``delta = rowsum(O * dO)`` with P from the saved LSE, or (``RECOMPUTE``) - the tile holding whole rows - P
from the forward's softmax again and ``delta = rowsum(P * dP)``, equal for ``O = P V``: O and LSE unread, 4
of 5 ``[T, H, D]`` reads (-12.5% of the bytes with the three gradient writes). GQA: a program owns whole kv
heads and sums their group's dK/dV in registers.

The launchers offer these kernels to the launch tuner next to the general ones (varlen_triton); they take
no shared-prompt metadata (windows are plain segments).
"""

from __future__ import annotations

import triton
import triton.language as tl
from vlr_kernels.attention.varlen_tiles import LN2, LOG2E, allowed, load_head, scores, store_rows


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
def _window(cu_q, cu_k, seg, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """Segment ``seg``'s q/k starts, row and column masks over the one tile, and its attention mask."""
    q_start = tl.load(cu_q + seg)
    len_q = tl.load(cu_q + seg + 1) - q_start
    k_start = tl.load(cu_k + seg)
    len_k = tl.load(cu_k + seg + 1) - k_start
    offs = tl.arange(0, BLOCK)
    ok = allowed(offs[:, None], offs[None, :], len_k, len_k - len_q, 0, 0, CAUSAL, False)
    return q_start.to(tl.int64), k_start.to(tl.int64), offs, offs < len_q, offs < len_k, ok


@triton.jit
def _window_fwd_kernel(
    Q, K, V, Out, LSE, cu_q, cu_k, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, total_q, qk_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, D0: tl.constexpr,
    D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
):
    h0 = tl.program_id(1) * HEADS
    q_start, k_start, offs, row_ok, col_ok, ok = _window(cu_q, cu_k, tl.program_id(0), CAUSAL, BLOCK)
    q_seg = Q + q_start * stride_qt
    k_seg = K + k_start * stride_kt
    v_seg = V + k_start * stride_vt
    o_seg = Out + q_start * stride_ot
    for i in tl.range(0, HEADS, num_stages=STAGES):
        h = h0 + i
        hk = h // GROUP
        q0, q1 = load_head(q_seg + h * stride_qh, offs, row_ok, stride_qt, D0, D1, HEAD_DIM)
        k0, k1 = load_head(k_seg + hk * stride_kh, offs, col_ok, stride_kt, D0, D1, HEAD_DIM)
        v0, v1 = load_head(v_seg + hk * stride_vh, offs, col_ok, stride_vt, D0, D1, HEAD_DIM)
        p, m_safe, l_i, empty, inv_l = _softmax_parts(scores(q0, q1, k0, k1, D1, PREC) * qk_scale, ok)
        pv = p.to(v0.dtype)
        o_base = o_seg + h * stride_oh
        store_rows(o_base, offs, row_ok, stride_ot, tl.dot(pv, v0, input_precision=PREC) * inv_l[:, None], 0,
                   D0, HEAD_DIM)
        if D1 > 0:
            store_rows(o_base, offs, row_ok, stride_ot, tl.dot(pv, v1, input_precision=PREC) * inv_l[:, None],
                       D0, D1, HEAD_DIM)
        lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
        tl.store(LSE + h.to(tl.int64) * total_q + q_start + offs, lse, mask=row_ok)


@triton.jit
def _window_bwd_kernel(
    Q, K, V, Out, DO, LSE, DQ, DK, DV, cu_q, cu_k, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
    stride_vh, stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
    stride_dvt, stride_dvh, total_q, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
    RECOMPUTE: tl.constexpr,
):
    hk0 = tl.program_id(1) * HEADS
    q_off, k_off, offs, row_ok, col_ok, ok = _window(cu_q, cu_k, tl.program_id(0), CAUSAL, BLOCK)
    for i in tl.range(0, HEADS, num_stages=STAGES):
        hk = hk0 + i
        k0, k1 = load_head(K + k_off * stride_kt + hk * stride_kh, offs, col_ok, stride_kt, D0, D1, HEAD_DIM)
        v0, v1 = load_head(V + k_off * stride_vt + hk * stride_vh, offs, col_ok, stride_vt, D0, D1, HEAD_DIM)
        dk0 = tl.zeros((BLOCK, D0), tl.float32)
        dv0 = tl.zeros((BLOCK, D0), tl.float32)
        dk1 = tl.zeros((BLOCK, D1 if D1 > 0 else 16), tl.float32)
        dv1 = tl.zeros((BLOCK, D1 if D1 > 0 else 16), tl.float32)
        for g in tl.static_range(GROUP):
            h = hk * GROUP + g
            q0, q1 = load_head(Q + q_off * stride_qt + h * stride_qh, offs, row_ok, stride_qt, D0, D1,
                               HEAD_DIM)
            do0, do1 = load_head(DO + q_off * stride_dot + h * stride_doh, offs, row_ok, stride_dot, D0, D1,
                                 HEAD_DIM)
            if RECOMPUTE:
                # the tile holds whole rows: the forward's softmax again instead of reading LSE
                p, _, _, _, inv_l = _softmax_parts(scores(q0, q1, k0, k1, D1, PREC) * qk_scale, ok)
                p = p * inv_l[:, None]
            else:
                o0, o1 = load_head(Out + q_off * stride_ot + h * stride_oh, offs, row_ok, stride_ot, D0, D1,
                                   HEAD_DIM)
                delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
                if D1 > 0:
                    delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
                lse = tl.load(LSE + h.to(tl.int64) * total_q + q_off + offs, mask=row_ok, other=0.0) * LOG2E
                p = tl.where(ok, tl.exp2(scores(q0, q1, k0, k1, D1, PREC) * qk_scale - lse[:, None]), 0.0)
            dp = scores(do0, do1, v0, v1, D1, PREC)
            if RECOMPUTE:
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


def window_candidates(head_dim: int, max_seqlen_q: int, max_seqlen_k: int, heads: int, group: int,
                      kernel: str) -> list[dict[str, int]]:
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
    no spills (at 4 warps it spills)."""
    if max(max_seqlen_q, max_seqlen_k) > 64 or head_dim > 96 or (kernel == "dkdv" and group != 1):
        return []
    block = max(16, triton.next_power_of_2(max(max_seqlen_q, max_seqlen_k, 1)))
    warps = 4 if kernel == "fwd" else 8
    shapes = [{"WINDOW": 1, "BLOCK": block, "HEADS": n, "STAGES": stages, "num_warps": warps, "num_stages": 2}
              for n, stages in ((4, 2), (2, 3)) if heads % n == 0]
    if kernel == "fwd":
        return shapes
    return [{**cfg, "RECOMPUTE": recompute} for recompute in (0, 1) for cfg in shapes]
