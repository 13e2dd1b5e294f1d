"""Deterministic, resumable, rank-consistent training loader.

The data is one endless stream: epoch ``e`` is a permutation of all rows drawn from ``(seed, e)``, and epochs follow
each other. Step ``k`` takes stream positions ``[k*B, (k+1)*B)`` (``B = pairs_per_step``, global over all data-
parallel ranks), so a step's content is a pure function of ``(seed, k)`` and the data files:

* resuming sets the stream position - nothing is replayed, nothing skipped or repeated, also across epochs;
* every rank estimates the cost of all ``B`` rows of the step from text + image headers (no pixel decoded), computes
  the same :func:`~vlr_runtime.data.packing.pack_microbatches` plan, then decodes and collates only its own share.
  Every rank therefore gets the same number of microbatches per step and the same ``any_images`` flags (so a model
  with collectives in its vision path runs them on every rank), without any communication.

Worker processes (``num_workers``) build whole steps ahead (``prefetch_steps`` beyond one per worker); results are
consumed in step order, so the output does not depend on worker timing. Bad rows are counted by reason, never fatal.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import torch

from vlr_runtime.data.collate import Preprocessor, ProcessedExample, collate
from vlr_runtime.data.errors import DataError
from vlr_runtime.data.formats import RowIndex, example_from_row, row_id
from vlr_runtime.data.packing import pack_microbatches
from vlr_runtime.data.types import PackedBatch, PairExample


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How the stream is cut into steps and microbatches."""

    pairs_per_step: int
    """Rows per optimizer step, summed over all data-parallel ranks."""
    token_budget: int
    """Maximum LLM tokens in one microbatch (a longer pair is rejected as ``over_length``)."""
    seed: int = 0
    shared_prompt: bool = False
    """Pack each pair as ``[prompt | chosen | rejected]`` (one prompt copy)."""
    patch_weight: float = 1.0
    """Cost of one vision patch relative to one LLM token, for rank balancing."""
    num_workers: int = 0
    prefetch_steps: int = 2

    def __post_init__(self) -> None:
        if self.pairs_per_step <= 0 or self.token_budget <= 0:
            raise ValueError("pairs_per_step and token_budget must be positive")
        if self.num_workers < 0 or self.prefetch_steps < 0:
            raise ValueError("num_workers and prefetch_steps must be >= 0")


@dataclass(kw_only=True)
class StepBatch:
    """This rank's share of one optimizer step."""

    step: int
    microbatches: list[PackedBatch | None]
    """Same length on every rank. ``None``: this rank has no example for that microbatch (fewer examples than
    microbatches, or its rows failed to decode); run it as a zero-loss pass so that the collectives line up."""
    pairs: list[int]
    """Pairs in each microbatch of this rank."""
    global_pairs: int
    """Usable rows of the step over all ranks (as planned; normalise the loss by it)."""
    any_images: list[bool]
    """Per microbatch index: whether any rank's microbatch has images (identical on every rank)."""
    rejected_global: list[tuple[str, str]] = field(default_factory=list)
    """(row id, reason) rejected while planning: seen identically by every rank (count it once)."""
    rejected_local: list[tuple[str, str]] = field(default_factory=list)
    """(row id, reason) of this rank's rows that failed at decode time (e.g. truncated image)."""
    truncated: int = 0
    """Sequences of this rank shortened by the length policy."""


@dataclass
class _Context:
    index: RowIndex
    preprocessor: Preprocessor
    cfg: LoaderConfig
    rank: int
    world_size: int


_WORKER_CONTEXT: _Context | None = None


def _init_worker(ctx: _Context) -> None:
    global _WORKER_CONTEXT
    torch.set_num_threads(1)
    _WORKER_CONTEXT = ctx


def _build_in_worker(step: int, rows: list[int]) -> StepBatch:
    assert _WORKER_CONTEXT is not None
    return build_step(_WORKER_CONTEXT, step, rows)


def build_step(ctx: _Context, step: int, rows: Sequence[int]) -> StepBatch:
    """Plan the whole step from cost estimates, then decode and collate this rank's share."""
    cfg, pre = ctx.cfg, ctx.preprocessor
    examples, tokens, patches, rejected_global = [], [], [], []
    for i in rows:
        try:
            ex = example_from_row(ctx.index, i)
            if not isinstance(ex, PairExample):
                raise DataError("bad_field", "a ranking (VL-RewardBench) row is not a training pair")
            t, p = pre.estimate(ex, shared_prompt=cfg.shared_prompt)
            if t > cfg.token_budget:
                raise DataError("over_length", f"{t} tokens > token budget {cfg.token_budget}")
        except DataError as e:
            rejected_global.append((row_id(ctx.index, i), e.reason))
            continue
        examples.append(ex)
        tokens.append(t)
        patches.append(p)
    if not examples:
        return StepBatch(step=step, microbatches=[None], pairs=[0], global_pairs=0, any_images=[False],
                         rejected_global=rejected_global)
    plan = pack_microbatches(
        tokens, patches, num_ranks=ctx.world_size, token_budget=cfg.token_budget, patch_weight=cfg.patch_weight
    )
    any_images = [
        any(patches[i] > 0 for r in range(ctx.world_size) for i in plan.microbatches[r][m])
        for m in range(plan.num_microbatches)
    ]
    micro: list[PackedBatch | None] = []
    pairs: list[int] = []
    rejected_local: list[tuple[str, str]] = []
    truncated = 0
    for mb in plan.microbatches[ctx.rank]:
        processed: list[ProcessedExample] = []
        for i in mb:
            try:
                processed.append(pre(examples[i]))
            except DataError as e:
                rejected_local.append((examples[i].id, e.reason))
        truncated += sum(p.truncated for p in processed)
        pairs.append(sum(1 for p in processed if p.is_pair))
        micro.append(
            collate(processed, image_token_id=pre.image_token_id, merge_size=pre.image_cfg.merge_size,
                    shared_prompt=cfg.shared_prompt)
            if processed else None
        )
    return StepBatch(
        step=step, microbatches=micro, pairs=pairs, global_pairs=len(examples), any_images=any_images,
        rejected_global=rejected_global, rejected_local=rejected_local, truncated=truncated,
    )


class PairLoader:
    """Endless iterator of :class:`StepBatch` for one data-parallel rank.

    Args:
        data: data files (see :func:`~vlr_runtime.data.formats.expand_shards`).
        preprocessor: tokenizer + image settings of the model directory.
        cfg: step layout, seed, workers.
        rank, world_size: data-parallel coordinates (tensor/pipeline ranks of one replica share a ``rank``).
    """

    def __init__(
        self,
        data: str | Path | Sequence[str | Path],
        preprocessor: Preprocessor,
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        index = RowIndex(data)
        if len(index) == 0:
            raise ValueError(f"{data!r} holds no rows")
        self._ctx = _Context(index=index, preprocessor=preprocessor, cfg=cfg, rank=rank, world_size=world_size)
        self.cfg = cfg
        self.step = 0
        self.rejected_counts: Counter[str] = Counter()
        self._pool: ProcessPoolExecutor | None = None
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_rows(self) -> int:
        return len(self._ctx.index)

    def _rows_of_step(self, step: int) -> list[int]:
        n, b = self.num_rows, self.cfg.pairs_per_step
        rows = []
        for pos in range(step * b, (step + 1) * b):
            epoch, offset = divmod(pos, n)
            if self._perm_cache is None or self._perm_cache[0] != epoch:
                self._perm_cache = (epoch, np.random.default_rng([self.cfg.seed, epoch]).permutation(n))
            rows.append(int(self._perm_cache[1][offset]))
        return rows

    def epoch_of_step(self, step: int) -> float:
        """Fractional epoch at the start of ``step``."""
        return step * self.cfg.pairs_per_step / self.num_rows

    def state_dict(self) -> dict:
        """Everything needed to continue exactly after the last yielded step (no replay on load). The position is
        global (a step's rows do not depend on ``rank``/``world_size``), so the state of any rank resumes a loader
        of any rank and any data-parallel size; only ``rejected_counts`` is this rank's."""
        return {
            "step": self.step, "seed": self.cfg.seed, "pairs_per_step": self.cfg.pairs_per_step,
            "num_rows": self.num_rows, "rejected_counts": dict(self.rejected_counts),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.cfg.seed), ("pairs_per_step", self.cfg.pairs_per_step),
                          ("num_rows", self.num_rows)):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {mine}: not the same stream")
        self.close()
        self.step = int(state["step"])
        self.rejected_counts = Counter(state.get("rejected_counts", {}))

    def _count(self, sb: StepBatch) -> None:
        # Planning rejections are identical on every rank; count them here and decode failures of this rank.
        self.rejected_counts.update(r for _, r in sb.rejected_global)
        self.rejected_counts.update(r for _, r in sb.rejected_local)

    def __iter__(self) -> Iterator[StepBatch]:
        if self.cfg.num_workers == 0:
            while True:
                sb = build_step(self._ctx, self.step, self._rows_of_step(self.step))
                self.step += 1
                self._count(sb)
                yield sb
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.close()
        self._pool = ProcessPoolExecutor(
            self.cfg.num_workers, mp_context=mp.get_context("fork"), initializer=_init_worker, initargs=(self._ctx,)
        )
        pending: deque[Future] = deque()
        next_submit = self.step
        try:
            while True:
                while len(pending) < self.cfg.num_workers + self.cfg.prefetch_steps:
                    pending.append(self._pool.submit(_build_in_worker, next_submit, self._rows_of_step(next_submit)))
                    next_submit += 1
                sb = pending.popleft().result()
                self.step = sb.step + 1
                self._count(sb)
                yield sb
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        """Stop the worker processes (a new iteration starts fresh ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
