"""The data contracts shared by the readers, the preprocessing, the packer, the model and the scorer.

Rows are parsed into :class:`PairExample` (training/eval pairs) or :class:`RankExample` (VL-RewardBench style:
one query, several responses, a human ranking). Preprocessing turns each conversation into a
:class:`ProcessedSequence`; the packer concatenates sequences into one :class:`PackedBatch` with no padding.

Conversations are lists of chat messages in the transformers conversational format::

    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}

Plain strings are normalised by the readers into that form (``content`` always a list of parts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

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
    image_grid_thw_host: torch.Tensor | None = None
    """``[I, 3]`` int64 on the host: ``image_grid_thw`` again, a copy :meth:`to` never moves, so that the model's
    host-side work on the grids (vision window metadata, row counts) reads nothing back from the device."""
    image_token_pos: torch.Tensor | None = None
    """``[M]`` int64 rows of the packed token axis holding ``<|image_pad|>``, in order (M placeholder tokens)."""
    image_token_rows: torch.Tensor | None = None
    """``[M]`` int64, for each of those tokens, the row of the vision tower output (merged units of the unique
    images, in image order) whose embedding replaces it.

    The three fields above are host-known facts that :func:`vlr_runtime.data.collate.collate` computes (and checks
    against the image groups) on the CPU, so that a forward and backward of the model on a CUDA device never waits
    for the GPU. A batch without them (built by hand) still works: the model then derives them from the device
    tensors, with host synchronisations (see :func:`image_token_index`)."""

    HOST_FIELDS: ClassVar[frozenset[str]] = frozenset({"image_grid_thw_host"})
    """Tensor fields that stay on the host in :meth:`to`."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    def to(self, device: torch.device | str) -> PackedBatch:
        """Every tensor field but :attr:`HOST_FIELDS` moved to ``device`` with :func:`to_device` (non-blocking)."""
        device = torch.device(device)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = to_device(v, device) if isinstance(v, torch.Tensor) and f.name not in self.HOST_FIELDS else v
        return PackedBatch(**out)

    def with_image_facts(self, *, image_token_id: int, spatial_merge_size: int) -> PackedBatch:
        """This batch with ``image_grid_thw_host``, ``image_token_pos`` and ``image_token_rows`` derived from its own
        tensors (what :func:`~vlr_runtime.data.collate.collate` fills in), for a batch built by hand: call it on
        the host batch, before :meth:`to`. Raises ValueError like :func:`image_token_index`."""
        pos, rows = image_token_index(self.input_ids, self.image_grid_thw, self.image_index,
                                      image_token_id=image_token_id, spatial_merge_size=spatial_merge_size,
                                      sample_ids=self.sample_ids)
        grid = None if self.image_grid_thw is None else self.image_grid_thw.cpu().clone()
        return replace(self, image_grid_thw_host=grid, image_token_pos=pos, image_token_rows=rows)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait: a non-blocking copy, from page-locked memory when it
    goes from the host to a CUDA device (from pageable memory the driver may wait for the GPU queue to drain
    before it can stage the copy). The host tensor must not be modified afterwards."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def image_token_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_index: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    sample_ids: list[str] | tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_token_pos [M], image_token_rows [M])`` of a packed batch (see :class:`PackedBatch`).

    Args:
        input_ids: ``[T]`` packed tokens.
        image_grid_thw: ``[I, 3]`` grid of each unique image, or None for a batch without images.
        image_index: ``[G]`` image of each placeholder group in token order (None: group g is image g).
    Group g holds ``t*h*w / spatial_merge_size**2`` tokens of its image. Raises ValueError when the placeholder
    count differs from what the image groups need. Reads the values of its inputs: on CUDA tensors that is a host
    synchronisation; :func:`~vlr_runtime.data.collate.collate` calls it on the host tensors.
    """
    pos = (input_ids == image_token_id).nonzero().squeeze(1)
    if image_grid_thw is None or image_grid_thw.shape[0] == 0:
        if pos.numel():
            raise ValueError(f"batch has {pos.numel()} <|image_pad|> tokens but no images (ids {list(sample_ids)})")
        return pos, pos.clone()
    tokens_per_image = image_grid_thw.prod(-1) // spatial_merge_size**2
    if image_index is None:
        image_index = torch.arange(image_grid_thw.shape[0], device=image_grid_thw.device)
    group_sizes = tokens_per_image[image_index]
    total = int(group_sizes.sum())
    if total != pos.numel():
        raise ValueError(f"{pos.numel()} <|image_pad|> tokens but the image groups need {total} "
                         f"(ids {list(sample_ids)})")
    # Row for every placeholder token: its image's first row + its offset inside the group.
    image_start = torch.cumsum(tokens_per_image, 0) - tokens_per_image
    group_start = torch.cumsum(group_sizes, 0) - group_sizes
    offset = torch.arange(total, device=group_sizes.device) - torch.repeat_interleave(
        group_start, group_sizes, output_size=total)
    rows = torch.repeat_interleave(image_start[image_index], group_sizes, output_size=total) + offset
    return pos, rows.to(pos.device)
