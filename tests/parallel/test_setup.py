"""setup_distributed on a CPU-only machine: gloo, megatron groups, and the CPU compatibility layer."""

import pytest
import torch

from vlr_runtime.parallel import get_context, setup_distributed, teardown

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


@pytest.fixture
def clean():
    teardown()
    yield
    teardown()


def test_single_process_context_and_groups(clean):
    ctx = setup_distributed(1)
    assert (ctx.world_size, ctx.tp, ctx.pp, ctx.dp, ctx.tp_rank) == (1, 1, 1, 1, 0)
    assert ctx.device == torch.device("cpu") and ctx.backend == "gloo"
    assert get_context() is ctx and setup_distributed(1) is ctx
    assert torch.distributed.get_world_size(ctx.tp_group) == 1
    with pytest.raises(RuntimeError, match="already set up"):
        setup_distributed(2)


def test_megatron_rng_tracker_runs_on_cpu(clean):
    from megatron.core import tensor_parallel

    setup_distributed(1)
    assert torch.cuda.current_device() == torch.device("cpu")
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched by the fork
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advances
    tensor_parallel.model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        c = torch.rand(4)
    assert torch.equal(a, c)  # and is reproducible from the seed


def test_bad_sizes_raise(clean, monkeypatch):
    with pytest.raises(ValueError, match=">= 1"):
        setup_distributed(0)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="not divisible"):
        setup_distributed(2)


def test_get_context_before_setup_raises(clean):
    with pytest.raises(RuntimeError, match="setup_distributed"):
        get_context()


def test_build_needs_setup(clean):
    from vlr_runtime.model import ModelArgs, build_reward_model

    with pytest.raises(RuntimeError, match="setup_distributed"):
        build_reward_model(ModelArgs.tiny())
