"""Examples -> processed examples (images decoded and patchified once per row) -> one :class:`PackedBatch`.

Scored-row order in a batch: for every example in batch order, its sequences in order (pair: chosen, rejected;
VL-RewardBench row: its responses), so ``rewards[k]`` of the model maps back with :func:`split_scores`.

Layouts: plain (every sequence its own causal segment) or shared-prompt (a pair is one segment
``[prompt | chosen response | rejected response]``, see :class:`PackedBatch`). In the shared layout the prompt -
including its image tokens - is stored once, so the image's placeholder group appears once in ``image_index``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlr_runtime.data.errors import DataError
from vlr_runtime.data.images import DEFAULT_MAX_DECODE_PIXELS, decode_image, image_size
from vlr_runtime.data.positions import mrope_position_ids
from vlr_runtime.data.processor import ImageProcessorConfig, image_grid, process_image
from vlr_runtime.data.tokenize import ChatTokenizer, LengthPolicy
from vlr_runtime.data.types import (
    PackedBatch,
    PairExample,
    ProcessedImage,
    ProcessedSequence,
    RankExample,
    image_token_index,
)


@dataclass(kw_only=True)
class ProcessedExample:
    """One row ready for packing: tokenized sequences plus its unique images."""

    id: str
    images: list[ProcessedImage]
    sequences: list[ProcessedSequence]
    is_pair: bool
    margin: float = 0.0
    prefix_len: int = 0
    """Leading tokens common to all sequences (shareable prompt); never ends inside an image group."""
    truncated: int = 0
    """How many of the sequences the length policy shortened."""
    category: str = ""
    human_ranking: list[int] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        return sum(int(im.pixel_values.shape[0]) for im in self.images)

    def num_tokens(self, shared_prompt: bool = False) -> int:
        """LLM tokens this example occupies in a packed batch of the given layout."""
        lengths = [int(s.input_ids.numel()) for s in self.sequences]
        if shared_prompt and self.is_pair:
            return self.prefix_len + sum(n - self.prefix_len for n in lengths)
        return sum(lengths)


def _shared_prefix(a: torch.Tensor, b: torch.Tensor, image_token_id: int) -> int:
    n = min(a.numel(), b.numel()) - 1
    diff = torch.nonzero(a[:n] != b[:n])
    k = int(diff[0]) if diff.numel() else n
    while 0 < k < a.numel() and int(a[k - 1]) == image_token_id and int(a[k]) == image_token_id:
        k -= 1
    return k


class Preprocessor:
    """Decode, resize/patchify and tokenize rows for one model directory.

    Args:
        model_dir: HF model directory (tokenizer + chat template + ``preprocessor_config.json``).
        max_length, length_policy: per-sequence limit and policy (see :mod:`vlr_runtime.data.tokenize`).
        max_decode_pixels: cap on an image's declared pixel count, checked before decoding.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_length: int | None = None,
        length_policy: LengthPolicy = "drop",
        max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
    ) -> None:
        self.image_cfg = ImageProcessorConfig.from_model_dir(model_dir)
        self.tokenizer = ChatTokenizer(
            model_dir, merge_size=self.image_cfg.merge_size, max_length=max_length, length_policy=length_policy
        )
        self.max_decode_pixels = max_decode_pixels

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.image_token_id

    def images(self, paths: list[Path]) -> list[ProcessedImage]:
        return [process_image(decode_image(p, max_pixels=self.max_decode_pixels), self.image_cfg) for p in paths]

    def _tokenize(
        self, example: PairExample | RankExample, grids: list[tuple[int, int, int]]
    ) -> tuple[list[ProcessedSequence], int, int]:
        responses = [example.chosen, example.rejected] if isinstance(example, PairExample) else example.responses
        seqs, truncated = [], 0
        for response in responses:
            seq, _, cut = self.tokenizer.encode(example.prompt, response, grids)
            seqs.append(seq)
            truncated += int(cut)
        prefix = min(_shared_prefix(seqs[0].input_ids, s.input_ids, self.image_token_id) for s in seqs[1:])
        return seqs, truncated, prefix

    def estimate(self, example: PairExample | RankExample, *, shared_prompt: bool = False) -> tuple[int, int]:
        """(LLM tokens in the given layout, vision patches) of ``example`` from image headers only (no pixel
        decoded): exact for every row that later decodes. Raises :class:`DataError` like :meth:`__call__`."""
        grids = [
            image_grid(h, w, self.image_cfg)
            for w, h in (image_size(p, max_pixels=self.max_decode_pixels) for p in example.images)
        ]
        seqs, _, prefix = self._tokenize(example, grids)
        lengths = [int(s.input_ids.numel()) for s in seqs]
        shared = shared_prompt and isinstance(example, PairExample)
        tokens = prefix + sum(n - prefix for n in lengths) if shared else sum(lengths)
        return tokens, sum(t * h * w for t, h, w in grids)

    def __call__(self, example: PairExample | RankExample) -> ProcessedExample:
        """Raises :class:`DataError` for any unusable part of the row."""
        images = self.images(example.images)
        seqs, truncated, prefix = self._tokenize(example, [im.grid_thw for im in images])
        is_pair = isinstance(example, PairExample)
        return ProcessedExample(
            id=example.id,
            images=images,
            sequences=seqs,
            is_pair=is_pair,
            margin=example.margin if is_pair else 0.0,
            prefix_len=prefix,
            truncated=truncated,
            category=example.category,
            human_ranking=[] if is_pair else list(example.human_ranking),
        )


def _groups_before(ids: torch.Tensor, end: int, image_token_id: int) -> int:
    """Number of image placeholder groups that start before ``end``."""
    is_img = ids[:end] == image_token_id
    if is_img.numel() == 0:
        return 0
    starts = is_img.clone()
    starts[1:] &= ~is_img[:-1]
    return int(starts.sum())


def collate(
    examples: list[ProcessedExample], *, image_token_id: int, merge_size: int = 2, shared_prompt: bool = False
) -> PackedBatch:
    """Pack ``examples`` into one :class:`PackedBatch` (no padding); see the module docstring for the layouts.

    The batch carries the host-side image facts (``image_grid_thw_host``, ``image_token_pos``,
    ``image_token_rows``) that let the model run without host synchronisations; raises ValueError when the
    placeholder tokens do not match the image groups.

    Image groups of one sequence must be separated by at least one text token (the Qwen template always wraps them
    in ``<|vision_start|>``/``<|vision_end|>``).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    pieces: list[torch.Tensor] = []
    seqlens: list[int] = []
    scored: list[int] = []
    pairs: list[tuple[int, int]] = []
    image_index: list[int] = []
    prefix_lens: list[int] = []
    split_lens: list[int] = []
    pixel_values: list[torch.Tensor] = []
    grid_rows: list[tuple[int, int, int]] = []
    offset = 0
    for ex in examples:
        first_image = len(grid_rows)
        for im in ex.images:
            pixel_values.append(im.pixel_values)
            grid_rows.append(im.grid_thw)
        first_scored = len(scored)
        if shared_prompt and ex.is_pair:
            chosen, rejected = ex.sequences
            p = ex.prefix_len
            n_prompt_groups = _groups_before(chosen.input_ids, p, image_token_id)
            segment = torch.cat([chosen.input_ids, rejected.input_ids[p:]])
            image_index += [first_image + r for r in chosen.image_refs]
            image_index += [first_image + r for r in rejected.image_refs[n_prompt_groups:]]
            pieces.append(segment)
            seqlens.append(segment.numel())
            prefix_lens.append(p)
            split_lens.append(chosen.input_ids.numel())
            scored += [offset + chosen.scored_pos, offset + chosen.input_ids.numel() + rejected.scored_pos - p]
            offset += segment.numel()
        else:
            for seq in ex.sequences:
                pieces.append(seq.input_ids)
                seqlens.append(seq.input_ids.numel())
                prefix_lens.append(0)
                split_lens.append(seq.input_ids.numel())
                image_index += [first_image + r for r in seq.image_refs]
                scored.append(offset + seq.scored_pos)
                offset += seq.input_ids.numel()
        if ex.is_pair:
            pairs.append((first_scored, first_scored + 1))
    input_ids = torch.cat(pieces)
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int64), 0).to(torch.int32)
    grid = torch.tensor(grid_rows, dtype=torch.int64).reshape(-1, 3)
    index = torch.tensor(image_index, dtype=torch.int64)
    pre = torch.tensor(prefix_lens, dtype=torch.int32) if shared_prompt else None
    spl = torch.tensor(split_lens, dtype=torch.int32) if shared_prompt else None
    sample_ids = [ex.id for ex in examples]
    # Host-known image facts, so that the model never reads them back from the device (see PackedBatch); checked
    # here first, for the clearest message about placeholders that do not match the images.
    token_pos, token_rows = image_token_index(input_ids, grid if grid_rows else None, index,
                                              image_token_id=image_token_id, spatial_merge_size=merge_size,
                                              sample_ids=sample_ids)
    position_ids = mrope_position_ids(
        input_ids, cu, grid[index], image_token_id=image_token_id, spatial_merge_size=merge_size,
        prefix_lens=pre, split_lens=spl,
    )
    margins = [ex.margin for ex in examples if ex.is_pair]
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu,
        max_seqlen=max(seqlens),
        scored_index=torch.tensor(scored, dtype=torch.int64),
        pair_index=torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2),
        margin=torch.tensor(margins, dtype=torch.float32) if any(m != 0.0 for m in margins) else None,
        pixel_values=torch.cat(pixel_values) if pixel_values else None,
        image_grid_thw=grid if grid_rows else None,
        image_index=index if grid_rows else None,
        prefix_lens=pre,
        split_lens=spl,
        sample_ids=sample_ids,
        image_grid_thw_host=grid.clone() if grid_rows else None,
        image_token_pos=token_pos,
        image_token_rows=token_rows,
    )


def split_scores(rewards: torch.Tensor, examples: list[ProcessedExample]) -> list[list[float]]:
    """``rewards [S]`` of a batch built by :func:`collate` -> per example, one score per sequence."""
    out, k = [], 0
    for ex in examples:
        n = len(ex.sequences)
        out.append([float(v) for v in rewards[k : k + n]])
        k += n
    if k != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards for {k} scored sequences")
    return out


__all__ = ["DataError", "Preprocessor", "ProcessedExample", "collate", "split_scores"]
