"""One place that decides which implementation of an op runs.

Every public op takes ``backend: str | None``. Resolution order:
1. the explicit ``backend`` argument;
2. the environment variable ``VLR_<OP>_BACKEND`` (e.g. ``VLR_FUSED_REWARD_LOSS_BACKEND=torch``);
3. the environment variable ``VLR_KERNEL_BACKEND`` (all ops), or :func:`set_default_backend` (the runtime config);
4. automatic: ``triton`` on CUDA tensors when triton imports, ``triton`` on CPU tensors only when the Triton
   interpreter is enabled (``TRITON_INTERPRET=1``), otherwise ``torch`` (the eager reference).

An explicitly requested backend that cannot run raises :class:`BackendUnavailable` with the reason; an automatic
choice never silently picks something that was not asked for except the documented CPU -> reference rule.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

_DEFAULT: str | None = None
# Backends implemented with stock PyTorch ops only: they run on every device.
_TORCH_NATIVE = frozenset({"torch", "sdpa"})


class BackendUnavailable(RuntimeError):
    """Raised when a backend is requested explicitly but cannot run here."""


def set_default_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores automatic choice)."""
    global _DEFAULT
    _DEFAULT = name


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing: no import machinery in graphs
def resolve_backend(op: str, device: torch.device, backend: str | None, supported: tuple[str, ...]) -> str:
    """Return the backend name that ``op`` will use for tensors on ``device``.

    ``supported`` lists the backends the op implements, e.g. ``("triton", "cuda", "torch")``.
    """
    requested = backend or os.environ.get(f"VLR_{op.upper()}_BACKEND") or os.environ.get("VLR_KERNEL_BACKEND")
    requested = requested or _DEFAULT
    if requested in (None, "", "auto"):
        if device.type == "cuda" and "triton" in supported and has_module("triton"):
            return "triton"
        if device.type == "cpu" and "triton" in supported and triton_interpret_enabled() and has_module("triton"):
            return "triton"
        return "torch"
    if requested not in supported:
        raise BackendUnavailable(f"{op}: backend {requested!r} is not one of {supported}")
    check_backend(op, requested, device)
    return requested


def check_backend(op: str, name: str, device: torch.device) -> None:
    """Raise BackendUnavailable with a clear reason if ``name`` cannot run on ``device``."""
    if name in _TORCH_NATIVE:
        return
    if name == "triton":
        if not has_module("triton"):
            raise BackendUnavailable(f"{op}: backend 'triton' requested but triton is not installed")
        if device.type == "cpu" and not triton_interpret_enabled():
            raise BackendUnavailable(
                f"{op}: backend 'triton' on CPU tensors needs the Triton interpreter; set TRITON_INTERPRET=1 "
                "before importing vlr_kernels, or use backend='torch'"
            )
        return
    if name == "cuda":
        if device.type != "cuda":
            raise BackendUnavailable(f"{op}: backend 'cuda' needs CUDA tensors, got {device}")
        if not has_module("vlr_kernels._cuda"):
            raise BackendUnavailable(
                f"{op}: backend 'cuda' requested but the extension vlr_kernels._cuda is not built "
                "(reinstall with a CUDA torch: pip install --no-build-isolation -e .)"
            )
        return
    if device.type != "cuda":
        raise BackendUnavailable(f"{op}: backend {name!r} needs CUDA tensors, got {device}")
    if not has_module(name):
        raise BackendUnavailable(f"{op}: backend {name!r} requested but the package {name!r} is not installed")


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached), the size of a persistent kernel's grid."""
    if device.type != "cuda":
        raise ValueError(f"sm_count: {device} is not a CUDA device")
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
