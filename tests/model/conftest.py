"""Fixtures for the model tests: a single-process TP=1 megatron context and a tiny HF checkpoint with a value head."""

import pytest
import torch
from vlr_kernels import set_default_backend

from tests.model.hf_reference import make_sample, write_tiny_checkpoint
from vlr_runtime.parallel import setup_distributed, teardown


@pytest.fixture(autouse=True, scope="module")
def torch_kernels():
    """The model tests check the model against transformers, not the kernels (tests/kernels does): run every op
    through its eager reference, since the Triton interpreter would make a forward take minutes."""
    set_default_backend("torch")
    yield
    set_default_backend(None)


@pytest.fixture(scope="module")
def tp1():
    ctx = setup_distributed(1)
    yield ctx
    teardown()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """(model_dir, hf_model, head_w [H], head_b [1])."""
    d = tmp_path_factory.mktemp("tiny_hf")
    hf, w, b = write_tiny_checkpoint(d)
    return d, hf, w, b


GRIDS = [(1, 6, 10), (1, 18, 10)]
"""Two images of different sizes: 84x140 px and 252x140 px patches grids (after the processor's resize of e.g. a
90x150 and a 250x130 image); the second spans several 4x4-unit windows with partial ones at the border."""


@pytest.fixture(scope="module")
def inputs():
    """(samples, pixels, grids): one image; two images of different sizes; no image; a second one-image sequence
    sharing image 0 (so the packed batch encodes it once and uses it twice)."""
    gen = torch.Generator().manual_seed(1)
    pixels = [torch.randn(t * h * w, 1176, generator=gen) for t, h, w in GRIDS]
    samples = [
        make_sample([5, 7], [0], GRIDS, gen),
        make_sample([3, 4, 6], [1, 0], GRIDS, gen),
        make_sample([9], [], GRIDS, gen),
        make_sample([2, 11], [0], GRIDS, gen),
    ]
    return samples, pixels, GRIDS
