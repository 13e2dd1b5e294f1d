"""The native (C++/pybind11) twins of the data-path hot loops, and the one place that picks them.

``vlr_runtime._C`` is built by ``setup.py`` from ``csrc/*.cpp``. Every function here has a pure-Python/torch
implementation in its own module (positions, windows, packing) that is the fallback when the extension is not
built and the reference the property tests compare against. ``backend``: ``None`` = native when built, else Python;
``"native"`` = native or a clear error; ``"python"`` = always Python.
"""

from __future__ import annotations

from types import ModuleType

try:
    from vlr_runtime import _C as _native
except ImportError as _err:  # the fallback is explicit and reported by available()/require()
    _native = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

BACKENDS = (None, "native", "python")


def available() -> bool:
    """Whether ``vlr_runtime._C`` is importable."""
    return _native is not None


def select(backend: str | None) -> ModuleType | None:
    """The native module to use for ``backend``, or None for the Python path."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "python":
        return None
    if backend == "native" and _native is None:
        raise RuntimeError(
            "backend='native' but vlr_runtime._C is not built "
            f"({_IMPORT_ERROR}); run `pip install --no-build-isolation -e .`"
        )
    return _native
