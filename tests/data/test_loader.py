"""Loader: exact resume across an epoch boundary with worker processes and 2 ranks; rank consistency."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.data.helpers import make_model_dir, pair_row, write_image, write_jsonl
from vlr_runtime.data.collate import Preprocessor
from vlr_runtime.data.loader import LoaderConfig, PairLoader, StepBatch

N_ROWS, PER_STEP = 17, 6  # 47 steps cover 282 stream positions: many epoch boundaries, step 37 starts mid-epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loader")
    for k, (w, h) in enumerate([(61, 45), (30, 90), (120, 33)]):
        write_image(root / f"im{k}.png", w, h, seed=k)
    rows = []
    for i in range(N_ROWS):
        images = [] if i % 3 == 0 else [f"im{i % 3}.png"] + (["im0.png"] if i % 5 == 0 else [])
        rows.append(pair_row(f"r{i}", images, chosen="The square is red. " * (1 + i % 4)))
    rows[7]["rejected"] = ""  # one bad row: counted every epoch, never fatal
    return make_model_dir(root / "model"), write_jsonl(root / "d.jsonl", rows)


def _run(model: Path, data: Path, rank: int, steps: int, workers: int, state: dict | None = None,
         shared_prompt: bool = False):
    cfg = LoaderConfig(pairs_per_step=PER_STEP, token_budget=700, seed=11, num_workers=workers, prefetch_steps=1,
                       shared_prompt=shared_prompt)
    loader = PairLoader(data, Preprocessor(model), cfg, rank=rank, world_size=2)
    if state is not None:
        loader.load_state_dict(state)
    out = []
    with loader:
        for sb in loader:
            out.append(sb)
            if len(out) == steps:
                break
        return out, loader.state_dict()


def _same(a: StepBatch, b: StepBatch) -> None:
    assert (a.step, a.pairs, a.global_pairs, a.any_images) == (b.step, b.pairs, b.global_pairs, b.any_images)
    assert a.rejected_global == b.rejected_global and a.rejected_local == b.rejected_local
    for x, y in zip(a.microbatches, b.microbatches, strict=True):
        assert (x is None) == (y is None)
        if x is None:
            continue
        for name in x.__dataclass_fields__:
            u, v = getattr(x, name), getattr(y, name)
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, name


@pytest.mark.slow
def test_resume_mid_epoch_is_exact_with_workers_and_two_ranks(setup) -> None:
    model, data = setup
    for rank in (0, 1):
        full, _ = _run(model, data, rank, 47, workers=0)
        first, state = _run(model, data, rank, 37, workers=2)
        assert state["step"] == 37
        resumed, _ = _run(model, data, rank, 10, workers=2, state=state)
        for a, b in zip(first, full[:37], strict=True):
            _same(a, b)  # worker processes do not change the output
        for a, b in zip(resumed, full[37:], strict=True):
            _same(a, b)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_ranks_agree_and_every_row_arrives_once_per_epoch(setup, shared_prompt: bool) -> None:
    model, data = setup
    steps = N_ROWS  # N_ROWS * PER_STEP stream positions = PER_STEP whole epochs
    runs = [_run(model, data, rank, steps, workers=0, shared_prompt=shared_prompt)[0] for rank in (0, 1)]
    ids = []
    for s0, s1 in zip(*runs, strict=True):
        assert len(s0.microbatches) == len(s1.microbatches)  # same number of passes on both ranks
        assert s0.any_images == s1.any_images and s0.global_pairs == s1.global_pairs
        for sb in (s0, s1):
            ids += [i for mb in sb.microbatches if mb is not None for i in mb.sample_ids]
            for mb in sb.microbatches:
                assert mb is None or (mb.num_tokens <= 700 and (mb.prefix_lens is not None) == shared_prompt)
    good = [f"r{i}" for i in range(N_ROWS) if i != 7]
    assert sorted(ids) == sorted(good * PER_STEP)


def test_state_from_another_stream_is_refused(setup) -> None:
    model, data = setup
    _, state = _run(model, data, 0, 1, workers=0)
    with pytest.raises(ValueError, match="not the same stream"):
        _run(model, data, 0, 1, workers=0, state={**state, "seed": 12})
