"""megatron DDP + (distributed) optimizer on CPU: DP=2 over gloo gives the losses and parameters of a single-process
run with plain ``torch.optim.AdamW`` on the same global batch, after 3 clipped AdamW steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parallel.helpers import (
    CLIP,
    MICROBATCHES,
    build,
    global_batch,
    load_tensors,
    reference_run,
    rel_err,
    save_tensors,
    spawn,
    train_megatron,
)
from vlr_runtime.model import ModelArgs

pytestmark = pytest.mark.slow


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
    teardown()


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
