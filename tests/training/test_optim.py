"""Optimizer pieces without processes: freezing, fp32 masters for 16-bit parameters, the schedule, clipping and the
tensor-parallel-aware gradient norm (single process: the TP=2 case is covered by test_parallel_equivalence)."""

import itertools
import math

import pytest
import torch
from torch import nn

from vlr_runtime.config import OptimConfig
from vlr_runtime.training.optim import MasterAdamW, clip_gradients, freeze_groups, global_grad_norm, lr_at


def _groups(dtype=torch.float32) -> dict[str, list[nn.Parameter]]:
    torch.manual_seed(0)
    vision, merger, llm, head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)
    mods = nn.ModuleDict({"vision": vision, "merger": merger, "llm": llm, "head": head}).to(dtype)
    return {k: list(m.parameters()) for k, m in mods.items()}


def test_freeze_removes_groups_from_training():
    groups = _groups()
    trainable = freeze_groups(groups, ["vision", "head"])
    assert {id(p) for p in trainable} == {id(p) for k in ("merger", "llm") for p in groups[k]}
    assert all(not p.requires_grad for k in ("vision", "head") for p in groups[k])
    opt = MasterAdamW(trainable, OptimConfig())
    in_optimizer = {id(p) for g in opt.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in trainable}
    with pytest.raises(ValueError, match="unknown parameter group"):
        freeze_groups(groups, ["eyes"])
    with pytest.raises(ValueError, match="nothing to train"):
        freeze_groups(_groups(), ["vision", "merger", "llm", "head"])


def test_weight_decay_only_on_matrices():
    groups = _groups()
    opt = MasterAdamW(freeze_groups(groups, []), OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_bf16_parameters_train_through_fp32_masters():
    """A bf16 parameter updated by plain AdamW loses updates below its precision; the masters keep them and the
    bf16 copy equals the rounded master, while the step equals AdamW on an fp32 copy."""
    torch.manual_seed(0)
    p16 = nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
    p32 = nn.Parameter(torch.full((64,), 1.0))
    cfg = OptimConfig(lr=1e-4, weight_decay=0.0)
    opt16, opt32 = MasterAdamW([p16], cfg), MasterAdamW([p32], cfg)
    assert opt32.masters[0] is p32 and opt16.masters[0] is not p16 and opt16.masters[0].dtype == torch.float32
    for _ in range(5):
        g = torch.randn(64)
        p16.grad, p32.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        opt16.step(), opt32.step()
        opt16.zero_grad(), opt32.zero_grad()
    assert torch.equal(opt16.masters[0], p32.detach())
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))
    assert not torch.equal(opt16.masters[0], p16.detach().float())  # the masters hold what bf16 cannot


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, 110, cfg) == pytest.approx(0.1) and lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_at(110, 110, cfg) == pytest.approx(0.1) and lr_at(500, 110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert lr_at(1, 5, OptimConfig(lr=2.0, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(
        2.0 * 0.5 * (1 + math.cos(math.pi / 5)))


def test_grad_norm_counts_replicated_parameters_once_and_clips():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    b.tensor_model_parallel = True  # a TP shard: counted on every rank
    assert global_grad_norm([a, b], tp_rank=0, model_parallel_group=None) == pytest.approx(5.0)
    # on TP rank 1 the replicated parameter is another rank's duplicate and does not count
    assert global_grad_norm([a, b], tp_rank=1, model_parallel_group=None) == pytest.approx(4.0)
    clip_gradients([a, b], 5.0, max_norm=1.0)
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(1.0, rel=1e-5)
    clip_gradients([a, b], 1.0, max_norm=0.0)  # 0 disables clipping
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(1.0, rel=1e-5)
