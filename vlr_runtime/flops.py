"""Model FLOPs of one reward-model training step, counted from the HF config (for MFU and the planner).

Counting rules (matmul FLOPs only: 2 per multiply-add; norms, rotary, softmax and elementwise ops are ignored, as in
the usual MFU definitions):
* LLM, per layer and token: q/k/v/o projections and the SwiGLU MLP; attention scores and values add
  ``4 * s_eff * hidden`` per token where ``s_eff`` is the number of keys the token attends to (causal: on average
  (s+1)/2 for a segment of length s - counted exactly per segment, never for padding).
* Vision, per patch: patch embedding, qkv/proj, SwiGLU MLP of each block; attention with the window length in window
  blocks and the image length in full-attention blocks; the patch merger on the merged tokens.
* Training multiplies forward FLOPs by 3 (forward + backward of activations + backward of weights) for trained parts;
  a frozen vision tower costs forward only (nothing before it needs gradients); a trained merger behind a frozen tower
  costs forward + weight gradients (x2), since the tower's input needs no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def _text(cfg: Mapping) -> Mapping:
    return cfg.get("text_config") or cfg


def _vision(cfg: Mapping) -> Mapping:
    v = cfg.get("vision_config")
    if v is None:
        raise KeyError("config has no vision_config: not a Qwen2.5-VL config")
    return v


@dataclass(kw_only=True)
class StepFlops:
    """FLOPs of one optimizer step, split by component (float, not int, to survive 72B-size sums in JSON)."""

    llm: float
    vision: float
    merger: float
    head: float

    @property
    def total(self) -> float:
        return self.llm + self.vision + self.merger + self.head


def _segment_keys(length: int, prefix: int, split: int) -> float:
    """Keys attended, summed over the queries of one causal segment. A shared-prompt pair ``[prompt | chosen |
    rejected]`` (``prefix`` = prompt length, ``split`` = prompt + chosen length, see ``PackedBatch``) attends
    causally over its first ``split`` tokens; each rejected token sees the prompt and the rejected tokens up to
    itself, never the chosen response. ``split == length`` is a plain causal segment."""
    if not 0 <= prefix <= split <= length:
        raise ValueError(f"shared-prompt segment needs 0 <= prefix <= split <= length, got {prefix}, {split}, "
                         f"{length}")
    rejected = length - split
    return split * (split + 1) / 2 + rejected * prefix + rejected * (rejected + 1) / 2


def llm_forward_flops(cfg: Mapping, seq_lens: Sequence[int], causal_seq_lens: bool = True,
                      prefix_lens: Sequence[int] | None = None, split_lens: Sequence[int] | None = None) -> float:
    """Forward FLOPs of the decoder stack over packed segments of the given lengths.

    Args:
        cfg: HF Qwen2.5-VL ``config.json`` dict (nested ``text_config`` or flat Qwen2 fields).
        seq_lens: token count of each packed segment.
        prefix_lens, split_lens: the shared-prompt layout's per-segment prompt length and prompt + chosen length
            (``PackedBatch.prefix_lens`` / ``split_lens``; causal only): attention is counted over the keys each
            token really sees. Both or neither.
    """
    t = _text(cfg)
    h = t["hidden_size"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads", heads)
    hd = t.get("head_dim") or h // heads
    inter = t["intermediate_size"]
    layers = t["num_hidden_layers"]
    proj = h * heads * hd * 2 + 2 * h * kv * hd  # q, o and k, v
    mlp = 3 * h * inter
    tokens = sum(seq_lens)
    linear = 2 * (proj + mlp) * tokens
    if (prefix_lens is None) != (split_lens is None):
        raise ValueError("prefix_lens and split_lens go together (the shared-prompt layout needs both)")
    if prefix_lens is not None:
        if not causal_seq_lens:
            raise ValueError("the shared-prompt layout is causal")
        if not len(prefix_lens) == len(split_lens) == len(seq_lens):
            raise ValueError(f"{len(seq_lens)} segments but {len(prefix_lens)} prefix and {len(split_lens)} split "
                             "lengths")
        keys = sum(_segment_keys(s, p, q) for s, p, q in zip(seq_lens, prefix_lens, split_lens))
    elif causal_seq_lens:
        keys = sum(s * (s + 1) / 2 for s in seq_lens)
    else:
        keys = sum(s * s for s in seq_lens)
    attn = 4 * heads * hd * keys  # QK^T and PV, 2 FLOPs per MAC each
    return float(layers * (linear + attn))


def _window_lengths(grid_h: int, grid_w: int, window_merged: int, merge: int) -> list[int]:
    """Patch counts of the windows of one image (windows of ``window_merged`` x ``window_merged`` merged units)."""
    mh, mw = grid_h // merge, grid_w // merge
    lens = []
    for r0 in range(0, mh, window_merged):
        for c0 in range(0, mw, window_merged):
            lens.append(min(window_merged, mh - r0) * min(window_merged, mw - c0) * merge * merge)
    return lens


def vision_forward_flops(cfg: Mapping, grids_thw: Sequence[Sequence[int]]) -> tuple[float, float]:
    """Forward FLOPs of (vision tower blocks + patch embed, patch merger) for images with the given (t, h, w) grids."""
    v = _vision(cfg)
    c = v["hidden_size"]
    inter = v["intermediate_size"]
    depth = v["depth"]
    heads = v["num_heads"]
    hd = c // heads
    merge = v.get("spatial_merge_size", 2)
    patch = v.get("patch_size", 14)
    tp = v.get("temporal_patch_size", 2)
    out = v.get("out_hidden_size", c)
    full = set(v.get("fullatt_block_indexes", []))
    window_merged = v.get("window_size", 112) // patch // merge
    patch_in = v.get("in_channels", 3) * tp * patch * patch

    tower = 0.0
    merger = 0.0
    for t, gh, gw in grids_thw:
        n = t * gh * gw
        tower += 2 * patch_in * c * n
        per_block_linear = 2 * n * (4 * c * c + 3 * c * inter)
        full_keys = t * (gh * gw) ** 2
        win_keys = t * sum(w * w for w in _window_lengths(gh, gw, window_merged, merge))
        for b in range(depth):
            keys = full_keys if b in full else win_keys
            tower += per_block_linear + 4 * heads * hd * keys
        merged = n // (merge * merge)
        mc = c * merge * merge
        merger += 2 * merged * (mc * mc + mc * out)
    return float(tower), float(merger)


def training_step_flops(
    cfg: Mapping,
    seq_lens: Sequence[int],
    grids_thw: Sequence[Sequence[int]],
    *,
    vision_trained: bool = False,
    merger_trained: bool = True,
    num_scored: int = 0,
    prefix_lens: Sequence[int] | None = None,
    split_lens: Sequence[int] | None = None,
) -> StepFlops:
    """FLOPs of one training step (forward + backward) on one packed batch.

    Args:
        seq_lens: lengths of the packed LLM segments; grids_thw: grid of every *encoded* image (each once).
        num_scored: number of scored tokens (reward head work: negligible, counted for completeness).
        prefix_lens, split_lens: the shared-prompt layout of the segments (see :func:`llm_forward_flops`).
    """
    tower, merger = vision_forward_flops(cfg, grids_thw) if grids_thw else (0.0, 0.0)
    h = _text(cfg)["hidden_size"]
    merger_mult = 3 if vision_trained else (2 if merger_trained else 1)
    return StepFlops(
        llm=3 * llm_forward_flops(cfg, seq_lens, prefix_lens=prefix_lens, split_lens=split_lens),
        vision=(3 if vision_trained else 1) * tower,
        merger=merger_mult * merger,
        head=3 * 2.0 * h * num_scored,
    )


def batch_step_flops(cfg: Mapping, batch, *, vision_trained: bool = False, merger_trained: bool = True) -> StepFlops:
    """:func:`training_step_flops` of one ``vlr_runtime.data.types.PackedBatch``: its segments (with their
    shared-prompt layout, when it has one), its encoded images and its scored tokens."""
    shared = batch.prefix_lens is not None
    return training_step_flops(
        cfg, batch.cu_seqlens.diff().tolist(), [] if batch.image_grid_thw is None else batch.image_grid_thw.tolist(),
        vision_trained=vision_trained, merger_trained=merger_trained, num_scored=batch.scored_index.numel(),
        prefix_lens=batch.prefix_lens.tolist() if shared else None,
        split_lens=batch.split_lens.tolist() if shared else None)


def mfu(step_flops: float, step_time_s: float, peak_flops_per_s: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    if step_time_s <= 0 or peak_flops_per_s <= 0:
        raise ValueError("step time and peak FLOP/s must be positive")
    return step_flops / step_time_s / (peak_flops_per_s * num_devices)


# Dense bf16 peak FLOP/s of the accelerators the product targets (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops_for(device_name: str) -> float | None:
    """Datasheet bf16 peak for a CUDA device name, or None when unknown (MFU is then not reported)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None
