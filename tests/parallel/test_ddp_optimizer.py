"""megatron DDP + (distributed) optimizer on CPU: DP=2 over gloo gives the losses and parameters of a single-process
run with plain ``torch.optim.AdamW`` on the same global batch, after 3 clipped AdamW steps; bad settings and layouts
raise; a NaN gradient on one rank makes every rank skip the step; the CPU compatibility items 3-4 change only what
they say. On a GPU: the bf16 path (fp32 main params)."""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch

from tests.parallel.helpers import (
    CLIP,
    MICROBATCHES,
    build,
    freeze_vision_encoder,
    global_batch,
    load_tensors,
    reference_run,
    rel_err,
    save_tensors,
    spawn,
    train_megatron,
)
from vlr_runtime.model import ModelArgs


def _worker(rank: int, root: Path) -> None:
    from vlr_runtime.parallel import setup_distributed, teardown

    ctx = setup_distributed(tp=1)
    assert (ctx.dp, ctx.dp_rank) == (2, rank)
    args = ModelArgs.tiny()
    share = MICROBATCHES // ctx.dp
    for distributed_optimizer in (False, True):
        model = build(args)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen
        losses, norms = train_megatron(
            model, lambda step: global_batch(args, MICROBATCHES, step)[rank * share:(rank + 1) * share],
            distributed_optimizer=distributed_optimizer)
        for n, p in model.named_parameters():
            if n in frozen:  # no gradient buffer, no optimizer state, untouched
                assert torch.equal(p, frozen[n]), n
                assert getattr(p, "main_grad", None) is None, n
        tag = f"{int(distributed_optimizer)}_{rank}"
        save_tensors(dict(model.named_parameters()), root / f"params_{tag}.safetensors")
        save_tensors({"loss": torch.tensor(losses), "norm": torch.tensor(norms)}, root / f"losses_{tag}.safetensors")
    _check_nan_on_one_rank_skips_everywhere(args, rank)
    teardown()


def _check_nan_on_one_rank_skips_everywhere(args: ModelArgs, rank: int) -> None:
    """A NaN in rank 1's local gradient (before the reduce-scatter) makes every rank skip the step."""
    from vlr_runtime.parallel import forward_backward
    from vlr_runtime.parallel.optimizer import step_if_finite, wrap_ddp_and_optimizer

    model = build(args)
    ddp, optimizer = wrap_ddp_and_optimizer(model, lr=1e-3, distributed_optimizer=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forward_backward(ddp, global_batch(args, MICROBATCHES)[rank::2])
    if rank == 1:
        model.head.weight.main_grad[0, 0] = float("nan")
    ddp.finish_grad_sync()
    stepped, grad_norm = step_if_finite(optimizer)
    assert not stepped and math.isnan(grad_norm), (rank, stepped, grad_norm)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.slow
def test_dp2_ddp_and_distributed_optimizer_match_single_process(tmp_path):
    spawn(_worker, 2, tmp_path)
    losses, norms, params = reference_run(
        ModelArgs.tiny(), lambda model: {n: p.detach().clone() for n, p in model.named_parameters()})
    assert (norms > CLIP).all(), norms
    for distributed_optimizer in (0, 1):
        for rank in range(2):
            tag = f"{distributed_optimizer}_{rank}"
            got = load_tensors(tmp_path / f"losses_{tag}.safetensors")
            assert torch.allclose(got["loss"], losses, rtol=1e-5, atol=0), (tag, got["loss"], losses)
            assert torch.allclose(got["norm"], norms, rtol=1e-5, atol=0), (tag, got["norm"], norms)
            got_params = load_tensors(tmp_path / f"params_{tag}.safetensors")
            assert got_params.keys() == params.keys()
            for name, ref in params.items():
                assert rel_err(got_params[name], ref) <= 1e-5, (tag, name, rel_err(got_params[name], ref))


@pytest.fixture
def tp1():
    from vlr_runtime.parallel import setup_distributed, teardown

    yield setup_distributed(1)
    teardown()


def test_bad_settings_and_layouts_raise(tp1):
    from vlr_runtime.model import build_reward_model
    from vlr_runtime.parallel import forward_backward, setup_distributed
    from vlr_runtime.parallel.optimizer import wrap_ddp_and_optimizer

    args = ModelArgs.tiny()
    model = build(args)
    for bad in ({"lr": 0.0}, {"lr": 1e-3, "eps": 0.0}, {"lr": 1e-3, "betas": (0.9, 1.0)}, {"lr": 1e-3, "clip_grad": -1}):
        with pytest.raises(ValueError, match="lr|AdamW"):
            wrap_ddp_and_optimizer(model, **bad)
    with pytest.raises(ValueError, match="fp32 or all bf16"):
        wrap_ddp_and_optimizer(build(args).half(), lr=1e-3)
    frozen = build(args)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        wrap_ddp_and_optimizer(frozen, lr=1e-3)
    with pytest.raises(ValueError, match="virtual pipeline"):
        forward_backward([model, model], global_batch(args, 1))
    with pytest.raises(ValueError, match="at least one microbatch"):
        forward_backward(model, [])
    with pytest.raises(ValueError, match="vp_stage"):
        build_reward_model(args, vp_stage=0)
    with pytest.raises(RuntimeError, match="already set up"):
        setup_distributed(1, vpp=2)


def test_vpp_needs_pipeline_stages():
    from vlr_runtime.parallel import setup_distributed

    with pytest.raises(ValueError, match="vpp"):
        setup_distributed(1, 1, vpp=2)


def _type_name(x: torch.Tensor) -> str:
    return x.type()


def test_cpu_compat_items_3_and_4(tp1):
    """Only calls that would fail without CUDA change: megatron's ``device="cuda"`` factories land on the CPU,
    the optimizer modules' ``Tensor.type()`` checks see CUDA names, everyone else sees torch's own answers."""
    if torch.cuda.is_available():
        pytest.skip("the compatibility layer is only active without CUDA")
    from megatron.core.optimizer import clip_grads

    from vlr_runtime.parallel.compat import CUDA_LITERAL_MODULES, TYPE_CHECK_MODULES

    made = clip_grads.torch.zeros(2, dtype=torch.int, device="cuda")
    assert made.device.type == "cpu" and made.dtype == torch.int
    assert clip_grads.torch.float32 is torch.float32 and clip_grads.torch.distributed is torch.distributed
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # torch itself is untouched
    assert torch.ones(1).type() == "torch.FloatTensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64
    # The same call made from code in megatron's optimizer modules, and in another megatron module:
    x = torch.ones(1, dtype=torch.bfloat16)
    for module in TYPE_CHECK_MODULES:
        assert types.FunctionType(_type_name.__code__, {"__name__": module})(x) == "torch.cuda.BFloat16Tensor"
    assert types.FunctionType(_type_name.__code__, {"__name__": "megatron.core.utils"})(x) == "torch.BFloat16Tensor"
    assert _type_name(x) == "torch.BFloat16Tensor"
    assert len(CUDA_LITERAL_MODULES) == len(set(CUDA_LITERAL_MODULES))


@pytest.mark.gpu
def test_bf16_distributed_optimizer_keeps_fp32_main_params(tp1):
    """bf16 parameters with fp32 main copies and Adam state in megatron's distributed optimizer: 3 steps track
    the fp32 run's losses within bf16 accuracy, and the parameters stay bf16."""
    from vlr_runtime.model import build_reward_model

    args = ModelArgs.tiny()
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_reward_model(args, dtype=dtype, device=tp1.device, seed=0)
        freeze_vision_encoder(model)
        losses[dtype], _ = train_megatron(
            model, lambda step: [b.to(tp1.device) for b in global_batch(args, MICROBATCHES, step)],
            distributed_optimizer=True)
        if dtype == torch.bfloat16:
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref, got = torch.tensor(losses[torch.float32]), torch.tensor(losses[torch.bfloat16])
    assert torch.allclose(got, ref, rtol=2e-2), (got, ref)
