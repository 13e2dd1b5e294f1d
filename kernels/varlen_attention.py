"""Variable-length (packed) attention: ``softmax(q k^T * scale) v`` in each segment of a packed token axis.

Layout. ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]``; segment ``i`` owns q rows
``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and k/v rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``; tokens never attend
across segments. GQA/MQA: q head ``h`` reads kv head ``h // (Hq // Hkv)``. ``causal`` aligns the *ends* of the
q and k segment (q row ``i`` of a segment with lengths ``Lq, Lk`` sees keys ``j <= i + Lk - Lq``, as
flash-attn >= 2.1); a q row that sees no key gets output 0 and logsumexp ``-inf``.

Shared-prompt pairs (``prefix_lens``/``split_lens``, causal self-attention, ``cu_seqlens_q == cu_seqlens_k``).
A preference pair is packed as ONE segment ``[prompt | chosen | rejected]`` instead of two sequences
``[prompt | chosen]`` and ``[prompt | rejected]``, so the prompt (often 1,000+ image tokens) is encoded once::

    local index   0 ........ p-1 | p ........ s-1 | s ............ L-1
    part          prompt         | chosen         | rejected
    position id   0 ........ p-1 | p ........ s-1 | p .... p+(L-s)-1   (rejected restarts after the prompt)
    attends to    prompt (causal)| prompt+chosen  | prompt + rejected (causal), never chosen

with ``p = prefix_lens[i]`` and ``s = split_lens[i]`` (``0 <= p <= s <= L``). Row ``j`` of the rejected part
then computes exactly what row ``p + (j - s)`` of a separate ``[prompt | rejected]`` sequence computes, given
the position ids above (M-RoPE: the rejected part continues the three position streams from the prompt's end,
as a separate sequence would). The scored tokens of the pair are rows ``s - 1`` (last chosen token) and
``L - 1`` (last rejected token) of the segment. ``prefix_lens[i] = 0, split_lens[i] = L`` is a plain causal
segment.

Backends (``backend=``): ``triton`` (FlashAttention-2 style kernels, ``vlr_kernels.attention.varlen_triton``),
``flash_attn`` (``flash_attn_varlen_func``; no shared-prompt support), ``sdpa`` (a host-side loop over
segments, for reference and small cases), ``torch`` (:func:`varlen_attention_ref`, vectorised eager code,
differentiable; the CPU path).
"""

from __future__ import annotations

import math

import torch
from vlr_kernels._backend import BackendUnavailable, resolve_backend

BACKENDS = ("triton", "flash_attn", "sdpa", "torch")


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    prefix_lens: torch.Tensor | None,
    split_lens: torch.Tensor | None,
) -> None:
    """Validate shapes and dtypes; on CPU tensors also the values (on CUDA that would need a host sync)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head_dim differ: {q.shape[2]} vs {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens_q.device == cu_seqlens_k.device):
        raise ValueError("q, k, v and cu_seqlens must be on the same device")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(
                f"{name} must be a 1-D int32 tensor [num_segments + 1], got {cu.dtype} {tuple(cu.shape)}"
            )
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of segments")
    if int(max_seqlen_q) < 0 or int(max_seqlen_k) < 0:
        raise ValueError("max_seqlen_q/max_seqlen_k must be >= 0")
    shared = prefix_lens is not None or split_lens is not None
    if shared:
        if prefix_lens is None or split_lens is None:
            raise ValueError("shared-prompt pairs need both prefix_lens and split_lens")
        if not causal:
            raise ValueError(
                "shared-prompt pairs (prefix_lens/split_lens) are causal self-attention: pass causal=True"
            )
        n = cu_seqlens_q.numel() - 1
        for name, t in (("prefix_lens", prefix_lens), ("split_lens", split_lens)):
            if t.dtype != torch.int32 or t.shape != (n,) or t.device != q.device:
                raise ValueError(
                    f"{name} must be int32 [num_segments={n}] on {q.device}, got {t.dtype} "
                    f"{tuple(t.shape)} on {t.device}"
                )
    if q.device.type != "cpu":
        return
    for name, cu, total, mx in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens < 0).any()):
            raise ValueError(f"{name} must start at 0, be non-decreasing and end at the token count {total}")
        if lens.numel() and int(lens.max()) > int(mx):
            raise ValueError(
                f"max_seqlen ({mx}) is smaller than the longest segment of {name} ({int(lens.max())})"
            )
    if shared:
        if not torch.equal(cu_seqlens_q, cu_seqlens_k):
            raise ValueError("shared-prompt pairs need cu_seqlens_q == cu_seqlens_k (self-attention)")
        lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        if bool(((prefix_lens < 0) | (prefix_lens > split_lens) | (split_lens > lens)).any()):
            raise ValueError("shared-prompt pairs need 0 <= prefix_lens <= split_lens <= segment length")


def segment_mask(
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    len_q: torch.Tensor,
    len_k: torch.Tensor,
    causal: bool,
    prefix: torch.Tensor | None,
    split: torch.Tensor | None,
) -> torch.Tensor:
    """Which (q, k) pairs of one segment may attend (the rule of this module, used by every eager path).

    All arguments broadcast together: local positions ``pos_q``/``pos_k``, the segment's ``len_q``/``len_k``
    and, for shared-prompt pairs, its ``prefix``/``split`` (None otherwise). Returns a bool tensor.
    """
    ok = (pos_q < len_q) & (pos_k < len_k)
    if causal:
        ok = ok & (pos_k <= pos_q + (len_k - len_q))
    if prefix is not None:
        ok = ok & ~((pos_q >= split) & (pos_k >= prefix) & (pos_k < split))
    return ok


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Lq, Hkv, G, D]``, ``k, v [B, Lk, Hkv, D]``, ``mask [B, Lq, Lk]`` -> out ``[B, Lq, Hkv, G, D]``,
    lse ``[B, Hkv, G, Lq]``; rows with no allowed key give 0 and ``-inf``."""
    s = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
    m = mask[:, None, None]
    s = s.masked_fill(~m, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf; shifting it by 0 keeps exp() at exactly 0 and the gradient finite.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhgqk,bkhd->bqhgd", p / denom.clamp_min(torch.finfo(p.dtype).tiny), v)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    prefix_lens: torch.Tensor | None = None,
    split_lens: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager, differentiable reference in ``q``'s dtype (see the module docstring for the semantics).

    Vectorised without a host sync: segments are gathered into a ``[N, max_seqlen, ...]`` padded batch, or,
    when that is larger (one long segment among many short ones), attention runs over the whole packed axis
    with a block-diagonal mask. Returns ``out [Tq, Hq, D]`` and, with ``return_lse``, ``lse [Hq, Tq]``
    (natural log).
    """
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    n = cu_seqlens_q.numel() - 1
    if tq == 0 or n == 0:
        out = q.new_zeros(q.shape) + 0.0 * (q.sum() + k.sum() + v.sum())  # keeps the autograd graph connected
        lse = q.new_full((hq, tq), float("-inf"))
        return (out, lse) if return_lse else out
    dev = q.device
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    prefix = None if prefix_lens is None else prefix_lens.long()
    split = None if split_lens is None else split_lens.long()
    mq, mk = max(int(max_seqlen_q), 1), max(int(max_seqlen_k), 1)
    tok_q = torch.arange(tq, device=dev)
    seg_q = torch.searchsorted(cu_q[1:], tok_q, right=True).clamp_max(n - 1)
    local_q = tok_q - cu_q[seg_q]
    if n * mq * mk <= tq * max(tk, 1):
        pos_q = torch.arange(mq, device=dev)
        pos_k = torch.arange(mk, device=dev)
        idx_q = (cu_q[:-1, None] + pos_q).clamp(0, tq - 1)
        idx_k = (cu_k[:-1, None] + pos_k).clamp(0, max(tk - 1, 0))
        seg = (slice(None), None, None)
        mask = segment_mask(
            pos_q[None, :, None],
            pos_k[None, None, :],
            len_q[seg],
            len_k[seg],
            causal,
            None if prefix is None else prefix[seg],
            None if split is None else split[seg],
        )
        qb = q[idx_q].view(n, mq, hkv, g, d)
        kb, vb = k[idx_k], v[idx_k]
        out_b, lse_b = _masked_attention(qb, kb, vb, mask, scale)
        row = seg_q * mq + local_q
        out = out_b.reshape(n * mq, hq, d)[row]
        lse = lse_b.permute(1, 2, 0, 3).reshape(hq, n * mq)[:, row]
    else:
        tok_k = torch.arange(tk, device=dev)
        seg_k = torch.searchsorted(cu_k[1:], tok_k, right=True).clamp_max(n - 1)
        local_k = tok_k - cu_k[seg_k]
        sq = seg_q[:, None]
        mask = (sq == seg_k[None, :]) & segment_mask(
            local_q[:, None],
            local_k[None, :],
            len_q[sq],
            len_k[seg_k][None, :],
            causal,
            None if prefix is None else prefix[sq],
            None if split is None else split[sq],
        )
        out_b, lse_b = _masked_attention(q.view(1, tq, hkv, g, d), k[None], v[None], mask[None], scale)
        out = out_b.reshape(tq, hq, d)
        lse = lse_b.reshape(hq, tq)
    return (out, lse) if return_lse else out


def _varlen_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    scale: float,
    prefix_lens: torch.Tensor | None,
    split_lens: torch.Tensor | None,
) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` per segment (host sync + Python loop: reference, small cases)."""
    import torch.nn.functional as F

    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    prefix = None if prefix_lens is None else prefix_lens.tolist()
    split = None if split_lens is None else split_lens.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        a, b, c, e = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        lq, lk = b - a, e - c
        if lq == 0:
            continue
        if lk == 0:
            outs.append(q.new_zeros(lq, q.shape[1], q.shape[2]))
            continue
        if causal and lq > lk:
            raise ValueError(
                f"sdpa backend: causal segment {i} has more queries ({lq}) than keys ({lk}); its first "
                "rows see no key, which SDPA turns into NaN. Use backend='torch' or 'triton'."
            )
        mask = None
        # a plain causal square segment keeps is_causal (SDPA's flash kernel takes no explicit mask)
        plain_causal = causal and prefix is None and lq == lk
        if causal and not plain_causal:
            pos_q = torch.arange(lq, device=q.device)[:, None]
            pos_k = torch.arange(lk, device=q.device)[None, :]
            mask = segment_mask(pos_q, pos_k, lq, lk, True, None if prefix is None else prefix[i],
                                None if split is None else split[i])
        # [1, heads, len, head_dim]: SDPA's fused (flash / memory-efficient) kernels take 4-d inputs only; a 3-d
        # call silently runs the math kernel (full score matrix; 53 ms instead of a few for 8 ViT images on an H200)
        out = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None], k[c:e].transpose(0, 1)[None], v[c:e].transpose(0, 1)[None],
            attn_mask=mask, is_causal=plain_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape) + 0.0 * (q.sum() + k.sum() + v.sum())
    return torch.cat(outs)


def _varlen_attention_flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Tri Dao's ``flash_attn_varlen_func`` (imported lazily: the package is optional)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    prefix_lens: torch.Tensor | None = None,
    split_lens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within the segments of packed sequences (semantics, GQA, causal alignment and the
    shared-prompt pair layout: see the module docstring).

    Args:
        q: ``[total_q, num_heads_q, head_dim]``; k, v: ``[total_k, num_heads_kv, head_dim]``, one float dtype.
        cu_seqlens_q, cu_seqlens_k: ``[num_segments + 1]`` int32 segment boundaries (``cu[0] = 0``,
            ``cu[-1] = total``).
        max_seqlen_q, max_seqlen_k: Python ints >= the longest segment; they only bound the launch grid.
        causal: causal mask with the ends of each q/k segment aligned.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        prefix_lens, split_lens: ``[num_segments]`` int32 shared-prompt metadata (prompt, prompt+chosen len);
            requires ``causal=True`` and ``cu_seqlens_q == cu_seqlens_k``.
        backend: ``"triton"``, ``"flash_attn"``, ``"sdpa"``, ``"torch"``; None picks (vlr_kernels._backend).

    Returns:
        ``[total_q, num_heads_q, head_dim]`` in q's dtype; differentiable w.r.t. q, k, v.
    """
    _check_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, prefix_lens, split_lens
    )
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    name = resolve_backend("varlen_attention", q.device, backend, BACKENDS)
    shared = {"prefix_lens": prefix_lens, "split_lens": split_lens}
    if name == "torch":
        return varlen_attention_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, **shared
        )
    if name == "sdpa":
        return _varlen_attention_sdpa(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, prefix_lens, split_lens
        )
    if name == "flash_attn":
        if prefix_lens is not None:
            raise BackendUnavailable(
                "varlen_attention: backend 'flash_attn' has no shared-prompt mask "
                "(prefix_lens/split_lens); use 'triton', 'sdpa' or 'torch'"
            )
        return _varlen_attention_flash_attn(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
        )
    from vlr_kernels.attention.varlen_triton import VarlenAttentionFunction

    return VarlenAttentionFunction.apply(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        causal,
        scale,
        prefix_lens,
        split_lens,
    )
