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


def cdiv(a: int, b: int) -> int:
    """Host-side ``triton.cdiv``: in triton 3.x that is a ``ConstexprFunction``, ~4 us of host time per call from
    Python, paid on every launch; this is plain integer arithmetic with the same result."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side ``triton.next_power_of_2`` (same results, 0 -> 0 included), without its per-call overhead."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


__all__ = ["HAS_TRITON", "cdiv", "next_power_of_2", "tl", "triton", "triton_jit"]
