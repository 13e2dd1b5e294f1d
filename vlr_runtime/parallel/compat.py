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
3. ``device="cuda"`` literals and ``torch.cuda`` stream/sync calls in the modules of :data:`CUDA_LITERAL_MODULES`
   (megatron DDP's grad buffers, the (distributed) optimizer, grad-norm clipping, ``local_multi_tensor_l2norm``, the
   pipeline schedules and their p2p layer): each of those modules gets a ``torch`` of its own
   (:class:`_TorchOnCpu`) whose tensor factories put ``device="cuda"`` tensors on the CPU (and drop
   ``pin_memory``), and whose ``torch.cuda`` has no-op streams, ``synchronize`` and ``empty_cache``. Every call
   it changes would raise on a machine without CUDA; everything else is forwarded to ``torch`` unchanged.
4. Dtype checks by type name (``param.type() == "torch.cuda.FloatTensor"`` in the distributed optimizer,
   ``Float16OptimizerWithFloat16Params`` and ``clip_grad_by_total_norm_fp32``): ``Tensor.type()`` without
   arguments, called on a CPU tensor from one of :data:`TYPE_CHECK_MODULES` (the only megatron-core 0.16 modules
   that call it), returns the CUDA name of the same dtype (``torch.cuda.FloatTensor``), so those branches classify
   fp32/bf16 parameters as they would on a GPU. Calls from any other module, and every call with arguments, are
   unchanged.

Model construction needs no patch: layers are built with ``use_cpu_initialization=True`` inside a
``torch.device(...)`` context (see :mod:`vlr_runtime.model.layers`), which megatron honours on every device.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch

_ACTIVE = False

CUDA_LITERAL_MODULES = (
    "megatron.core.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
)
"""megatron-core modules whose ``device="cuda"`` literals and ``torch.cuda`` calls are redirected (item 3)."""

TYPE_CHECK_MODULES = frozenset({
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
})
"""megatron-core modules whose ``Tensor.type()`` dtype checks see CUDA type names (item 4)."""


def _on_cpu(device):
    """``device`` with CUDA replaced by the CPU (any spelling: ``"cuda"``, ``"cuda:0"``, ``torch.device``)."""
    if device is not None and not isinstance(device, int) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(factory):
    def make(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs CUDA
        return factory(*args, **kwargs)

    return make


class _NoStream:
    """Stands for a CUDA stream or event: the CPU runs everything in program order."""

    def wait_stream(self, _stream) -> None:
        pass

    def wait_event(self, _event) -> None:
        pass

    def record_event(self, _event=None) -> _NoStream:
        return self

    def record(self, _stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CudaOnCpu:
    """``torch.cuda`` as the modules of :data:`CUDA_LITERAL_MODULES` see it without CUDA."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def Stream(*_args, **_kwargs) -> _NoStream:
        return _NoStream()

    Event = Stream

    @staticmethod
    def current_stream(*_args) -> _NoStream:
        return _NoStream()

    default_stream = current_stream

    @staticmethod
    def stream(_stream):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(*_args) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


class _TorchOnCpu:
    """``torch`` for one megatron module: CUDA tensor factories land on the CPU, ``torch.cuda`` is
    :class:`_CudaOnCpu`, every other attribute is ``torch``'s own."""

    cuda = _CudaOnCpu()
    tensor = staticmethod(_cpu_factory(torch.tensor))
    zeros = staticmethod(_cpu_factory(torch.zeros))
    ones = staticmethod(_cpu_factory(torch.ones))
    empty = staticmethod(_cpu_factory(torch.empty))
    full = staticmethod(_cpu_factory(torch.full))
    arange = staticmethod(_cpu_factory(torch.arange))

    def __getattr__(self, name):
        return getattr(torch, name)


_TENSOR_TYPE = torch.Tensor.type


def _megatron_tensor_type(self, *args, **kwargs):
    """``Tensor.type`` reporting CUDA type names to megatron-core's dtype checks (item 4)."""
    name = _TENSOR_TYPE(self, *args, **kwargs)
    if args or kwargs or self.device.type != "cpu":
        return name
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller in TYPE_CHECK_MODULES and name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]
    return name


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
    for name in CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = _TorchOnCpu()
    torch.Tensor.type = _megatron_tensor_type  # type: ignore[method-assign]
    mrandom.CudaRNGStatesTracker = _cpu_tracker_class(mrandom.CudaRNGStatesTracker)
    mrandom.initialize_rng_tracker(force_reset=True)
    _ACTIVE = True


def cpu_compat_active() -> bool:
    return _ACTIVE
