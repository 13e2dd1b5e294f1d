"""C++ (vlr_runtime._C) == Python on randomized inputs; packing and balancing properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlr_runtime.data import native
from vlr_runtime.data.errors import DataError
from vlr_runtime.data.packing import balance_ranks, pack_into_bins, pack_microbatches
from vlr_runtime.data.positions import mrope_position_ids
from vlr_runtime.data.windows import vision_window_index

pytestmark = pytest.mark.skipif(not native.available(), reason="vlr_runtime._C not built")
IMG = 7
SETTINGS = settings(max_examples=60, deadline=None)

grid_st = st.tuples(st.integers(1, 2), st.integers(1, 12).map(lambda x: 2 * x), st.integers(1, 12).map(lambda x: 2 * x))


@st.composite
def packed_batches(draw):
    """Random packed segments, some with the shared-prompt layout, with images anywhere in them."""
    shared = draw(st.booleans())
    ids, cu, grids, pre, spl = [], [0], [], [], []

    def part(n_images: int) -> list[int]:
        out = [draw(st.integers(8, 50)) for _ in range(draw(st.integers(0, 3)))]
        for _ in range(n_images):
            g = draw(grid_st)
            grids.append(g)
            out += [1] + [IMG] * (g[0] * g[1] * g[2] // 4) + [2]
        return out + [draw(st.integers(8, 50))]

    for _ in range(draw(st.integers(1, 4))):
        prompt = part(draw(st.integers(0, 2)))
        chosen = part(draw(st.integers(0, 1)))
        rejected = part(draw(st.integers(0, 1))) if shared else []
        seg = prompt + chosen + rejected
        ids += seg
        cu.append(cu[-1] + len(seg))
        pre.append(len(prompt) if shared else 0)
        spl.append(len(prompt) + len(chosen) if shared else len(seg))
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return t(ids), t(cu), t(grids).reshape(-1, 3), (t(pre), t(spl)) if shared else (None, None)


@SETTINGS
@given(packed_batches())
def test_positions_native_equals_python(batch) -> None:
    ids, cu, grids, (pre, spl) = batch
    kw = dict(image_token_id=IMG, prefix_lens=pre, split_lens=spl)
    py = mrope_position_ids(ids, cu, grids, backend="python", **kw)
    cc = mrope_position_ids(ids, cu, grids, backend="native", **kw)
    assert torch.equal(py, cc)


@SETTINGS
@given(packed_batches(), st.integers(0, 3))
def test_positions_both_reject_the_same_bad_grids(batch, which) -> None:
    ids, cu, grids, (pre, spl) = batch
    if grids.shape[0] == 0:
        return
    bad = grids.clone()
    bad[which % bad.shape[0], 1] += 2  # one group now claims more tokens than it has
    for backend in ("python", "native"):
        with pytest.raises(ValueError):
            mrope_position_ids(ids, cu, bad, image_token_id=IMG, prefix_lens=pre, split_lens=spl, backend=backend)


@SETTINGS
@given(st.lists(grid_st, min_size=1, max_size=8), st.sampled_from([(2, 112, 14), (2, 56, 14), (1, 112, 14)]))
def test_windows_native_equals_python(grids, cfg) -> None:
    merge, window, patch = cfg
    g = torch.tensor(grids)
    py = vision_window_index(g, spatial_merge_size=merge, window_size=window, patch_size=patch, backend="python")
    cc = vision_window_index(g, spatial_merge_size=merge, window_size=window, patch_size=patch, backend="native")
    for a, b in zip(py, cc):
        assert a.dtype == b.dtype and torch.equal(a, b)


@SETTINGS
@given(st.lists(st.integers(1, 5000), min_size=0, max_size=60), st.integers(1, 9))
def test_balance_native_equals_python(costs, ranks) -> None:
    assert balance_ranks(costs, ranks, backend="python") == balance_ranks(costs, ranks, backend="native")


@SETTINGS
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.integers(1, 6), st.integers(300, 900))
def test_pack_native_equals_python_and_respects_budget(tokens, bins, budget) -> None:
    costs = [t + 3.5 * (t % 7) for t in tokens]
    py = pack_into_bins(tokens, costs, bins, budget, backend="python")
    cc = pack_into_bins(tokens, costs, bins, budget, backend="native")
    assert py == cc
    if py is not None:
        for b in range(bins):
            assert sum(t for t, o in zip(tokens, py) if o == b) <= budget


@SETTINGS
@given(st.lists(st.tuples(st.integers(20, 700), st.integers(0, 4000)), min_size=1, max_size=50),
       st.integers(1, 8), st.integers(700, 3000))
def test_step_plan_invariants(items, ranks, budget) -> None:
    tokens, patches = [t for t, _ in items], [p for _, p in items]
    plan = pack_microbatches(tokens, patches, num_ranks=ranks, token_budget=budget)
    assert plan == pack_microbatches(tokens, patches, num_ranks=ranks, token_budget=budget, backend="python")
    seen = sorted(i for rank in plan.microbatches for mb in rank for i in mb)
    assert seen == list(range(len(items)))  # every example exactly once
    assert len({len(rank) for rank in plan.microbatches}) == 1  # same microbatch count on every rank
    for rank in plan.microbatches:
        for mb in rank:
            assert sum(tokens[i] for i in mb) <= budget


def test_balance_long_tail_within_10_percent_of_ideal() -> None:
    rng = np.random.default_rng(0)
    n, ranks = 512, 8
    tokens = rng.integers(200, 1200, n)
    # Long-tailed image sizes: most images small, a few near the 16k-patch cap.
    patches = np.minimum(rng.pareto(1.2, n) * 400 + 64, 16384).astype(int)
    plan = pack_microbatches(tokens.tolist(), patches.tolist(), num_ranks=ranks, token_budget=20000)
    ideal = (tokens.sum() + patches.sum()) / ranks
    assert max(plan.rank_costs) <= 1.10 * ideal, (max(plan.rank_costs), ideal)
    # Not merely luck of the draw: a round-robin split of the same data is far worse.
    rr = [sum(tokens[i] + patches[i] for i in range(r, n, ranks)) for r in range(ranks)]
    assert max(rr) > 1.10 * ideal


def test_over_budget_example_is_a_named_error() -> None:
    with pytest.raises(DataError) as err:
        pack_microbatches([10, 5000], [0, 0], num_ranks=2, token_budget=4096)
    assert err.value.reason == "over_length"


def test_native_backend_errors_are_clear(monkeypatch) -> None:
    with pytest.raises(ValueError, match="backend"):
        balance_ranks([1.0], 1, backend="cuda")
    monkeypatch.setattr(native, "_native", None)
    with pytest.raises(RuntimeError, match="not built"):
        balance_ranks([1.0], 1, backend="native")
    assert balance_ranks([3.0, 1.0, 2.0], 2) == [0, 1, 1]  # falls back to Python when not built
