"""Freezing, AdamW with fp32 master weights, warm-up + cosine schedule, DP gradient averaging and the global
gradient norm over tensor-parallel shards."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from vlr_runtime.config import FREEZE_GROUPS, OptimConfig


def freeze_groups(groups: dict[str, list[nn.Parameter]], freeze: list[str]) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on the parameters of the ``freeze`` groups; return the trainable parameters
    (each once, in a deterministic order). ``groups`` is ``RewardModel.param_groups()``."""
    unknown = sorted(set(groups) - set(FREEZE_GROUPS)) + sorted(set(freeze) - set(groups))
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; expected {list(FREEZE_GROUPS)}")
    frozen_ids = {id(p) for g in freeze for p in groups[g]}
    trainable: list[nn.Parameter] = []
    seen: set[int] = set()
    for name in FREEZE_GROUPS:
        for p in groups.get(name, []):
            if id(p) in frozen_ids:
                p.requires_grad_(False)
            elif id(p) not in seen:
                seen.add(id(p))
                trainable.append(p)
    if not trainable:
        raise ValueError("every parameter is frozen: nothing to train")
    return trainable


class MasterAdamW:
    """AdamW over ``params``; parameters held in a 16-bit dtype get fp32 master copies that the optimizer updates
    (then copied back), so bf16 training does not lose small updates. fp32 parameters are updated in place.

    Matrices (``ndim >= 2``) get weight decay; norm weights, biases and the 1-d head bias do not.
    """

    def __init__(self, params: list[nn.Parameter], cfg: OptimConfig) -> None:
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                        for p in params]
        decay = [m for p, m in zip(params, self.masters) if p.ndim >= 2]
        no_decay = [m for p, m in zip(params, self.masters) if p.ndim < 2]
        # On CUDA the fused kernel: one launch per step and no per-element temporaries (the multi-tensor path
        # allocates sqrt(v) for every element); elsewhere torch's default implementation.
        fused = bool(params) and all(p.is_cuda for p in params)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None,
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    def master_of(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor the optimizer updates for ``param``: its fp32 master, or the parameter itself when fp32.
        Raises KeyError for a parameter this optimizer does not train."""
        master = next((m for p, m in zip(self.params, self.masters) if p is param), None)
        if master is None:
            raise KeyError(f"parameter of shape {tuple(param.shape)} is not trained by this optimizer")
        return master

    def master_copies(self) -> list[torch.Tensor]:
        """The fp32 masters of the 16-bit parameters (what a checkpoint must hold besides the parameters)."""
        return [m for m, p in zip(self.masters, self.params) if m is not p]


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (1-based): linear warm-up to ``cfg.lr`` over ``warmup_steps``, then
    cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def average_dp_gradients(params: list[nn.Parameter], dp: int, group: dist.ProcessGroup | None) -> None:
    """Average the gradients of ``params`` over the ``dp`` data-parallel ranks (one flat all-reduce per dtype).

    A parameter without a gradient (unused in this step on this rank) contributes zeros, so every rank issues the
    same collective whatever its batch held (a text-only batch leaves the vision tower without gradients).
    """
    if dp == 1:
        return
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for same in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        flat /= dp
        offset = 0
        for p in same:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def global_grad_norm(params: list[nn.Parameter], tp_rank: int, model_parallel_group: dist.ProcessGroup | None) -> float:
    """L2 norm of the whole model's gradient: tensor-parallel shards (``param.tensor_model_parallel``) count on every
    rank, replicated parameters only on TP rank 0; the squares are summed over the model-parallel group (TP x PP).
    Call after :func:`average_dp_gradients`, so every DP rank gets the same value."""
    grads = [p.grad.detach() for p in params
             if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)]
    device = params[0].device if params else torch.device("cpu")
    # per-tensor norms on the device (fp32 accumulation, one multi-tensor launch), their squares summed in float64;
    # a single host synchronisation at the end
    sq = (torch.stack(torch._foreach_norm(grads, 2)).double().pow(2).sum() if grads
          else torch.zeros((), dtype=torch.float64, device=device))
    if model_parallel_group is not None and dist.is_initialized():
        dist.all_reduce(sq, group=model_parallel_group)
    return float(sq.sqrt())


def clip_gradients(params: list[nn.Parameter], grad_norm: float, max_norm: float) -> None:
    """Scale every gradient by ``max_norm / grad_norm`` when the (global) norm exceeds ``max_norm > 0``."""
    if max_norm <= 0 or grad_norm <= max_norm:
        return
    scale = max_norm / (grad_norm + 1e-6)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
