"""The one place that adapts megatron-core (0.16.1; the same entry points exist in 0.17-0.19) to CPU-only runs.

Activated by :func:`activate_cpu_compat`, which :func:`vlr_runtime.parallel.setup_distributed` calls only when the
run's device is the CPU. It never runs on a CUDA machine, so GPU runs use megatron-core unmodified. It adapts:

1. ``torch.cuda.current_device()``: megatron allocates buffers with ``device=torch.cuda.current_device()``
   (sequence-parallel all-gather/reduce-scatter in ``tensor_parallel.mappings`` and ``layers``, the global memory
   buffer, the embedding-group barrier). Without CUDA it raises; here it returns ``torch.device("cpu")`` so those
   buffers land on the CPU. Only patched when ``torch.cuda.is_available()`` is False, so nothing that really has a
   GPU can be misdirected.
2. The CUDA RNG tracker (``tensor_parallel.random``): ``model_parallel_cuda_manual_seed`` and
   ``get_cuda_rng_tracker().fork()`` save/restore the CUDA generator. On CPU the tracker keeps CPU generator states
   instead (same seeds, same fork semantics), so dropout regions and initialisation forks work.

Model construction needs no patch: layers are built with ``use_cpu_initialization=True`` inside a
``torch.device(...)`` context (see :mod:`vlr_runtime.model.layers`), which megatron honours on every device.
Optimizer and DDP type checks are not adapted here: the runtime's CPU path uses torch optimizers directly.
"""

from __future__ import annotations

import contextlib

import torch

_ACTIVE = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_tracker_class(base: type) -> type:
    """A subclass of megatron's ``CudaRNGStatesTracker`` whose states are CPU generator states."""

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng"):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def activate_cpu_compat() -> None:
    """Apply the CPU adaptations listed in the module docstring (idempotent). Raises if CUDA is available."""
    global _ACTIVE
    if _ACTIVE:
        return
    if torch.cuda.is_available():
        raise RuntimeError("activate_cpu_compat() is for CPU-only machines; CUDA is available here")
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]
    mrandom.CudaRNGStatesTracker = _cpu_tracker_class(mrandom.CudaRNGStatesTracker)
    mrandom.initialize_rng_tracker(force_reset=True)
    _ACTIVE = True


def cpu_compat_active() -> bool:
    return _ACTIVE
