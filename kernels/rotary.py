"""Rotary position embedding, rotate-half convention of HF Qwen2.5-VL, with the cos/sin builders for both of its
rotaries: the LLM's M-RoPE (three position streams t/h/w, ``mrope_section``) and the vision tower's 2D rope.

``apply_rotary`` is one Triton pass over ``x [T, heads, D]`` with cos/sin ``[T, D]`` read once per token for all
heads; M-RoPE and the vision rope differ only in how cos/sin are built, so one kernel serves both. Math in fp32
(what HF's vision path does; HF's LLM path multiplies in the activation dtype, which differs by bf16 rounding).
"""

from __future__ import annotations

import torch

from vlr_kernels._backend import resolve_backend
from vlr_kernels._triton_compat import tl, triton, triton_jit

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
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, n_heads, half, stride_xt, stride_xh,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # forward:  y1 = x1*c1 - x2*s1,  y2 = x2*c2 + x1*s2
    # backward (transpose of the same linear map): dx1 = g1*c1 + g2*s2,  dx2 = g2*c2 - g1*s1
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < half
    c1 = tl.load(cos_ptr + t * 2 * half + ds, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * 2 * half + half + ds, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * 2 * half + ds, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * 2 * half + half + ds, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    mask = (hs[:, None] < n_heads) & dmask[None, :]
    x_offs = t * stride_xt + hs[:, None] * stride_xh + ds[None, :]
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + half, mask=mask, other=0.0).to(tl.float32)
    y_offs = t * n_heads * 2 * half + hs[:, None] * 2 * half + ds[None, :]
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(y_ptr + y_offs, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + y_offs + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


def rotary_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Launch the kernel on ``x [T, heads, D]`` (last dim contiguous; a view of a fused qkv is fine), contiguous
    ``cos``/``sin [T, D]``. ``backward=True`` applies the transposed rotation (the gradient). Returns a contiguous
    ``[T, heads, D]``."""
    t, heads, d = x.shape
    y = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(heads), 16)
    block_d = triton.next_power_of_2(d // 2)
    _rotary_kernel[(t, triton.cdiv(heads, block_h))](
        x, cos, sin, y, heads, d // 2, x.stride(0), x.stride(1),
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
    return y


def rotary_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. x of :func:`rotary_fwd` (cos/sin are constants of the positions)."""
    return rotary_fwd(dy, cos, sin, backward=True)


class RotaryFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernel; differentiable w.r.t. x only."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return rotary_fwd(x if x.stride(-1) == 1 else x.contiguous(), cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_bwd(dy if dy.stride(-1) == 1 else dy.contiguous(), cos, sin), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` by ``cos``/``sin [T, head_dim]`` (rotate-half convention).

    Use :func:`mrope_cos_sin` (LLM) or :func:`vision_rope_cos_sin` (ViT) to build cos/sin. Returns ``[T, heads,
    head_dim]`` in x's dtype. Differentiable w.r.t. x; the kernel path treats cos/sin as constants and refuses
    cos/sin that require grad.
    """
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: x must be [T, heads, head_dim] with even head_dim, got {tuple(x.shape)}")
    expected = (x.shape[0], x.shape[2])
    if cos.shape != expected or sin.shape != expected:
        raise ValueError(f"apply_rotary: cos/sin must be [T, head_dim]={list(expected)}, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError("apply_rotary: x, cos and sin must be on the same device")
    name = resolve_backend("apply_rotary", x.device, backend, _BACKENDS)
    if name == "torch":
        return apply_rotary_ref(x, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary: the kernel does not differentiate cos/sin; detach them or use backend='torch'")
    return RotaryFunction.apply(x, cos, sin)
