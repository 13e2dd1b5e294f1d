"""Adam state written back from checkpoint tensors behaves like the state it was taken from, for torch's default and
fused AdamW (which keeps its step count on the parameter's device)."""

from __future__ import annotations

import pytest
import torch

from vlr_runtime.training.reshard import _set_adam_state


@pytest.mark.parametrize("fused", [False, True])
def test_restored_adam_state_steps_like_the_original(fused):
    gen = torch.Generator().manual_seed(0)
    original = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    grads = [torch.randn(5, 3, generator=gen) for _ in range(4)]
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.98), "weight_decay": 0.1, "fused": fused}
    opt = torch.optim.AdamW([original], **kwargs)
    for g in grads[:3]:
        original.grad = g.clone()
        opt.step()
    restored = torch.nn.Parameter(original.detach().clone())
    fresh = torch.optim.AdamW([restored], **kwargs)
    # float64 copies on purpose: the moments are converted to the parameter's dtype
    _set_adam_state(fresh, restored, 3, lambda k: opt.state[original][k].double())
    state = fresh.state[restored]
    assert state["step"].dtype == torch.float32 and float(state["step"]) == 3.0
    assert all(state[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq"))
    original.grad, restored.grad = grads[3].clone(), grads[3].clone()
    opt.step()
    fresh.step()
    assert torch.equal(restored, original)
    assert float(fresh.state[restored]["step"]) == 4.0
