"""M-RoPE 3D position ids (temporal, height, width) for packed sequences, identical to transformers'
Qwen2.5-VL ``get_rope_index`` applied to each sequence on its own.

Rules (per sequence, positions restart at 0): a text token gets the same position on all three streams, one more than
the previous position; an image of merged grid ``(t, h', w')`` (``h' = h / merge``) placed at text position ``s``
gets ``(s + k_t, s + k_h, s + k_w)`` for its ``t*h'*w'`` tokens in (t, row, col) order, and the text after it resumes
at ``s + max(h', w')``.

Shared-prompt layout (a segment ``[prompt | chosen | rejected]``, see ``PackedBatch``): the rejected part is
positioned as if it directly followed the prompt, i.e. exactly the positions of ``prompt + rejected`` on its own.

The implementation is whole-tensor: every token's position is its index in its logical sequence minus the "lag"
``sum(n_g - advance_g)`` of the image groups that end before it, and image tokens add their (t, row, col) offsets.
The C++ twin lives in ``csrc/data_index.cpp`` (see :mod:`vlr_runtime.data.native`).
"""

from __future__ import annotations

import torch

from vlr_runtime.data import native


def _segment_of(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)


def mrope_position_ids(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    group_grid_thw: torch.Tensor,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    prefix_lens: torch.Tensor | None = None,
    split_lens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Position ids ``[3, T]`` int64 for a packed token axis (on the CPU).

    Args:
        input_ids: ``[T]`` int64 packed tokens.
        cu_seqlens: ``[N+1]`` segment boundaries (int32 or int64), ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``.
        group_grid_thw: ``[G, 3]`` un-merged (t, h, w) patch grid of each ``<|image_pad|>`` group, in packed token
            order (``image_grid_thw[image_index]`` of a ``PackedBatch``). Group ``g`` owns the next
            ``t*h*w / merge**2`` image tokens.
        image_token_id: id of ``<|image_pad|>``.
        prefix_lens, split_lens: ``[N]`` shared-prompt layout (both or neither): prompt length and
            prompt+chosen length of each segment; ``prefix_lens[i] == split_lens[i]`` or ``== seqlen`` for a plain
            causal segment works too (no rejected part).
        backend: ``None`` (C++ when built) / ``"native"`` / ``"python"``, see :mod:`vlr_runtime.data.native`.
    Raises:
        ValueError: if the image tokens do not split into the groups' counts, a group straddles a segment /
            prompt / response boundary, or the layout arguments are inconsistent.
    """
    lib = native.select(backend)
    if lib is not None:
        def arr(x: torch.Tensor | None):
            return None if x is None else x.detach().to(torch.int64).cpu().contiguous().numpy()

        out = lib.mrope_position_ids(
            arr(input_ids.reshape(-1)), arr(cu_seqlens), arr(group_grid_thw.reshape(-1, 3)), image_token_id,
            spatial_merge_size, arr(prefix_lens), arr(split_lens),
        )
        return torch.from_numpy(out)
    return _mrope_position_ids_python(
        input_ids, cu_seqlens, group_grid_thw, image_token_id, spatial_merge_size, prefix_lens, split_lens
    )


def _mrope_position_ids_python(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    group_grid_thw: torch.Tensor,
    image_token_id: int,
    spatial_merge_size: int,
    prefix_lens: torch.Tensor | None,
    split_lens: torch.Tensor | None,
) -> torch.Tensor:
    ids = input_ids.reshape(-1).to(torch.int64).cpu()
    total = ids.numel()
    cu = cu_seqlens.to(torch.int64).cpu()
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={total}, got {cu.tolist()[:8]}...")
    grid = group_grid_thw.to(torch.int64).cpu().reshape(-1, 3)
    m = spatial_merge_size
    if grid.numel() and (bool((grid <= 0).any()) or bool((grid[:, 1:] % m != 0).any())):
        raise ValueError(f"group grids must be positive with h, w multiples of {m}, got {grid.tolist()}")
    seg = _segment_of(cu, total)
    seg_start = cu[:-1][seg]
    offset = torch.arange(total) - seg_start

    # Image groups: the k-th image token belongs to the group whose cumulative count first exceeds k.
    lt, lh, lw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
    counts = lt * lh * lw
    img_pos = torch.nonzero(ids == image_token_id).reshape(-1)
    if img_pos.numel() != int(counts.sum()):
        raise ValueError(
            f"{img_pos.numel()} image tokens but the {grid.shape[0]} image groups need {int(counts.sum())}"
        )
    group_first = torch.cumsum(counts, 0) - counts
    starts = img_pos[group_first] if counts.numel() else group_first
    ends = starts + counts
    if counts.numel() and not torch.equal(img_pos[group_first + counts - 1], ends - 1):
        raise ValueError("an image group's tokens are not contiguous (placeholder count does not match its grid)")
    if counts.numel() and not torch.equal(seg[starts], seg[ends - 1]):
        raise ValueError("an image group straddles two packed segments")

    logical = offset.clone()
    if (prefix_lens is None) != (split_lens is None):
        raise ValueError("prefix_lens and split_lens go together (shared-prompt layout)")
    if prefix_lens is not None:
        pre = prefix_lens.to(torch.int64).cpu().reshape(-1)
        spl = split_lens.to(torch.int64).cpu().reshape(-1)
        seqlen = cu[1:] - cu[:-1]
        if pre.numel() != seqlen.numel() or spl.numel() != seqlen.numel():
            raise ValueError(f"prefix_lens/split_lens need {seqlen.numel()} entries")
        if bool((pre < 0).any() | (pre > spl).any() | (spl > seqlen).any()):
            raise ValueError("need 0 <= prefix_len <= split_len <= segment length for every segment")
        for bound in (pre, spl):
            # A group may not cross the prompt/chosen or the chosen/rejected boundary of its segment.
            b = cu[:-1][seg[starts]] + bound[seg[starts]] if counts.numel() else starts
            if bool(((starts < b) & (ends > b)).any()):
                raise ValueError("an image group straddles the prompt/response boundary of a shared-prompt segment")
        in_rejected = offset >= spl[seg]
        logical = torch.where(in_rejected, offset - spl[seg] + pre[seg], offset)

    # lag_at[x] = sum of (count - advance) over groups ending at or before packed index x.
    advance = torch.maximum(lh, lw)
    lag_at = torch.zeros(total + 1, dtype=torch.int64)
    lag_at.index_add_(0, ends, counts - advance)
    lag_at = torch.cumsum(lag_at, 0)
    lag = lag_at[:total] - lag_at[seg_start]
    if prefix_lens is not None:
        branch = lag_at[seg_start + spl[seg]] - lag_at[seg_start + pre[seg]]
        lag = lag - torch.where(in_rejected, branch, torch.zeros_like(branch))
    text_pos = logical - lag

    pos = text_pos.unsqueeze(0).repeat(3, 1)
    if counts.numel():
        g = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        j = img_pos - starts[g]
        base = text_pos[img_pos] - j
        hw = lh[g] * lw[g]
        pos[0, img_pos] = base + j // hw
        pos[1, img_pos] = base + (j % hw) // lw[g]
        pos[2, img_pos] = base + j % lw[g]
    return pos
