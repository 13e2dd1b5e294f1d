"""A one-time launch-configuration choice for memory-bound kernels whose best block/warp/grid shape depends
on the card (register file, SM count, memory latency) more than on anything the host can compute.

``pick(key, candidates, launch, device)`` times each candidate once per ``key`` on the first real call (CUDA
events, median of a few launches on the caller's own tensors; ``launch(config)`` must only write outputs it
fully overwrites) and remembers the fastest for the process. On the CPU (Triton interpreter), during
CUDA-graph capture or with ``VLR_TUNE=0`` the first candidate - the documented default - is used without
timing. ``choices()`` lists what was picked and ``timings()`` every candidate's time, for benchmark notes.

Compiling the candidates dominates a first call (seconds per Triton kernel, one kernel per candidate). With
``VLR_TUNE_THREADS=N`` (> 1) the candidates after the first are compiled (and run once) on N threads before the
timing loop: Triton's compiler spends much of its time outside the GIL (LLVM, ptxas), so a dozen candidates
compile in a fraction of the serial time. The launches go to the caller's device and current stream; the
timing itself stays serial.

``save_choices(path)`` / ``load_choices(path)`` persist the picks (JSON, keyed by ``repr(key)``, tagged with the
device name): a process that loads them launches exactly the configurations of the one that saved them, without
timing anything. The trainer keeps one file per rank in its run directory, so a resumed run computes with the same
kernels - timing noise could otherwise pick another, equally correct configuration that rounds differently.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

C = TypeVar("C")
_PICKED: dict[Hashable, object] = {}
_TIMES: dict[Hashable, list[tuple[object, float]]] = {}  # key -> (candidate, median ms; inf: failed) as timed
_LOADED: dict[str, object] = {}  # repr(key) -> JSON form of the config, from load_choices


def _as_json(config: object) -> object:
    return json.loads(json.dumps(config))


def pick(key: Hashable, candidates: Sequence[C], launch: Callable[[C], None], device: torch.device,
         reps: int = 5) -> C:
    """The fastest of ``candidates`` for ``key`` (see the module docstring); ``launch(best)`` is not run
    here."""
    if key in _PICKED:
        return _PICKED[key]  # type: ignore[return-value]
    saved = _LOADED.get(repr(key))
    if saved is not None:
        # a loaded pick that is no longer a candidate (the tables changed since) is tuned again
        match = next((c for c in candidates if _as_json(c) == saved), None)
        if match is not None:
            _PICKED[key] = match
            return match
    if (len(candidates) == 1 or device.type != "cuda" or os.environ.get("VLR_TUNE", "1") == "0"
            or torch.cuda.is_current_stream_capturing()):
        return candidates[0]
    workers = int(os.environ.get("VLR_TUNE_THREADS", "1"))
    if workers > 1 and len(candidates) > 2:
        _warm_in_parallel(candidates, launch, device, workers)
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
    _TIMES[key] = list(zip(candidates, times))
    return best


def _warm_in_parallel(candidates: Sequence[C], launch: Callable[[C], None], device: torch.device,
                      workers: int) -> None:
    """Launch every candidate once (compiling it) - the first on this thread, so lazily initialised driver
    state exists before the others start on ``workers`` threads, each on the caller's device and stream. A
    candidate that raises here is left to the serial loop of :func:`pick`, which launches it again and
    reports it."""
    try:
        launch(candidates[0])
    except Exception:  # noqa: BLE001, S110 - the serial loop records it
        pass
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def warm(cand: C) -> None:
        if stream is None:
            launch(cand)
            return
        torch.cuda.set_device(device)  # the current device and stream are per thread
        with torch.cuda.stream(stream):
            launch(cand)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(warm, cand) for cand in candidates[1:]]
    for future in futures:
        future.exception()  # collected, not raised: see the docstring


def choices() -> dict[Hashable, object]:
    """Every tuned ``key -> config`` of this process."""
    return dict(_PICKED)


def timings() -> dict[Hashable, list[tuple[object, float]]]:
    """Every key this process timed: ``(candidate, median ms)`` in candidate order (``inf`` for one that failed to
    launch). Each candidate's time comes from the timing loop that chose the pick, on the caller's tensors, so
    benchmarks can report every launch configuration's cost without timing it again."""
    return {k: list(v) for k, v in _TIMES.items()}


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def save_choices(path: str | Path) -> None:
    """Write every pick of this process (and the loaded ones not used yet) to ``path`` (JSON, replaced
    atomically; the parent directory is created)."""
    path = Path(path)
    picks = {**_LOADED, **{repr(k): _as_json(v) for k, v in _PICKED.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"device": _device_name(), "choices": picks}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_choices(path: str | Path) -> int:
    """Use the picks saved in ``path`` for the keys this process has not tuned yet; returns how many were loaded.
    A file written on another device type is ignored (0): the best configuration depends on the card. Raises
    ValueError for a file that is not a saved set of choices."""
    try:
        data = json.loads(Path(path).read_text())
        device, picks = data["device"], data["choices"]
        if not isinstance(device, str) or not isinstance(picks, dict):
            raise TypeError("wrong field types")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a launch-tuner choices file ({exc})") from exc
    if device != _device_name():
        return 0
    _LOADED.update(picks)
    return len(picks)
