"""Vision-tower index metadata for a batch of image grids, identical to transformers' Qwen2.5-VL.

The ViT sees the patches of all images concatenated (``N = sum_i t_i*h_i*w_i`` rows, in the processor's block-major
order: every ``merge x merge`` block of patches is contiguous). Window attention runs on windows of
``window_size / patch_size / merge`` (= 4 for 112/14/2) merged units per side; the tokens are permuted once so that
every window is contiguous, attention runs over ``cu_window_seqlens`` (or over ``cu_seqlens``, one segment per frame,
in the full-attention blocks), and the merger output is permuted back with ``reverse_index``.

Everything here is computed with whole-tensor operations (no Python loop over images or windows): each merged unit's
destination is computed directly from its window coordinates, so neither a sort nor a per-image loop is needed.
The C++ twin lives in ``csrc/data_index.cpp`` (see :mod:`vlr_runtime.data.native`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vlr_runtime.data import native
from vlr_runtime.data.types import to_device


@dataclass(frozen=True)
class VisionWindows:
    """Index metadata the vision tower needs for one batch of images (``N`` patches, ``U = N / merge**2`` units)."""

    window_index: torch.Tensor
    """``[U]`` int64: merged unit at each window-ordered slot (HF ``window_index``)."""
    reverse_index: torch.Tensor
    """``[U]`` int64: inverse permutation (``argsort(window_index)``), applied to the merger output."""
    cu_window_seqlens: torch.Tensor
    """``[W+1]`` int32 window boundaries in patch rows (empty windows dropped, as HF's ``unique_consecutive``)."""
    max_window_seqlen: int
    cu_seqlens: torch.Tensor
    """``[F+1]`` int32 boundaries of the full-attention segments (one per image frame), in patch rows."""
    max_seqlen: int
    rope_position_ids: torch.Tensor
    """``[N, 2]`` int64 (row, col) of each patch for the 2D vision rotary embedding, in the un-permuted order."""

    def to(self, device: torch.device | str) -> VisionWindows:
        """The same metadata on ``device``: the five index tensors travel as ONE int64 buffer in one non-blocking
        copy (:func:`~vlr_runtime.data.types.to_device`), so the host never waits for the device. (On the CPU the
        same packing runs, so that the CPU tests check it.)"""
        tensors = (self.window_index, self.reverse_index, self.cu_window_seqlens, self.cu_seqlens,
                   self.rope_position_ids)
        flat = to_device(torch.cat([t.reshape(-1).to(torch.int64) for t in tensors]), device)
        wi, rev, cu_window, cu_full, rope = flat.split([t.numel() for t in tensors])
        return replace(self, window_index=wi, reverse_index=rev, cu_window_seqlens=cu_window.to(torch.int32),
                       cu_seqlens=cu_full.to(torch.int32), rope_position_ids=rope.view(-1, 2))


def _check_grid(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [I, 3], got shape {tuple(grid_thw.shape)}")
    grid = grid_thw.to(torch.int64).cpu()
    if grid.numel() and (grid.min() <= 0):
        raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
    if grid.numel() and bool(((grid[:, 1:] % spatial_merge_size) != 0).any()):
        raise ValueError(f"grid h, w must be multiples of spatial_merge_size={spatial_merge_size}: {grid.tolist()}")
    return grid


def vision_window_index(
    grid_thw: torch.Tensor,
    *,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window permutation of merged units, as transformers' ``get_vision_window_index``.

    Args:
        grid_thw: ``[I, 3]`` (t, h, w) patch grid of each image (h, w multiples of ``spatial_merge_size``).
    Returns:
        ``window_index [U]`` int64, ``reverse_index [U]`` int64 (its inverse), ``cu_window_seqlens [W+1]`` int32
        (patch rows, empty windows removed). ``backend``: see :mod:`vlr_runtime.data.native`.
    """
    lib = native.select(backend)
    if lib is not None:
        # The C++ side validates the grid itself; skipping the tensor checks here is most of its speed-up.
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be [I, 3], got shape {tuple(grid_thw.shape)}")
        grid_np = grid_thw.detach().cpu().numpy()
        wi, rev, cu = lib.vision_window_index(grid_np, spatial_merge_size, window_size, patch_size)
        return torch.from_numpy(wi), torch.from_numpy(rev), torch.from_numpy(cu).to(torch.int32)
    grid = _check_grid(grid_thw, spatial_merge_size)
    ws = window_size // spatial_merge_size // patch_size
    if ws <= 0:
        raise ValueError(f"window_size {window_size} smaller than one merged unit ({spatial_merge_size * patch_size})")
    unit = spatial_merge_size**2
    if grid.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone(), torch.zeros(1, dtype=torch.int32)
    t, lh, lw = grid[:, 0], grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
    nwh, nww = (lh + ws - 1) // ws, (lw + ws - 1) // ws
    windows_per_image = t * nwh * nww
    units_per_image = t * lh * lw
    img = torch.repeat_interleave(torch.arange(grid.shape[0]), units_per_image)
    local = torch.arange(int(units_per_image.sum())) - torch.repeat_interleave(
        torch.cumsum(units_per_image, 0) - units_per_image, units_per_image
    )
    lh_u, lw_u, nwh_u, nww_u = lh[img], lw[img], nwh[img], nww[img]
    frame, rem = local // (lh_u * lw_u), local % (lh_u * lw_u)
    row, col = rem // lw_u, rem % lw_u
    wr, wc = row // ws, col // ws
    win_w = torch.minimum(lw_u - wc * ws, torch.full_like(wc, ws))
    window_id = (torch.cumsum(windows_per_image, 0) - windows_per_image)[img] + (frame * nwh_u + wr) * nww_u + wc
    # Every window's size is a function of its coordinates only, so its start follows from a bincount + cumsum.
    sizes = torch.bincount(window_id, minlength=int(windows_per_image.sum()))
    starts = torch.cumsum(sizes, 0) - sizes
    reverse_index = starts[window_id] + (row - wr * ws) * win_w + (col - wc * ws)
    window_index = torch.empty_like(reverse_index)
    window_index[reverse_index] = torch.arange(reverse_index.numel())
    cu = torch.cumsum(sizes[sizes > 0] * unit, 0)
    cu_window_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), cu]).to(torch.int32)
    return window_index, reverse_index, cu_window_seqlens


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """``[F+1]`` int32 boundaries of the full-attention segments: one per frame (``h*w`` patches), as HF."""
    grid = _check_grid(grid_thw, 1)
    seqlens = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(seqlens, 0)]).to(torch.int32)


def vision_rope_position_ids(grid_thw: torch.Tensor, *, spatial_merge_size: int = 2) -> torch.Tensor:
    """``[N, 2]`` int64 (row, col) of every patch in the processor's block-major order, repeated per frame."""
    grid = _check_grid(grid_thw, spatial_merge_size)
    m = spatial_merge_size
    per_image = grid[:, 0] * grid[:, 1] * grid[:, 2]
    img = torch.repeat_interleave(torch.arange(grid.shape[0]), per_image)
    first = torch.cumsum(per_image, 0) - per_image
    local = torch.arange(int(per_image.sum())) - torch.repeat_interleave(first, per_image)
    h, w = grid[img, 1], grid[img, 2]
    p = local % (h * w)
    block, inner = p // (m * m), p % (m * m)
    blocks_per_row = w // m
    row = (block // blocks_per_row) * m + inner // m
    col = (block % blocks_per_row) * m + inner % m
    return torch.stack([row, col], dim=1)


def _max_len(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def vision_windows(
    grid_thw: torch.Tensor,
    *,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
    backend: str | None = None,
) -> VisionWindows:
    """All vision-tower index metadata for ``grid_thw [I, 3]`` (see :class:`VisionWindows`), on the CPU."""
    window_index, reverse_index, cu_window = vision_window_index(
        grid_thw, spatial_merge_size=spatial_merge_size, window_size=window_size, patch_size=patch_size,
        backend=backend,
    )
    cu_full = vision_cu_seqlens(grid_thw)
    return VisionWindows(
        window_index=window_index,
        reverse_index=reverse_index,
        cu_window_seqlens=cu_window,
        max_window_seqlen=_max_len(cu_window),
        cu_seqlens=cu_full,
        max_seqlen=_max_len(cu_full),
        rope_position_ids=vision_rope_position_ids(grid_thw, spatial_merge_size=spatial_merge_size),
    )
