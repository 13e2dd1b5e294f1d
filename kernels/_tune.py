"""A one-time launch-configuration choice for memory-bound kernels whose best block/warp/grid shape depends
on the card (register file, SM count, memory latency) more than on anything the host can compute.

``pick(key, candidates, launch, device)`` times each candidate once per ``key`` on the first real call (CUDA
events, median of a few launches on the caller's own tensors; ``launch(config)`` must only write outputs it
fully overwrites) and remembers the fastest for the process. On the CPU (Triton interpreter), during
CUDA-graph capture or with ``VLR_TUNE=0`` the first candidate - the documented default - is used without
timing. ``choices()`` lists what was picked, for benchmark notes.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

C = TypeVar("C")
_PICKED: dict[Hashable, object] = {}


def pick(key: Hashable, candidates: Sequence[C], launch: Callable[[C], None], device: torch.device,
         reps: int = 5) -> C:
    """The fastest of ``candidates`` for ``key`` (see the module docstring); ``launch(best)`` is not run
    here."""
    if key in _PICKED:
        return _PICKED[key]  # type: ignore[return-value]
    if (len(candidates) == 1 or device.type != "cuda" or os.environ.get("VLR_TUNE", "1") == "0"
            or torch.cuda.is_current_stream_capturing()):
        return candidates[0]
    times: list[float] = []
    errors: list[str] = []
    for cand in candidates:
        try:
            launch(cand)  # compile and warm; a configuration the card cannot run (shared memory) is skipped
        except Exception as exc:  # noqa: BLE001 - reported below if no candidate runs at all
            errors.append(f"{cand}: {type(exc).__name__}: {exc}".splitlines()[0])
            times.append(math.inf)
            continue
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            launch(cand)
            end.record()
        torch.cuda.synchronize(device)
        times.append(statistics.median(s.elapsed_time(e) for s, e in events))
    if all(math.isinf(t) for t in times):
        raise RuntimeError(f"no launch configuration of {key} runs on this device: {errors}")
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _PICKED[key] = best
    return best


def choices() -> dict[Hashable, object]:
    """Every tuned ``key -> config`` of this process."""
    return dict(_PICKED)
