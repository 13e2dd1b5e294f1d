"""Tile bookkeeping shared by the varlen attention kernels (:mod:`vlr_kernels.attention.varlen_triton`,
:mod:`vlr_kernels.attention.varlen_windows`): the device-side tile schedule over segments, the attention mask
rule, head-dim chunked row loads/stores and scores, the per-tile ranges of blocks that need a mask, and the
host-side launch sizes."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from vlr_kernels._triton_compat import cdiv, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """Split ``head_dim`` into power-of-two chunks ``(D0, D1)`` (``D1 = 0``: one); tl.dot needs >= 16."""
    if head_dim > 256:
        raise ValueError(f"varlen_attention (triton): head_dim must be <= 256, got {head_dim}")
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (0 if rest <= 0 else max(16, next_power_of_2(rest)))


@triton.jit
def allowed(rows, cols, len_k, diff, prefix, split, CAUSAL: tl.constexpr, SHARED: tl.constexpr):
    """(q row, k col) pairs of one segment that may attend; ``diff = len_k - len_q`` aligns causal ends."""
    ok = cols < len_k
    if CAUSAL:
        ok = ok & (cols <= rows + diff)
    if SHARED:
        ok = ok & ((rows < split) | (cols < prefix) | (cols >= split))
    return ok


@triton.jit
def _rows_ptrs_mask(base, rows, row_ok, stride_t, D_START: tl.constexpr, WIDTH: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
    offs_d = D_START + tl.arange(0, WIDTH)
    # rows are segment-local (the 64-bit segment offset is in ``base``): 32-bit offsets keep registers free
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    mask = row_ok[:, None]
    if D_START + WIDTH > HEAD_DIM:  # only a padded chunk pays for a column mask
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return ptrs, mask


@triton.jit
def load_rows(base, rows, row_ok, stride_t, D_START: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """``[len(rows), WIDTH]`` tile (columns ``D_START...``) of a ``[T, H, D]`` tensor; ``base`` points at the
    head."""
    ptrs, mask = _rows_ptrs_mask(base, rows, row_ok, stride_t, D_START, WIDTH, HEAD_DIM)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def load_head(base, rows, ok, stride_t, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Both head-dim chunks ``(x0 [rows, D0], x1 [rows, D1])`` of one head's rows (``x1`` is a dummy copy of
    ``x0`` when ``D1 == 0``)."""
    x0 = load_rows(base, rows, ok, stride_t, 0, D0, HEAD_DIM)
    x1 = x0
    if D1 > 0:
        x1 = load_rows(base, rows, ok, stride_t, D0, D1, HEAD_DIM)
    return x0, x1


@triton.jit
def scores(a0, a1, b0, b1, D1: tl.constexpr, PREC: tl.constexpr):
    """``a @ b^T`` over both head-dim chunks (fp32 accumulation)."""
    s = tl.dot(a0, tl.trans(b0), input_precision=PREC)
    if D1 > 0:
        s = tl.dot(a1, tl.trans(b1), s, input_precision=PREC)
    return s


@triton.jit
def store_rows(base, rows, row_ok, stride_t, val, D_START: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    ptrs, mask = _rows_ptrs_mask(base, rows, row_ok, stride_t, D_START, WIDTH, HEAD_DIM)
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def put_rows(base, rows, row_ok, stride_t, val, D_START: tl.constexpr, WIDTH: tl.constexpr,
             HEAD_DIM: tl.constexpr, ATOMIC: tl.constexpr):
    """:func:`store_rows`, or with ``ATOMIC`` ``base[rows, D_START:...] += val`` (fp32 buffer), relaxed: no
    ordering with other memory, only the sum."""
    if ATOMIC:
        ptrs, mask = _rows_ptrs_mask(base, rows, row_ok, stride_t, D_START, WIDTH, HEAD_DIM)
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        store_rows(base, rows, row_ok, stride_t, val, D_START, WIDTH, HEAD_DIM)


@triton.jit
def kv_ranges(m0, len_q, len_k, prefix, split, CAUSAL: tl.constexpr, SHARED: tl.constexpr,
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
def q_ranges(n0, len_q, len_k, prefix, split, CAUSAL: tl.constexpr, SHARED: tl.constexpr,
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


def tile_prefix(cu_seqlens: torch.Tensor, block: int) -> torch.Tensor:
    """``[N+1]`` int32 prefix sum of ``cdiv(segment length, block)``, on the device (no host sync)."""
    tiles = (cu_seqlens[1:] - cu_seqlens[:-1] + (block - 1)) // block
    return torch.nn.functional.pad(torch.cumsum(tiles, 0, dtype=torch.int32), (1, 0))


def tile_schedule(cu_seqlens: torch.Tensor, block: int,
                  n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cu_tiles [N+1], tile_seg [n_tiles])`` int32 on the device, no host sync: the tile prefix sum and,
    for each of the grid's ``n_tiles`` tiles, its segment (``N`` for grid tiles past the last one). A program
    then finds its segment with one load; a binary search over ``cu_tiles`` costs log2(N) dependent loads (~10
    for the 545 ViT windows) before the program can start its real loads."""
    cu_tiles = tile_prefix(cu_seqlens, block)
    tiles = torch.arange(n_tiles, device=cu_seqlens.device, dtype=torch.int32)
    return cu_tiles, torch.searchsorted(cu_tiles[1:], tiles, right=True, out_int32=True)


def grid_tiles(total: int, n_seg: int, max_seqlen: int, block: int) -> int:
    """Upper bound on the number of tiles of all segments, from host-known sizes only."""
    return min(cdiv(total + n_seg * (block - 1), block), n_seg * cdiv(max_seqlen, block))


def pick_block(max_seqlen: int, cap: int) -> int:
    """Smallest power-of-two tile (>= 16, tl.dot's minimum) covering ``max_seqlen``, capped at ``cap``."""
    return min(cap, max(16, next_power_of_2(max(int(max_seqlen), 1))))


def dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs are the CPU-test / reference dtype: keep them exact instead of TF32 on GPU
    return "ieee" if dtype == torch.float32 else None


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class Tile(NamedTuple):
    """One launch candidate of a kernel, at full size (tiles shrink to short segments)."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    flat: bool = False  # dkdv: one loop over (q head, q block) pairs, see varlen_triton._dkdv_flat
    split: bool = False  # dkdv: one program per q head, fp32 partial dK/dV that the launcher sums per kv head
    atomic: bool = False  # dkdv: also dQ, added to an fp32 buffer with atomics (no dQ pass)
    shared: bool = True  # also a candidate for shared-prompt pairs (False: that specialisation spills)
    # never run on a GPU yet (added after the last run of its workload): new_candidate_allowed. Every entry below
    # ran in H200 run E (43dc1ce) or, the 3-stage 128x64 dQ tile with the shared-prompt mask, run G (5e09106): all
    # their GPU tests passed and the tuner timed them (benchmarks/NOTES.md)
    new: bool = False
    shared_new: bool = False  # new only in the shared-prompt specialisation


# Candidates per kernel and head-dim class. The first entry is the default; the others are alternatives
# that the launch tuner (vlr_kernels._tune) times once per problem shape on the device. Every entry compiles
# for sm_90a at bf16 without register spills (ptxas via triton 3.9, GQA group 7 at head_dim 128, causal and,
# unless ``shared=False``, shared-prompt pairs; tests/kernels/test_attention_compile.py checks them all).
_TABLES = {
    96: {"fwd": (Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(128, 128, 8, 3)),
         # 64x128 (215 registers at hd 80) and 128x64 (250): the wider dK/dV tiles of FlashAttention-2's
         # backward, for the ViT's full-attention layers (up to 8,100-token images); spill-free on sm_90
         "dkdv": (Tile(64, 64, 4, 2), Tile(32, 64, 4, 2), Tile(64, 64, 8, 2), Tile(64, 128, 8, 2),
                  Tile(128, 64, 8, 2),
                  # FlashAttention-2's dQ: each kv tile's program adds dS K to an fp32 buffer, so S and dP are
                  # computed once (5 matmuls a tile pair instead of 7 with the separate dQ pass)
                  Tile(64, 64, 8, 2, atomic=True, shared=False),
                  Tile(64, 128, 8, 2, atomic=True, shared=False),
                  # 3 stages: the q-block loop keeps the next block's copies in flight (at 2 it waits for all of
                  # them, so only other programs' math hides a load); sm_90 hd 80: 220 / 218 registers, 81 / 101
                  # KiB (2 / 1 programs per SM), atomic 229 / 240, 105 / 133 KiB
                  Tile(64, 64, 4, 3, shared=False), Tile(64, 128, 8, 3, shared=False),
                  Tile(64, 64, 4, 3, atomic=True, shared=False),
                  Tile(64, 128, 8, 3, atomic=True, shared=False)),
         # 3 stages as for dK/dV (sm_90 hd 80: 168 / 182 registers, 80 / 100 KiB)
         "dq": (Tile(64, 64, 4, 2), Tile(128, 32, 8, 2), Tile(128, 64, 8, 2),
                Tile(64, 64, 4, 3, shared=False), Tile(128, 64, 8, 3, shared=False))},
    128: {"fwd": (Tile(128, 64, 8, 3), Tile(64, 64, 8, 3), Tile(128, 32, 8, 3)),
          # The nested head loop fits only 16-row q blocks; the flat loop fits 32x64 (191 regs), 32x128
          # (244) and, without the shared-prompt mask, 64x64 (249). 2 stages: the loop waits for all its
          # copies at the top of each iteration (TTGIR async_wait num=0), so loads overlap only other
          # programs' math; 3 keep the next block's loads in flight (more shared memory: fewer programs/SM).
          "dkdv": (Tile(16, 64, 8, 2), Tile(16, 128, 8, 2), Tile(32, 32, 8, 2), Tile(32, 64, 8, 3, flat=True),
                   Tile(32, 128, 8, 2, flat=True), Tile(32, 128, 8, 3, flat=True),
                   Tile(64, 64, 8, 2, flat=True, shared=False), Tile(64, 64, 8, 3, flat=True, shared=False),
                   Tile(32, 128, 8, 2, flat=True, split=True),
                   # atomic dQ (see the hd-80 class): sm_90 230 / 252 registers (255 with the shared-prompt mask), no
                   # spills; ~2-4 GB of fp32 atomics for the LLM workload against its ~0.85 ms dQ pass
                   Tile(32, 64, 8, 3, flat=True, atomic=True),
                   Tile(32, 128, 8, 3, flat=True, atomic=True)),
          # run D's pick for the LLM was 128x64 at 2 stages, which waits for all of its copies at each kv block;
          # the 3-stage 128x64 (run E's LLM pick, 14% ahead of 2 stages) spilled 64 B with the shared-prompt mask
          # until that mask's two masked kv ranges became one loop (sm_90: 249 registers plain, 250 shared)
          "dq": (Tile(64, 32, 8, 2), Tile(128, 32, 8, 2), Tile(64, 64, 8, 2), Tile(128, 64, 8, 2),
                 Tile(64, 64, 8, 3), Tile(128, 32, 8, 3), Tile(128, 64, 8, 3))},
    256: {"fwd": (Tile(64, 32, 8, 2),), "dkdv": (Tile(16, 32, 8, 2),), "dq": (Tile(32, 32, 8, 2),)},
}


NEW_ENV = "VLR_ATTN_NEW"


def _enabled(env: str, given: bool | None) -> bool:
    """``given`` if not None, else on unless the environment variable ``env`` is ``0``."""
    return os.environ.get(env, "1") != "0" if given is None else given


def candidate_id(kernel: str, head_dim: int, cfg: dict[str, int]) -> str:
    """A launch candidate's name in ``VLR_ATTN_NEW`` lists: ``<kernel>@<head_dim>:<its values, in order>``, e.g.
    ``dq@80:128-64-8-3``."""
    return f"{kernel}@{head_dim}:" + "-".join(str(int(v)) for v in cfg.values())


def new_candidate_allowed(kernel: str, head_dim: int, cfg: dict[str, int], new: bool | None = None) -> bool:
    """Whether a launch candidate that never ran on a GPU (``Tile.new``; the persistent and the recomputing window
    kernels) reaches the tuner: ``new`` if given, else per ``VLR_ATTN_NEW``: unset or ``1`` yes, ``0`` no, or a
    comma-separated list of :func:`candidate_id` names, only those. They pass the CPU tests and compile for sm_90
    without spills, but an illegal address in one of them would end the CUDA context of the process that tunes it
    (as a flat dK/dV candidate did in run C); ``benchmarks/gpu_check.sh`` runs their GPU tests in a process of
    its own first and lists for the benchmarks the candidates whose every test passed
    (``python -m tests.kernels.new_probe``)."""
    if new is not None:
        return new
    value = os.environ.get(NEW_ENV, "1").strip()
    if value in ("0", "1", ""):
        return value != "0"
    return candidate_id(kernel, head_dim, cfg) in {name.strip() for name in value.split(",")}


def launch_candidates(head_dim: int, max_seqlen_q: int, max_seqlen_k: int, kernel: str,
                      block_m: int | None = None, block_n: int | None = None,
                      shared: bool = False, flat: bool | None = None,
                      new: bool | None = None) -> list[dict[str, int]]:
    """Launch configurations of one kernel (``fwd``, ``dkdv``, ``dq``), default first, duplicates removed:
    tiles shrink to the longest segment for short windows (fewer registers there: 4 warps are enough);
    ``block_m``/``block_n`` override every candidate's tiles (tests use them to exercise multi-tile paths);
    ``shared``: only candidates that fit the shared-prompt specialisation; ``flat``: include the flat dK/dV
    candidates (default: yes unless ``VLR_ATTN_FLAT=0``, the switch that keeps them from the tuner should a GPU
    fail them: run C on an H100 hit an illegal address in the first one before the loop change noted in
    ``varlen_triton._dkdv_flat``; run D passed all ten of their GPU tests). dkdv configurations carry ``FLAT``
    and ``SPLIT``, and ``ATOMIC_DQ`` where set (see :class:`Tile`). ``new``: include the candidates never run on
    a GPU yet (default: per :func:`new_candidate_allowed`).

    Called on every launch (the tuner looks its pick up in this list): computed once per argument tuple and
    environment and copied out (building it took ~50 us of the ~125 us of Python a windows backward spent on the
    host, H200 run E's host-launched rows being host-bound)."""
    key = (head_dim, max_seqlen_q, max_seqlen_k, kernel, block_m, block_n, shared, flat, new,
           os.environ.get("VLR_ATTN_FLAT"), os.environ.get(NEW_ENV))
    hit = _CANDIDATES.get(key)
    if hit is None or hit[0] is not _TABLES:  # tests replace the tables
        hit = _CANDIDATES[key] = (_TABLES, _launch_candidates(head_dim, max_seqlen_q, max_seqlen_k, kernel,
                                                              block_m, block_n, shared, flat, new))
    return [dict(cfg) for cfg in hit[1]]


_CANDIDATES: dict[tuple, tuple[dict, list[dict[str, int]]]] = {}


def _launch_candidates(head_dim: int, max_seqlen_q: int, max_seqlen_k: int, kernel: str, block_m: int | None,
                       block_n: int | None, shared: bool, flat: bool | None,
                       new: bool | None) -> list[dict[str, int]]:
    flat = _enabled("VLR_ATTN_FLAT", flat)
    table = _TABLES[next(c for c in sorted(_TABLES) if head_dim <= c)][kernel]
    out: list[dict[str, int]] = []
    for t in table:
        if (shared and not t.shared) or (t.flat and not flat):
            continue
        bm = block_m or pick_block(max_seqlen_q, t.block_m)
        bn = block_n or pick_block(max_seqlen_k, t.block_n)
        if t.atomic and max_seqlen_k <= bn:
            continue  # one kv tile per segment: every dK/dV candidate stores dQ directly
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": t.warps if (bm, bn) == t[:2] else 4,
               "num_stages": t.stages}
        if kernel == "dkdv":
            cfg.update(FLAT=t.flat, SPLIT=t.split)
            if t.atomic:
                cfg["ATOMIC_DQ"] = True
        if (t.new or (shared and t.shared_new)) and not new_candidate_allowed(kernel, head_dim, cfg, new):
            continue
        if cfg not in out:
            out.append(cfg)
    return out
