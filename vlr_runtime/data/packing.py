"""Pairs -> data-parallel ranks -> microbatches under a token budget, the same plan on every rank.

Cost of an example = LLM tokens + ``patch_weight`` x vision patches (a long tail of big images must count, or the
rank that draws them stalls everyone at the next all-reduce). One optimizer step's examples are planned globally:

1. :func:`balance_ranks` - longest-processing-time-first: examples by decreasing cost, each to the least-loaded rank.
2. :func:`pack_microbatches` - each rank's examples into exactly ``M`` microbatches of at most ``token_budget``
   tokens, each example (largest first) into the fitting microbatch with the least cost so far. ``M`` is the
   smallest count for which *every* rank fits, so all ranks run the same number of forward/backward passes (the
   same collective sequence) without exchanging anything: every rank computes the whole plan from the same inputs.

Both loops have C++ twins (``csrc/packing.cpp``) with identical tie-breaking, so plans never depend on the backend.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlr_runtime.data import native
from vlr_runtime.data.errors import DataError


def example_cost(tokens: int, patches: int, patch_weight: float = 1.0) -> float:
    """Estimated compute of one example: LLM tokens + ``patch_weight`` x ViT patches."""
    return float(tokens) + patch_weight * float(patches)


def _order_desc(key: Sequence[float] | Sequence[int]) -> list[int]:
    return sorted(range(len(key)), key=lambda i: -key[i])  # sorted() is stable: ties stay in index order


def balance_ranks(costs: Sequence[float], num_ranks: int, *, backend: str | None = None) -> list[int]:
    """Rank (``0..num_ranks-1``) of every item, longest-processing-time first; ties go to the lowest rank."""
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    lib = native.select(backend)
    if lib is not None:
        return list(lib.balance_ranks(np.asarray(costs, dtype=np.float64), num_ranks))
    heap = [(0.0, r) for r in range(num_ranks)]
    owner = [0] * len(costs)
    for i in _order_desc(costs):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + float(costs[i]), r))
    return owner


def pack_into_bins(
    tokens: Sequence[int], costs: Sequence[float], num_bins: int, token_budget: int, *, backend: str | None = None
) -> list[int] | None:
    """Bin of every item when the items fit into ``num_bins`` bins of ``token_budget`` tokens (largest first, into
    the least-cost fitting bin, lowest bin on ties), else None."""
    if num_bins <= 0:
        raise ValueError(f"num_bins must be positive, got {num_bins}")
    if len(tokens) != len(costs):
        raise ValueError("tokens and costs differ in length")
    lib = native.select(backend)
    if lib is not None:
        owner = list(lib.pack_into_bins(np.asarray(tokens, dtype=np.int64), np.asarray(costs, dtype=np.float64),
                                        num_bins, token_budget))
        return owner if owner or not tokens else None
    bin_tokens, bin_cost = [0] * num_bins, [0.0] * num_bins
    owner = [0] * len(tokens)
    for i in _order_desc(tokens):
        best = -1
        for b in range(num_bins):
            if bin_tokens[b] + tokens[i] <= token_budget and (best < 0 or bin_cost[b] < bin_cost[best]):
                best = b
        if best < 0:
            return None
        owner[i] = best
        bin_tokens[best] += tokens[i]
        bin_cost[best] += float(costs[i])
    return owner


@dataclass(frozen=True)
class StepPlan:
    """``microbatches[r][m]`` = indices (into the step's examples) of microbatch ``m`` of rank ``r``; every rank has
    the same number of microbatches. A microbatch can be empty only when a rank has fewer examples than that
    number (the trainer must still run it so that the collectives line up)."""

    microbatches: list[list[list[int]]]
    rank_costs: list[float]

    @property
    def num_microbatches(self) -> int:
        return len(self.microbatches[0])


def pack_microbatches(
    tokens: Sequence[int],
    patches: Sequence[int],
    *,
    num_ranks: int,
    token_budget: int,
    patch_weight: float = 1.0,
    backend: str | None = None,
) -> StepPlan:
    """Plan one step: balance the examples over ranks by cost, then pack each rank's share into the same number
    of microbatches of at most ``token_budget`` tokens.

    Raises:
        DataError: ``over_length`` if an example alone exceeds the budget (the caller counts it and drops it first).
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    if len(tokens) != len(patches):
        raise ValueError("tokens and patches differ in length")
    too_long = [i for i, t in enumerate(tokens) if t > token_budget]
    if too_long:
        raise DataError("over_length", f"examples {too_long[:5]} exceed the token budget {token_budget}")
    costs = [example_cost(t, p, patch_weight) for t, p in zip(tokens, patches)]
    owner = balance_ranks(costs, num_ranks, backend=backend)
    per_rank = [[i for i in range(len(tokens)) if owner[i] == r] for r in range(num_ranks)]
    # Lower bound on M from the token volume; raise it until every rank packs (FFD needs at most one bin per item).
    m = max(1, max(-(-sum(tokens[i] for i in items) // token_budget) for items in per_rank))
    while True:
        bins = [
            pack_into_bins([tokens[i] for i in items], [costs[i] for i in items], m, token_budget, backend=backend)
            for items in per_rank
        ]
        if all(b is not None for b in bins):
            break
        m += 1
    microbatches = [
        [[items[k] for k in range(len(items)) if b[k] == j] for j in range(m)] for items, b in zip(per_rank, bins)
    ]
    rank_costs = [sum(costs[i] for i in items) for items in per_rank]
    return StepPlan(microbatches=microbatches, rank_costs=rank_costs)
