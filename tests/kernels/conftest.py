"""Kernel tests on the CPU: fresh buffers are poisoned (see tests/kernels/oob.py): a kernel or launcher that reads
memory it never wrote fails here instead of on a GPU, whose allocator returns dirty memory (where the GPU tests run,
that dirt is already there, so nothing is patched). VLR_OOB_CHECK=0 turns it off with the interpreter's bounds
checks."""

import os

import pytest


@pytest.fixture(autouse=True)
def _poisoned_empty():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or os.environ.get("VLR_OOB_CHECK", "1") == "0":
        yield
        return
    from tests.kernels.oob import poisoned_empty

    with poisoned_empty():
        yield
