"""megatron DDP + (distributed) optimizer on CPU: DP=2 over gloo gives the losses and parameters of a single-process
run with plain ``torch.optim.AdamW`` on the same global batch, after 3 clipped AdamW steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parallel.helpers import freeze_vision_encoder, global_batch, load_tensors, save_tensors, spawn
from vlr_runtime.model import ModelArgs

pytestmark = pytest.mark.slow
STEPS, MICROBATCHES = 3, 4
ADAMW = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-6}
"""eps 1e-6, not 1e-8: the attention key bias has an exactly-zero gradient (softmax ignores a per-row constant), so
its computed gradient is round-off (~1e-9) whose sign and size depend on the reduction order; with eps 1e-8 AdamW
turns that noise into lr-sized, order-dependent updates (1e-4 relative between two correct runs)."""
CLIP = 0.5
"""Below the tiny model's gradient norm (asserted), so clipping is active on every step."""


def build(seed: int = 0):
    from vlr_kernels import set_default_backend

    from vlr_runtime.model import build_reward_model

    set_default_backend("torch")
    model = build_reward_model(ModelArgs.tiny(), seed=seed)
    freeze_vision_encoder(model)
    return model


def train_megatron(model, microbatches_of_step, *, distributed_optimizer: bool) -> tuple[list[float], list[float]]:
    """3 steps through megatron DDP + optimizer; returns (DP-mean loss, grad norm) per step."""
    import torch.distributed as dist

    from vlr_runtime.parallel import forward_backward, get_context
    from vlr_runtime.parallel.optimizer import wrap_ddp_and_optimizer

    ddp, optimizer = wrap_ddp_and_optimizer(model, clip_grad=CLIP, distributed_optimizer=distributed_optimizer,
                                            **ADAMW)
    losses, norms = [], []
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        results = forward_backward(ddp, microbatches_of_step(step))
        ddp.finish_grad_sync()
        ok, grad_norm, _ = optimizer.step()
        assert ok
        loss = torch.stack([r.loss for r in results]).mean()
        dist.all_reduce(loss, group=get_context().dp_group)
        losses.append(float(loss) / get_context().dp)
        norms.append(float(grad_norm))
    return losses, norms


def _worker(rank: int, root: Path) -> None:
    from vlr_runtime.parallel import setup_distributed, teardown

    ctx = setup_distributed(tp=1)
    assert (ctx.dp, ctx.dp_rank) == (2, rank)
    args = ModelArgs.tiny()
    share = MICROBATCHES // ctx.dp
    for distributed_optimizer in (False, True):
        model = build()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        losses, norms = train_megatron(
            model, lambda step: global_batch(args, MICROBATCHES, step)[rank * share:(rank + 1) * share],
            distributed_optimizer=distributed_optimizer)
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n
                assert getattr(p, "main_grad", None) is None, n
        tag = f"{int(distributed_optimizer)}_{rank}"
        save_tensors(dict(model.named_parameters()), root / f"params_{tag}.safetensors")
        save_tensors({"loss": torch.tensor(losses), "norm": torch.tensor(norms)}, root / f"losses_{tag}.safetensors")
    teardown()


def reference_run() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """TP=1, one process, plain torch AdamW (decay on matrices only), torch's norm clipping: (losses, norms, params)."""
    from vlr_runtime.parallel import forward_backward, setup_distributed, teardown

    setup_distributed(1)
    try:
        model = build()
        params = [p for p in model.parameters() if p.requires_grad]
        lr, wd, betas, eps = ADAMW["lr"], ADAMW["weight_decay"], ADAMW["betas"], ADAMW["eps"]
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=lr, betas=betas, eps=eps)
        losses, norms = [], []
        for step in range(STEPS):
            opt.zero_grad()
            results = forward_backward(model, global_batch(ModelArgs.tiny(), MICROBATCHES, step))
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
            opt.step()
            losses.append(float(torch.stack([r.loss for r in results]).mean()))
        return torch.tensor(losses), torch.tensor(norms), {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        teardown()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` (0 when both are zero). Per tensor, not per element: entries whose gradient is a
    near-cancelling sum carry fp32 round-off of the reduction order into AdamW's normalised update."""
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def test_dp2_ddp_and_distributed_optimizer_match_single_process(tmp_path):
    spawn(_worker, 2, tmp_path)
    losses, norms, params = reference_run()
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
