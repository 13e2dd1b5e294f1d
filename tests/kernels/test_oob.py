"""The interpreter's out-of-bounds check (tests/kernels/oob.py, on for every test through conftest) catches loads,
stores and atomics past a tensor argument - including a single scalar lane whose value is never used - and lets
masked-off lanes and in-bounds accesses through."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from tests.kernels.oob import OutOfBounds, WriteRace, bounds_checked

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="checks the Triton interpreter")


@triton.jit
def _copy(src, dst, n, extra, BLOCK: tl.constexpr, MASKED: tl.constexpr, ATOMIC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n + extra
    x = tl.load(src + offs, mask=ok if MASKED else None)
    if ATOMIC:
        tl.atomic_add(dst + offs, x, mask=ok)
    else:
        tl.store(dst + offs, x, mask=ok)
    # a scalar load whose value only matters when extra > 0, like a look-ahead past a segment table's end
    last = tl.load(src + n - 1 + extra)
    tl.store(dst, tl.load(dst) + 0 * last)


def _run(extra: int, masked: bool = True, atomic: bool = False) -> torch.Tensor:
    src = torch.arange(8, dtype=torch.float32)
    dst = torch.zeros(8, dtype=torch.float32)
    _copy[(1,)](src, dst, 8, extra, BLOCK=16 if masked else 8, MASKED=masked, ATOMIC=atomic)
    return dst


def test_in_bounds_and_masked_lanes_pass():
    with bounds_checked() as ran:
        for atomic in (False, True):
            assert torch.equal(_run(0, atomic=atomic), torch.arange(8, dtype=torch.float32))
        _run(0, masked=False)
    assert ran == ["_copy"] * 3


@pytest.mark.parametrize("atomic", [False, True], ids=["store", "atomic"])
def test_out_of_bounds_lanes_are_caught(atomic):
    with bounds_checked():
        with bounds_checked(), pytest.raises(Exception) as err:
            _run(1, atomic=atomic)  # one lane past the end, in the load, the store/atomic and the scalar load
        assert "OutOfBounds" in repr(err.value) and "_copy: load of 1 lane(s)" in repr(err.value)
        # the inner checker's exit leaves the outer one (conftest's, around every test) in force
        with pytest.raises(Exception, match="OutOfBounds"):
            _run(1, atomic=atomic)
    assert issubclass(OutOfBounds, AssertionError)


@pytest.mark.parametrize("atomic", [False, True], ids=["store", "atomic"])
def test_stores_and_atomics_are_checked(atomic):
    """A source long enough for every load: the one stray lane is the store's (or the atomic's)."""
    src, dst = torch.arange(16, dtype=torch.float32), torch.zeros(8)
    with bounds_checked(), pytest.raises(Exception) as err:
        _copy[(1,)](src, dst, 8, 1, BLOCK=16, MASKED=True, ATOMIC=atomic)
    assert f"_copy: {'atomic' if atomic else 'store'} of 1 lane(s)" in repr(err.value)


@triton.jit
def _scatter(dst, idx, STRIDE: tl.constexpr):
    # program p stores p at dst[idx[p]], twice (the same program may overwrite itself)
    p = tl.program_id(0)
    target = tl.load(idx + p * STRIDE)
    tl.store(dst + target, p.to(tl.float32))
    tl.store(dst + target, p.to(tl.float32) + 0.0)


def test_write_races_between_programs_are_caught():
    dst = torch.zeros(4)
    with bounds_checked():
        _scatter[(4,)](dst, torch.arange(4), STRIDE=1)  # one writer per element
        assert torch.equal(dst, torch.arange(4, dtype=torch.float32))
        with pytest.raises(Exception) as err:
            _scatter[(4,)](dst, torch.tensor([0, 1, 1, 3]), STRIDE=1)  # programs 1 and 2 both store dst[1]
    assert "WriteRace" in repr(err.value) and "programs (1, 0, 0) and (2, 0, 0) both store" in repr(err.value)
    assert issubclass(WriteRace, AssertionError)


def test_fresh_buffers_are_poisoned():
    """In the kernel tests (tests/kernels/conftest.py) fresh buffers hold NaN or a negative sentinel, never the
    zeros a CPU allocation often happens to hold; explicit fills are untouched."""
    from tests.kernels.oob import poisoned_empty

    with poisoned_empty():
        assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.ones(2))).all()
        assert (torch.zeros(2).new_empty(4, dtype=torch.int64) < -(2**29)).all()
        assert torch.equal(torch.zeros(3), torch.zeros(3)) and torch.empty(0).numel() == 0
    assert not torch.isnan(torch.empty(3).zero_()).any()
