"""Out-of-bounds and write-race checks for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``).

The interpreter executes a kernel's loads and stores on raw host addresses and never checks them: a lane that reads
past a tensor gets whatever bytes lie there, and a test passes as long as the value is unused or masked later. On a
GPU the same access can be an illegal address, which ends the CUDA context of the process (a flat dK/dV candidate
did that in run C). :func:`bounds_checked` makes every unmasked lane of every load, store and atomic in the
kernels launched inside it prove that its bytes lie within the storage of one of the launch's tensor arguments, and
raises :class:`OutOfBounds` naming the kernel, the operation and the first offending address otherwise. It also
raises :class:`WriteRace` when two programs of one launch store (not atomically) to the same address: the
interpreter runs programs one after another, so the last one always wins there, while on a GPU the winner varies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


class OutOfBounds(AssertionError):
    """A Triton kernel touched bytes outside every tensor it was launched with."""


class WriteRace(AssertionError):
    """Two programs of one launch stored to the same address without an atomic: on a GPU the result depends on
    their order."""


def _tensor_args(values) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensor_args(v)


@contextlib.contextmanager
def bounds_checked() -> Iterator[list[str]]:
    """Check every memory access of the interpreted kernels launched inside; yields the names of the kernels that
    ran (a test can assert that the kernels it means to check did run)."""
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    state: dict = {"ranges": np.zeros((0, 2), dtype=np.uint64), "kernel": None, "writers": {}}
    launched: list[str] = []
    call = interp.GridExecutor.__call__

    def checked_call(self, *args, **kwargs):
        outer = dict(state)
        extents = []
        for t in _tensor_args([*args, *kwargs.values()]):
            storage = t.untyped_storage()
            extents.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        state["ranges"] = np.array(extents, dtype=np.uint64).reshape(-1, 2)
        state["kernel"] = self.fn.__name__
        state["writers"] = {}  # address -> the program (grid index) that stored to it in this launch
        launched.append(self.fn.__name__)
        try:
            return call(self, *args, **kwargs)
        finally:
            state.update(outer)

    def check(op: str, ptrs, mask, itemsize: int) -> None:
        addr = np.asarray(ptrs.data).astype(np.uint64)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        addr = addr.reshape(-1)
        if addr.size == 0:
            return
        lo, hi = state["ranges"][:, 0], state["ranges"][:, 1]
        inside = ((addr[:, None] >= lo[None, :]) & (addr[:, None] + np.uint64(itemsize) <= hi[None, :])).any(1)
        if not inside.all():
            bad = int(addr[~inside][0])
            near = ", ".join(f"[{int(a):#x}, {int(b):#x})" for a, b in state["ranges"])
            raise OutOfBounds(f"{state['kernel']}: {op} of {int((~inside).sum())} lane(s) outside every tensor "
                              f"argument, first at {bad:#x} ({itemsize} B); arguments span {near}")

    def check_race(ptrs, mask) -> None:
        addr = np.asarray(ptrs.data).astype(np.uint64)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        me = tuple(builder.grid_idx)
        writers = state["writers"]
        for a in addr.reshape(-1).tolist():
            other = writers.setdefault(a, me)
            if other != me:
                raise WriteRace(f"{state['kernel']}: programs {other} and {me} both store to {a:#x}")

    def itemsize_of(ptrs) -> int:
        return np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize

    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def masked_load(ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask, itemsize_of(ptrs))
        return load(ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(ptrs, value, mask, cache_policy):
        check("store", ptrs, mask, itemsize_of(ptrs))
        check_race(ptrs, mask)
        return store(ptrs, value, mask, cache_policy)

    def atomic_rmw(op, ptr, val, mask, sem, scope):
        check("atomic", ptr, mask, itemsize_of(ptr))
        return rmw(op, ptr, val, mask, sem, scope)

    def atomic_cas(ptr, cmp, val, sem, scope):
        check("atomic_cas", ptr, None, itemsize_of(ptr))
        return cas(ptr, cmp, val, sem, scope)

    names = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    outer = {name: builder.__dict__[name] for name in names if name in builder.__dict__}  # a checker around this one
    interp.GridExecutor.__call__ = checked_call
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    try:
        yield launched
    finally:
        interp.GridExecutor.__call__ = call
        for name in names:
            builder.__dict__.pop(name, None)
        builder.__dict__.update(outer)


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` return tensors filled with NaN (floating
    dtypes) or a large negative sentinel (integer dtypes) inside: on the CPU fresh memory is often zero, while on a
    GPU the caching allocator hands back whatever the last tensor left there, so a kernel that reads an element no
    one wrote passes on the CPU and gives wrong or varying results on the GPU. With the poison such a read shows up
    as a NaN (or, as an index, an out-of-bounds access)."""

    from torch.utils._python_dispatch import _disable_current_modes

    def poison(t: torch.Tensor) -> torch.Tensor:
        with _disable_current_modes():  # invisible to the tests that record the ops a call dispatches
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))
            elif t.dtype not in (torch.bool, torch.uint8) and t.numel():
                t.fill_(-(2**30) + 7)
        return t

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
