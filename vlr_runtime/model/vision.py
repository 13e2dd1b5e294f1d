"""Qwen2.5-VL vision tower: patch embedding, window/full-attention blocks with 2D rotary, patch merger.

Token order (as transformers): patches arrive in the image processor's block-major order (each ``merge x merge``
block of patches contiguous). They are permuted once so that every attention window (``window_size / patch /
merge`` = 4x4 merged units) is contiguous, all blocks run in that order (full-attention blocks use one segment per
image frame, which is order-independent), and the merger output is permuted back. The window metadata comes from
:func:`vlr_runtime.data.windows.vision_windows`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from vlr_kernels.rotary import apply_rotary_qk, rope_inv_freq, vision_rope_cos_sin

from vlr_runtime.data.types import to_device
from vlr_runtime.data.windows import vision_windows
from vlr_runtime.model.args import VisionArgs
from vlr_runtime.model.layers import CoreAttention, RMSNorm, SwiGLUMLP, column_linear, row_linear, run_layer

VISION_NORM_EPS = 1e-6  # hard-coded in transformers' Qwen2.5-VL vision blocks and merger


def vision_splits_over(args: VisionArgs, tp: int) -> bool:
    """Whether every vision layer divides by ``tp`` (heads, MLP width, merger width); else it runs replicated."""
    widths = (args.num_heads, args.intermediate_size, args.hidden_size * args.spatial_merge_size**2)
    return all(w % tp == 0 for w in widths)


class VisionAttention(nn.Module):
    """Non-causal attention, ``qkv`` column-parallel (local ``[q_r; k_r; v_r]``), ``proj`` row-parallel."""

    def __init__(self, args: VisionArgs, config, group) -> None:
        super().__init__()
        self.local_heads = args.num_heads // group.size()
        self.head_dim = args.head_dim
        self.qkv = column_linear(args.hidden_size, 3 * args.hidden_size, bias=True, config=config, group=group)
        self.proj = row_linear(args.hidden_size, args.hidden_size, bias=True, config=config, group=group)
        self.core = CoreAttention(causal=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        """``x [N, C]``, ``cos/sin [N, head_dim]`` -> ``[N, C]``."""
        n = x.shape[0]
        q, k, v = self.qkv(x)[0].view(n, 3, self.local_heads, self.head_dim).unbind(1)
        q, k = apply_rotary_qk(q, k, cos, sin)
        out = self.core(q, k, v, cu_seqlens, max_seqlen)
        return self.proj(out.reshape(n, self.local_heads * self.head_dim))[0]


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs, config, group) -> None:
        super().__init__()
        self.norm1 = RMSNorm(args.hidden_size, VISION_NORM_EPS)
        self.attn = VisionAttention(args, config, group)
        self.norm2 = RMSNorm(args.hidden_size, VISION_NORM_EPS)
        self.mlp = SwiGLUMLP(args.hidden_size, args.intermediate_size, bias=True, config=config, group=group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        normed, x = self.norm2(self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen), residual=x)
        return x + self.mlp(normed)


class PatchMerger(nn.Module):
    """RMSNorm -> view ``merge**2`` neighbouring patches as one ``4C`` row -> Linear -> GELU -> Linear."""

    def __init__(self, args: VisionArgs, config, group) -> None:
        super().__init__()
        self.unit = args.spatial_merge_size**2
        width = args.hidden_size * self.unit
        self.ln_q = RMSNorm(args.hidden_size, VISION_NORM_EPS)
        self.fc1 = column_linear(width, width, bias=True, config=config, group=group)
        self.fc2 = row_linear(width, args.out_hidden_size, bias=True, config=config, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, C]`` -> ``[N / merge**2, out_hidden]``."""
        h = self.ln_q(x).reshape(x.shape[0] // self.unit, -1)
        return self.fc2(F.gelu(self.fc1(h)[0]))[0]


def image_owners(patches_per_image: torch.Tensor, ranks: int) -> torch.Tensor:
    """``[I]`` rank that encodes each image: contiguous runs of images, balanced by patch count (image i goes to
    the rank whose equal share of all patches contains the image's middle patch)."""
    middle = torch.cumsum(patches_per_image, 0) - patches_per_image + patches_per_image // 2
    total = max(int(patches_per_image.sum()), 1)
    return torch.clamp(middle * ranks // total, max=ranks - 1)


class VisionTower(nn.Module):
    """Pixel patches of every image of a batch -> one LLM embedding per merged unit, in image order.

    ``group``: the group its layers shard over (the TP group, or a one-rank group for a replicated tower).
    ``image_split_group``: with a replicated tower, the TP group whose ranks split the images between them while
    the patch embedding and blocks are frozen (each rank encodes ~1/tp of the patches without grad, one all-gather
    of the block outputs, then the merger runs on all of them with grad): the ViT is not computed tp times over.
    """

    def __init__(self, args: VisionArgs, config, group, image_split_group=None) -> None:
        super().__init__()
        self.args = args
        self.tp = group.size()
        self.image_split_group = image_split_group
        # Conv3d with kernel == stride over a pre-flattened patch is exactly a bias-free linear map.
        self.patch_embed = nn.Parameter(torch.empty(args.hidden_size, args.patch_dim))
        self.blocks = nn.ModuleList(VisionBlock(args, config, group) for _ in range(args.depth))
        self.merger = PatchMerger(args, config, group)
        self.full_attention = frozenset(args.fullatt_block_indexes)
        self.recompute = False
        """Activation checkpointing of every block (set by :meth:`RewardModel.set_recompute`)."""

    def encoder_trainable(self) -> bool:
        return self.patch_embed.requires_grad or any(p.requires_grad for p in self.blocks.parameters())

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``pixel_values [N, patch_dim]``, ``grid_thw [I, 3]`` -> ``[N / merge**2, out_hidden]`` (images in order).

        ``grid_thw`` may be on the host whatever the device of ``pixel_values`` (``PackedBatch.image_grid_thw_host``):
        the window metadata and the row checks are host work, so the host then never waits for the device; a grid
        on the device is read back once (a host synchronisation)."""
        a = self.args
        if pixel_values.dim() != 2 or pixel_values.shape[1] != a.patch_dim:
            raise ValueError(f"pixel_values must be [N, {a.patch_dim}], got {tuple(pixel_values.shape)}")
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but image_grid_thw implies {expected}")
        group = self.image_split_group
        if group is not None and group.size() > 1 and not self.encoder_trainable():
            x = self._encode_split(pixel_values, grid_thw, group)
        else:
            x = self.encode(pixel_values, grid_thw)
        return self.merger(x)

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Patch embedding + blocks: ``[N, patch_dim]`` -> ``[N, C]`` in image order (merge units contiguous);
        ``grid_thw`` on the host or the device, as in :meth:`forward`."""
        a = self.args
        dev = pixel_values.device
        meta = vision_windows(grid_thw.cpu(), spatial_merge_size=a.spatial_merge_size, window_size=a.window_size,
                              patch_size=a.patch_size).to(dev)
        window_index, cu_window, cu_full = meta.window_index, meta.cu_window_seqlens, meta.cu_seqlens
        n, unit = pixel_values.shape[0], a.spatial_merge_size**2

        def to_window_order(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)

        x = to_window_order(pixel_values.to(self.patch_embed.dtype) @ self.patch_embed.t())
        # Same frequencies for rows and columns, each over head_dim/2 of the rotated dims (HF "axial" rope); kept in
        # float32 whatever the parameter dtype, as transformers does.
        inv_freq = to_device(rope_inv_freq(a.head_dim // 2, a.rope_theta), dev)
        cos, sin = vision_rope_cos_sin(meta.rope_position_ids, inv_freq)
        cos, sin = to_window_order(cos), to_window_order(sin)
        for i, block in enumerate(self.blocks):
            if i in self.full_attention:
                x = run_layer(block, self.recompute, x, cos, sin, cu_full, meta.max_seqlen)
            else:
                x = run_layer(block, self.recompute, x, cos, sin, cu_window, meta.max_window_seqlen)
        # The merger maps each merge unit on its own, so units go back to image order before it, not after.
        return x.reshape(n // unit, unit, -1)[meta.reverse_index].reshape(n, -1)

    @torch.no_grad()
    def _encode_split(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, group) -> torch.Tensor:
        """:meth:`encode` of this rank's images only, then an all-gather: the same ``[N, C]`` on every rank."""
        ranks, rank = group.size(), group.rank()
        grid = grid_thw.cpu()
        patches = grid.prod(-1)
        owners = image_owners(patches, ranks)
        rows = torch.zeros(ranks, dtype=torch.int64).index_add_(0, owners, patches).tolist()
        start = sum(rows[:rank])
        mine = (owners == rank).nonzero().squeeze(1)
        width = self.args.hidden_size
        padded = pixel_values.new_zeros(max(rows), width, dtype=self.patch_embed.dtype)
        if mine.numel():
            padded[: rows[rank]] = self.encode(pixel_values[start: start + rows[rank]], grid[mine].to(grid_thw.device))
        # all_gather needs equal shapes on every rank: each share is padded to the largest one.
        gathered = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(gathered, padded, group=group)
        return torch.cat([g[:r] for g, r in zip(gathered, rows)])
