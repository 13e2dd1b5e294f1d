"""Where the trainer's pairs come from and how each rank turns them into :class:`PackedBatch` es.

Rows are read with the data package (``formats`` -> ``Preprocessor`` -> ``collate``); this module only decides the
order (a seeded permutation per epoch, sharded over data-parallel ranks; tensor-parallel peers get the same rows)
and counts the rows it cannot use by reason instead of stopping.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vlr_runtime.config import DataConfig, ModelConfig
from vlr_runtime.data.collate import Preprocessor, ProcessedExample, collate
from vlr_runtime.data.errors import DataError
from vlr_runtime.data.formats import RowIndex, example_from_row, read_examples
from vlr_runtime.data.synthetic import SyntheticSpec, ensure_synthetic
from vlr_runtime.data.types import PackedBatch, PairExample

log = logging.getLogger(__name__)


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


def _prepare(raw: PairExample | object, preprocessor: Preprocessor) -> ProcessedExample:
    if not isinstance(raw, PairExample):
        raise DataError("bad_field", "a ranking row (VL-RewardBench style) cannot be a training pair")
    return preprocessor(raw)


@dataclass(kw_only=True)
class TrainStream:
    """Endless per-rank stream of micro-batches of ``pairs`` usable pairs each.

    Order: epoch ``e`` of DP rank ``d`` visits ``randperm(N, seed=(seed, e))[d::dp]``. The ``tp`` ranks of a
    tensor-parallel group need the same batch; instead of each preprocessing all of it, TP rank ``t`` prepares its
    share from rows ``[t::tp]`` of that order and the group exchanges the prepared examples (``all_gather_object``),
    so decoding/resizing/tokenizing is done once per TP group. Unusable rows are skipped and counted in ``dropped``
    (this rank's rows) by reason, so a micro-batch always holds ``pairs`` pairs (unless a whole epoch is unusable,
    which raises).
    """

    index: RowIndex
    preprocessor: Preprocessor
    pairs: int
    dp_rank: int
    dp: int
    seed: int
    tp_rank: int = 0
    tp: int = 1
    tp_group: dist.ProcessGroup | None = None
    epoch: int = 0
    position: int = 0
    dropped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if len(self.index) < self.dp:
            raise ValueError(f"{len(self.index)} training rows for {self.dp} data-parallel ranks")
        self._order = self._shard(self.epoch)

    def _shard(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.index), generator=gen)[self.dp_rank :: self.dp][self.tp_rank :: self.tp].tolist()

    def _next_example(self) -> ProcessedExample:
        misses = 0
        while True:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shard(self.epoch)
            i = self._order[self.position]
            self.position += 1
            try:
                return _prepare(example_from_row(self.index, i), self.preprocessor)
            except DataError as err:
                self.dropped[err.reason] += 1
                misses += 1
                if misses > len(self._order):
                    raise RuntimeError(f"no usable training pair in a whole epoch shard; dropped {dict(self.dropped)}")

    def state_dict(self) -> dict:
        """Position in the stream (JSON-serialisable); :meth:`load_state_dict` continues exactly after it."""
        return {"epoch": self.epoch, "position": self.position, "dropped": dict(self.dropped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shard(self.epoch)
        self.dropped = Counter(state["dropped"])

    def next_batch(self) -> tuple[PackedBatch, list[ProcessedExample]]:
        """The next micro-batch (identical on the ranks of a TP group) and its examples. Collective over the TP
        group when ``tp > 1``."""
        share = self.pairs // self.tp + (self.tp_rank < self.pairs % self.tp)
        examples = [self._next_example() for _ in range(share)]
        if self.tp > 1:
            gathered: list[list[ProcessedExample] | None] = [None] * self.tp
            dist.all_gather_object(gathered, examples, group=self.tp_group)
            examples = [ex for part in gathered for ex in part]
        batch = collate(examples, image_token_id=self.preprocessor.image_token_id,
                        merge_size=self.preprocessor.image_cfg.merge_size)
        return batch, examples


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
            examples.append(_prepare(raw, preprocessor))
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
