"""Rotary position embedding, rotate-half convention of HF Qwen2.5-VL, with the cos/sin builders for both of its
rotaries: the LLM's M-RoPE (three position streams t/h/w, ``mrope_section``) and the vision tower's 2D rope.

``apply_rotary`` is one Triton pass over ``x [T, heads, D]`` with cos/sin ``[T, D]`` read once per token for all
heads; M-RoPE and the vision rope differ only in how cos/sin are built, so one kernel serves both. Math in fp32
(what HF's vision path does; HF's LLM path multiplies in the activation dtype, which differs by bf16 rounding).
"""

from __future__ import annotations

import functools

import torch
from vlr_kernels._backend import resolve_backend
from vlr_kernels._triton_compat import cdiv, next_power_of_2, tl, triton_jit
from vlr_kernels._tune import pick

_BACKENDS = ("triton", "torch")


def rope_inv_freq(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """``[dim // 2]`` float32 inverse frequencies ``1 / theta**(2i / dim)``. LLM: ``dim = head_dim``
    (theta 1e6 for Qwen2.5-VL); vision: ``dim = head_dim // 2`` (theta 1e4)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rope_inv_freq: dim must be positive and even, got {dim}")
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def mrope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int] | tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, head_dim]`` float32 for M-RoPE, as ``Qwen2_5_VLRotaryEmbedding`` (attention scaling 1).

    Args:
        position_ids: ``[3, T]`` (temporal, height, width streams) or ``[T]`` (text only: all streams equal).
        inv_freq: ``[head_dim // 2]``.
        mrope_section: e.g. ``[16, 24, 24]``, summing to ``head_dim // 2``; chunk ``i`` of the frequency axis takes
            its positions from stream ``i % 3``.
    HF casts these to the activation dtype before use; pass them as they are to :func:`apply_rotary`.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.expand(3, -1)
    if position_ids.dim() != 2 or position_ids.shape[0] != 3:
        raise ValueError(f"mrope_cos_sin: position_ids must be [3, T] or [T], got {tuple(position_ids.shape)}")
    if sum(mrope_section) != inv_freq.numel():
        raise ValueError(f"mrope_cos_sin: mrope_section {list(mrope_section)} must sum to {inv_freq.numel()}")
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float)  # [3, T, D/2]
    chunks = freqs.split(list(mrope_section), dim=-1)
    freq = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
    emb = torch.cat((freq, freq), dim=-1)
    return emb.cos(), emb.sin()


def vision_rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[N, head_dim]`` float32 for the vision 2D rope, as ``Qwen2_5_VisionRotaryEmbedding``.

    Args:
        position_ids: ``[N, 2]`` (row, column) patch coordinates in HF's block-major order
            (``transformers.vision_utils.get_vision_position_ids``).
        inv_freq: ``[head_dim // 4]`` = ``rope_inv_freq(head_dim // 2)``.
    """
    if position_ids.dim() != 2 or position_ids.shape[1] != 2:
        raise ValueError(f"vision_rope_cos_sin: position_ids must be [N, 2], got {tuple(position_ids.shape)}")
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float)  # [N, 2, D/4]
    freq_hw = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([freq_hw, freq_hw], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eager reference: ``x * cos + rotate_half(x) * sin`` in fp32 (float64 stays), cast back to x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    c, s = cos.to(ct).unsqueeze(-2), sin.to(ct).unsqueeze(-2)
    return (xf * c + _rotate_half(xf) * s).to(x.dtype)


@triton_jit
def _rotate_heads(
    x_ptr, y_ptr, ts, tmask, hb, n_heads, stride_xt, stride_xh, c1, c2, s1, s2,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # y1 = x1*c1 - x2*s1,  y2 = x2*c2 + x1*s2  (rotate-half) on a [tokens, heads, half] tile; c/s are [tokens,
    # half]; y is contiguous [T, heads, 2*HALF]
    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    mask = tmask[:, None, None] & (hs[None, :, None] < n_heads) & (ds[None, None, :] < HALF)
    x_offs = ts[:, None, None] * stride_xt + hs[None, :, None] * stride_xh + ds[None, None, :]
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    y_offs = ts[:, None, None] * n_heads * 2 * HALF + hs[None, :, None] * 2 * HALF + ds[None, None, :]
    y1 = x1 * c1[:, None, :] - x2 * s1[:, None, :]
    y2 = x2 * c2[:, None, :] + x1 * s2[:, None, :]
    tl.store(y_ptr + y_offs, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + y_offs + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton_jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, yq_ptr, yk_ptr, n_tokens, heads_q, heads_k, n_q_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh,
    HALF: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # HALF is a compile-time constant: with a run-time half of 40 (head_dim 80) the compiler cannot prove the
    # masks uniform over 8 lanes and falls back to 2-byte loads and stores (seen in the sm_90 PTX); as a constant
    # the loads are 16 bytes wide for head_dim 80 as for 128
    # grid (token blocks, q head blocks + k head blocks): q and k of a token share one read of its cos/sin row;
    # BLOCK_T tokens per program put more bytes in flight per thread (head_dim 80 fills 40 of 64 lanes)
    ts = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < n_tokens
    hb = tl.program_id(1)
    ds = tl.arange(0, BLOCK_D)
    cs_mask = tmask[:, None] & (ds[None, :] < HALF)
    cs_offs = ts[:, None] * 2 * HALF + ds[None, :]
    c1 = tl.load(cos_ptr + cs_offs, mask=cs_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs_offs + HALF, mask=cs_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs_offs, mask=cs_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs_offs + HALF, mask=cs_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # the transposed rotation: dx1 = g1*c1 + g2*s2,  dx2 = g2*c2 - g1*s1
        s1, s2 = -s2, -s1
    if hb < n_q_blocks:
        _rotate_heads(q_ptr, yq_ptr, ts, tmask, hb, heads_q, stride_qt, stride_qh, c1, c2, s1, s2, HALF, BLOCK_H,
                      BLOCK_D)
    else:
        _rotate_heads(k_ptr, yk_ptr, ts, tmask, hb - n_q_blocks, heads_k, stride_kt, stride_kh, c1, c2, s1, s2,
                      HALF, BLOCK_H, BLOCK_D)


# Launch shapes (tokens per program, num_warps), the first the default; the fastest is picked once per shape on
# the device (the forward and the backward share the pick: same kernel, same bytes)
_CONFIGS = ((1, 4), (2, 4), (4, 4), (4, 8))


@functools.cache
def _blocks(heads_q: int, heads_k: int, head_dim: int) -> tuple[int, int, int, int]:
    """``(BLOCK_H, q head blocks, all head blocks, BLOCK_D)`` (cached: one dict lookup per launch)."""
    block_h = min(next_power_of_2(max(heads_q, heads_k)), 16)
    n_q_blocks = cdiv(heads_q, block_h)
    return block_h, n_q_blocks, n_q_blocks + cdiv(heads_k, block_h), next_power_of_2(head_dim // 2)


def rotary_fwd(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel on ``q [T, Hq, D]`` and optionally ``k [T, Hk, D]`` (last dim contiguous; views of a fused
    qkv are fine) with contiguous ``cos``/``sin [T, D]``. ``backward=True`` applies the transposed rotation (the
    gradient). Returns contiguous ``(q_out, k_out or None)``."""
    t, heads_q, d = q.shape
    heads_k = k.shape[1] if k is not None else 0
    yq = torch.empty((t, heads_q, d), dtype=q.dtype, device=q.device)
    yk = torch.empty((t, heads_k, d), dtype=k.dtype, device=k.device) if k is not None else None
    block_h, n_q_blocks, n_blocks, block_d = _blocks(heads_q, heads_k, d)
    kk = k if k is not None else q

    def launch(cfg: tuple[int, int]) -> None:
        block_t, warps = cfg
        _rotary_kernel[((t + block_t - 1) // block_t, n_blocks)](
            q, kk, cos, sin, yq, yk if yk is not None else yq, t, heads_q, heads_k, n_q_blocks,
            q.stride(0), q.stride(1), kk.stride(0), kk.stride(1),
            HALF=d // 2, BACKWARD=backward, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
        )

    launch(pick(("rotary", heads_q, heads_k, d, q.dtype, q.device), _CONFIGS, launch, q.device))
    return yq, yk


def rotary_bwd(
    dq: torch.Tensor, dk: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients w.r.t. q (and k) of :func:`rotary_fwd` (cos/sin are constants of the positions)."""
    return rotary_fwd(dq, dk, cos, sin, backward=True)


def _unit_last(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


class RotaryFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernel for q (and k): differentiable w.r.t. q and k only."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.has_k = k is not None
        yq, yk = rotary_fwd(_unit_last(q), _unit_last(k), cos, sin)
        return (yq, yk) if ctx.has_k else yq

    @staticmethod
    def backward(ctx, dyq, dyk=None):
        cos, sin = ctx.saved_tensors  # autograd materialises zeros for an unused output, so dyq/dyk are tensors
        dq, dk = rotary_bwd(_unit_last(dyq), _unit_last(dyk), cos, sin)
        return dq, (dk if ctx.has_k else None), None, None


def _check_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str) -> None:
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: {name} must be [T, heads, head_dim] with even head_dim, got "
                         f"{tuple(x.shape)}")
    expected = (x.shape[0], x.shape[2])
    if tuple(cos.shape) != expected or tuple(sin.shape) != expected:  # tuples: torch.Size == goes via sym_eq
        raise ValueError(f"apply_rotary: cos/sin must be [T, head_dim]={list(expected)}, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"apply_rotary: {name}, cos and sin must be on the same device")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` by ``cos``/``sin [T, head_dim]`` (rotate-half convention).

    Use :func:`mrope_cos_sin` (LLM) or :func:`vision_rope_cos_sin` (ViT) to build cos/sin. Returns ``[T, heads,
    head_dim]`` in x's dtype. Differentiable w.r.t. x; the kernel path treats cos/sin as constants and refuses
    cos/sin that require grad.
    """
    _check_rotary(x, cos, sin, "x")
    name = resolve_backend("apply_rotary", x.device, backend, _BACKENDS)
    if name == "torch":
        return apply_rotary_ref(x, cos, sin)
    _refuse_grad_cos_sin(cos, sin)
    return RotaryFunction.apply(x, None, cos, sin)


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rotary` on ``q [T, Hq, D]`` and ``k [T, Hk, D]`` in one launch (GQA: Hq != Hk is fine).
    Returns ``(q_rotated, k_rotated)``."""
    _check_rotary(q, cos, sin, "q")
    _check_rotary(k, cos, sin, "k")
    name = resolve_backend("apply_rotary", q.device, backend, _BACKENDS)
    if name == "torch":
        return apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
    _refuse_grad_cos_sin(cos, sin)
    return RotaryFunction.apply(q, k, cos, sin)


def _refuse_grad_cos_sin(cos: torch.Tensor, sin: torch.Tensor) -> None:
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary: the kernel does not differentiate cos/sin; detach them or use backend='torch'")
