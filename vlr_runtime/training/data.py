"""Where the trainer's pairs come from: the resolved data sources (built-in synthetic set or user files), an
optional in-memory cache of prepared pairs, and the held-out sets.

Training batches come from the data package's :class:`~vlr_runtime.data.loader.PairLoader` (seeded order,
token-budget micro-batches balanced over DP ranks, resumable); rows it cannot use are counted by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vlr_runtime.config import DataConfig, ModelConfig
from vlr_runtime.data.collate import Preprocessor, ProcessedExample, collate
from vlr_runtime.data.errors import DataError
from vlr_runtime.data.formats import read_examples
from vlr_runtime.data.synthetic import SyntheticSpec, ensure_synthetic
from vlr_runtime.data.types import PackedBatch, PairExample


@dataclass(kw_only=True)
class DataSources:
    """Resolved inputs of a run."""

    train: list[str]
    evals: dict[str, list[str]]
    """Evaluation sets by name: ``eval`` (image + text pairs) and, for the synthetic set, ``noise`` (its image pairs
    with every image replaced by noise)."""
    model_dir: Path


def resolve_sources(data: DataConfig, model: ModelConfig, *, local_rank: int) -> DataSources:
    """Files of the run; generates the synthetic set (and the tiny model directory) when it is used.

    Local rank 0 generates first while the other ranks of the node wait, so a node generates once.
    """
    needs_synthetic = not data.train or not model.path
    synthetic = None
    if needs_synthetic:
        spec = SyntheticSpec(train_pairs=data.synthetic_train_pairs, eval_pairs=data.synthetic_eval_pairs)
        if local_rank == 0:
            synthetic = ensure_synthetic(data.cache_dir or None, spec)
        if dist.is_initialized():
            dist.barrier()
        if local_rank != 0:
            synthetic = ensure_synthetic(data.cache_dir or None, spec)
    model_dir = Path(model.path) if model.path else synthetic.model_dir
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model.path={model_dir}: no config.json (expected an HF Qwen2.5-VL directory)")
    if data.train:
        return DataSources(train=list(data.train), evals={"eval": list(data.eval)} if data.eval else {},
                           model_dir=model_dir)
    return DataSources(train=[str(synthetic.train)],
                       evals={"eval": [str(synthetic.eval)], "noise": [str(synthetic.eval_noise)]},
                       model_dir=model_dir)


class CachedPreprocessor:
    """A :class:`Preprocessor` that keeps every prepared pair (and every row's :class:`DataError`) by row id, so
    later epochs skip decoding, resizing and tokenizing. For data sets that fit in memory and have unique ids (the
    synthetic set: a few hundred MB). Everything else (``estimate``, ``image_token_id``...) is the wrapped one's."""

    def __init__(self, inner: Preprocessor) -> None:
        self.inner = inner
        self._prepared: dict[str, ProcessedExample | DataError] = {}
        self._estimates: dict[tuple[str, bool], tuple[int, int] | DataError] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @staticmethod
    def _memo(table: dict, key, compute):
        hit = table.get(key)
        if hit is None:
            try:
                hit = compute()
            except DataError as err:
                hit = err
            table[key] = hit
        if isinstance(hit, DataError):
            raise hit
        return hit

    def estimate(self, example: PairExample, *, shared_prompt: bool = False) -> tuple[int, int]:
        return self._memo(self._estimates, (example.id, shared_prompt),
                          lambda: self.inner.estimate(example, shared_prompt=shared_prompt))

    def __call__(self, example: PairExample) -> ProcessedExample:
        return self._memo(self._prepared, example.id, lambda: self.inner(example))


@dataclass(kw_only=True)
class EvalSet:
    """A held-out set, preprocessed once, split into micro-batches; each DP rank evaluates every dp-th batch."""

    name: str
    batches: list[tuple[PackedBatch, torch.Tensor, list[str]]]
    """(batch, has_image [P] bool, category of each pair) triples."""
    dropped: Counter


def load_eval_set(name: str, files: list[str], preprocessor: Preprocessor, pairs: int) -> EvalSet:
    examples, dropped = [], Counter()
    for _, raw in read_examples(files):
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, PairExample):
                raise DataError("bad_field", "a ranking row (VL-RewardBench style) is not a pair")
            examples.append(preprocessor(raw))
        except DataError as err:
            dropped[err.reason] += 1
    if not examples:
        raise ValueError(f"evaluation set {name!r} ({files}) has no usable pair; dropped {dict(dropped)}")
    batches = []
    for start in range(0, len(examples), pairs):
        chunk = examples[start : start + pairs]
        batch = collate(chunk, image_token_id=preprocessor.image_token_id,
                        merge_size=preprocessor.image_cfg.merge_size)
        batches.append((batch, torch.tensor([len(ex.images) > 0 for ex in chunk]), [ex.category for ex in chunk]))
    return EvalSet(name=name, batches=batches, dropped=dropped)
