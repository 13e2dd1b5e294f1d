"""Checkpoint directories: atomic completion, keep-last-k, resume discovery, RNG capture, asynchronous writes.

Layout of ``<run_dir>/checkpoints/``::

    step_00000120/
        tensors-rank00003.safetensors   tensors written by rank 3 (any names the caller chooses)
        state-rank00003.json            JSON state of rank 3 (RNG states, loader position, ...)
        complete.json                   written last, by rank 0, after every rank finished: step, world size,
                                        and the byte size of every file; only directories with a valid
                                        complete.json are ever used for resume
    latest -> nothing; the newest *complete* step directory is found by scanning (a symlink could point at a
              half-written directory after a crash)

What is saved is up to the caller (the trainer decides which tensors, in which canonical naming, so that a
checkpoint can be resharded); this module guarantees that a checkpoint is either complete or ignored, that writes can
overlap training (``async_write=True``: tensors are copied to CPU synchronously, written by a thread, and the
completion marker is written at the next :meth:`CheckpointManager.wait`), and that nothing is unpickled on load
(safetensors + JSON only).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

_STEP_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    """True when ``path/complete.json`` exists, parses, and every file it lists exists with the recorded size."""
    marker = path / COMPLETE
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending."""
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_complete(root: Path) -> int | None:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """All RNG states of this process: torch CPU (+ CUDA) generators as tensors, Python and NumPy as JSON."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.torch_cuda{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    js = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, js


def restore_rng_state(tensors: dict[str, torch.Tensor], js: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.torch_cuda"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, state, gauss = js["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


@dataclass
class LoadedCheckpoint:
    step: int
    path: Path
    tensors: dict[str, torch.Tensor]
    """Tensors this rank wrote (or, with ``all_ranks=True``, the union over every rank's file)."""
    state: dict
    """This rank's JSON state."""
    meta: dict
    """The completion marker (step, world size, files, and the caller's ``meta``)."""


class CheckpointManager:
    """Saves and finds checkpoints under ``root``; every rank calls every method (they contain barriers).

    Args:
        root: the checkpoints directory (``<run_dir>/checkpoints``).
        keep_last: complete checkpoints to keep (older ones are deleted after a newer one completes); 0 keeps all.
        async_write: write tensors in a background thread; completion happens at the next :meth:`wait`.
        before_write_file: test hook called with each file path just before it is written.
    """

    def __init__(self, root: Path, *, keep_last: int = 2, async_write: bool = False,
                 before_write_file: Callable[[Path], None] | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_write = async_write
        self._before_write_file = before_write_file
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: tuple[int, Path, dict] | None = None

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict, meta: dict | None = None) -> None:
        """Save this rank's ``tensors`` (any device; copied to CPU now) and JSON ``state`` for ``step``.

        ``meta`` (rank 0's value is used) goes into the completion marker, e.g. the parallel layout.
        """
        self.wait()
        rank, world = _rank_world()
        path = step_dir(self.root, step)
        if rank == 0:
            if path.exists():  # a leftover from a crashed save of the same step: never mix old and new files
                shutil.rmtree(path)
            path.mkdir(parents=True)
        _barrier()
        snapshot = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        state_text = json.dumps(state)
        self._pending = (step, path, dict(meta or {}, world_size=world))
        if self.async_write:
            self._thread = threading.Thread(target=self._write, args=(path, rank, snapshot, state_text), daemon=True)
            self._thread.start()
        else:
            self._write(path, rank, snapshot, state_text)
            self.wait()

    def _write(self, path: Path, rank: int, tensors: dict[str, torch.Tensor], state_text: str) -> None:
        try:
            tfile = path / f"tensors-rank{rank:05d}.safetensors"
            sfile = path / f"state-rank{rank:05d}.json"
            for f in (tfile, sfile):
                if self._before_write_file is not None:
                    self._before_write_file(f)
                if f is tfile:
                    save_file(tensors, str(f))
                else:
                    f.write_text(state_text)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread in wait()
            self._error = exc

    def wait(self) -> None:
        """Finish a pending save: join the writer, then (rank 0, after a barrier) write the completion marker."""
        if self._pending is None:
            return
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error, self._pending = self._error, None, None
            raise RuntimeError(f"checkpoint write failed: {err}") from err
        step, path, meta = self._pending
        self._pending = None
        _barrier()
        rank, _ = _rank_world()
        if rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.name != COMPLETE}
            expected = 2 * meta["world_size"]
            if len(files) != expected:
                raise RuntimeError(f"checkpoint {path}: expected {expected} files, found {len(files)}")
            tmp = path / (COMPLETE + ".tmp")
            tmp.write_text(json.dumps(dict(meta, step=step, files=files)))
            os.replace(tmp, path / COMPLETE)  # atomic: the checkpoint becomes visible whole or not at all
            self._prune()
        _barrier()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        steps = complete_steps(self.root)
        for old in steps[: -self.keep_last]:
            shutil.rmtree(step_dir(self.root, old), ignore_errors=True)

    def load_latest(self, *, all_ranks: bool = False) -> LoadedCheckpoint | None:
        """Load the newest complete checkpoint for this rank, or None when there is none.

        With ``all_ranks=True`` every rank's tensor file is read (for resharding to a different world size); the
        caller then picks the slices it needs. Otherwise the world size must match the saved one.
        """
        step = latest_complete(self.root)
        if step is None:
            return None
        path = step_dir(self.root, step)
        meta = json.loads((path / COMPLETE).read_text())
        rank, world = _rank_world()
        if all_ranks:
            tensors: dict[str, torch.Tensor] = {}
            for r in range(meta["world_size"]):
                tensors.update(load_file(str(path / f"tensors-rank{r:05d}.safetensors")))
            state_rank = rank if rank < meta["world_size"] else 0
        else:
            if meta["world_size"] != world:
                raise RuntimeError(
                    f"checkpoint {path} was saved by {meta['world_size']} ranks, this job has {world}: "
                    "load it with all_ranks=True to reshard"
                )
            tensors = load_file(str(path / f"tensors-rank{rank:05d}.safetensors"))
            state_rank = rank
        state = json.loads((path / f"state-rank{state_rank:05d}.json").read_text())
        return LoadedCheckpoint(step=step, path=path, tensors=tensors, state=state, meta=meta)
