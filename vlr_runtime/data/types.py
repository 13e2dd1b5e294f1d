"""The data contracts shared by the readers, the preprocessing, the packer, the model and the scorer.

Rows are parsed into :class:`PairExample` (training/eval pairs) or :class:`RankExample` (VL-RewardBench style:
one query, several responses, a human ranking). Preprocessing turns each conversation into a
:class:`ProcessedSequence`; the packer concatenates sequences into one :class:`PackedBatch` with no padding.

Conversations are lists of chat messages in the transformers conversational format::

    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}

Plain strings are normalised by the readers into that form (``content`` always a list of parts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

Message = dict  # {"role": str, "content": list[{"type": "text", "text": str} | {"type": "image"}]}


@dataclass(kw_only=True)
class PairExample:
    """One preference pair. ``prompt + chosen`` and ``prompt + rejected`` are the two scored conversations."""

    id: str
    images: list[Path]
    """Image files in the order of the ``{"type": "image"}`` placeholders of the prompt (absolute paths)."""
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float = 0.0
    category: str = ""
    """Evaluation group (RewardBench ``subset``); empty for training rows."""


@dataclass(kw_only=True)
class RankExample:
    """A VL-RewardBench style row: one prompt, ``len(responses)`` candidate answers, a human ranking
    (``human_ranking[i]`` = rank of response i, 0 = best)."""

    id: str
    images: list[Path]
    prompt: list[Message]
    responses: list[list[Message]]
    human_ranking: list[int]
    category: str = ""


@dataclass(kw_only=True)
class ProcessedImage:
    """One image after resize + patchification, exactly as the Qwen2.5-VL image processor lays it out."""

    pixel_values: torch.Tensor
    """``[grid_t*grid_h*grid_w, C*temporal_patch*patch*patch]`` float32 (HF ``pixel_values`` rows)."""
    grid_thw: tuple[int, int, int]


@dataclass(kw_only=True)
class ProcessedSequence:
    """One templated conversation, tokenized, with its image placeholders expanded."""

    input_ids: torch.Tensor
    """``[L]`` int64, ``<|image_pad|>`` repeated ``t*h*w / merge**2`` times per image."""
    image_refs: list[int] = field(default_factory=list)
    """For each image placeholder group in token order, the index of the image in the owning example's image list."""
    scored_pos: int = -1
    """Position (within this sequence) of the scored token: the last token of the templated conversation."""


@dataclass(kw_only=True)
class PackedBatch:
    """Sequences concatenated along one token axis (``T`` tokens, ``N`` sequences), no padding.

    Layout of a plain pair: two sequences ``prompt+chosen`` and ``prompt+rejected``. With the shared-prompt layout a
    pair is one segment ``[prompt | chosen | rejected]`` whose rejected part attends to the prompt and itself only;
    ``prefix_lens[i]`` is then the prompt length of segment i (0 for a plain causal segment) and ``split_lens[i]`` the
    length of prompt+chosen. Position ids of the rejected part restart right after the prompt.
    """

    input_ids: torch.Tensor
    """``[T]`` int64."""
    position_ids: torch.Tensor
    """``[3, T]`` int64 M-RoPE positions (temporal, height, width), as transformers' ``get_rope_index``."""
    cu_seqlens: torch.Tensor
    """``[N+1]`` int32 segment boundaries."""
    max_seqlen: int
    scored_index: torch.Tensor
    """``[S]`` int64 rows of the packed token axis whose final hidden state is scored."""
    pair_index: torch.Tensor
    """``[P, 2]`` int64 positions in ``scored_index``: (chosen, rejected). Empty ``[0, 2]`` for scoring-only."""
    margin: torch.Tensor | None = None
    """``[P]`` float32 per-pair margin, or None."""
    pixel_values: torch.Tensor | None = None
    """``[sum_i t_i*h_i*w_i, C*2*14*14]`` float32: every *unique* image of the batch once (shared by chosen/rejected)."""
    image_grid_thw: torch.Tensor | None = None
    """``[I, 3]`` int64 grid of each unique image."""
    image_index: torch.Tensor | None = None
    """``[G]`` int64: for each ``<|image_pad|>`` group in packed token order, the row of ``image_grid_thw`` whose
    embeddings fill it. Images used by both sides of a pair appear twice here and once in ``pixel_values``."""
    prefix_lens: torch.Tensor | None = None
    """``[N]`` int32 shared-prompt length per segment (shared-prompt layout only)."""
    split_lens: torch.Tensor | None = None
    """``[N]`` int32 length of prompt+chosen per segment (shared-prompt layout only)."""
    sample_ids: list[str] = field(default_factory=list)
    """Row ids of the pairs/rows in this batch (for error messages and metrics)."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    def to(self, device: torch.device | str) -> "PackedBatch":
        """Move every tensor field to ``device`` (non-blocking where possible)."""
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            out[name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**out)
