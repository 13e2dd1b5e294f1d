"""Import triton when it is there. It is a Linux-only dependency; elsewhere the op modules must still import (their
``torch`` backend works), so ``triton_jit`` becomes a no-op decorator and ``HAS_TRITON`` is False. Kernel modules use
``from __future__ import annotations`` so ``tl.constexpr`` annotations are not evaluated at import time."""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    triton_jit = triton.jit
except ImportError:
    triton = tl = None
    HAS_TRITON = False

    def triton_jit(fn):
        return fn


__all__ = ["HAS_TRITON", "tl", "triton", "triton_jit"]
