"""Suite-wide setup. The Triton interpreter must be switched on before triton compiles anything, so it is set here,
before any test module imports vlr_kernels, whenever there is no CUDA device."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _triton_bounds_checked():
    """Under the Triton interpreter every kernel launched by any test proves each memory access in bounds and
    free of write races between its programs (see tests/kernels/oob.py): an out-of-bounds lane that the CPU
    silently tolerates would be an illegal address on a GPU. Set VLR_OOB_CHECK=0 to run without."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or os.environ.get("VLR_OOB_CHECK", "1") == "0":
        yield
        return
    from tests.kernels.oob import bounds_checked

    with bounds_checked():
        yield
