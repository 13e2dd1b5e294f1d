"""Freezing, AdamW with fp32 master weights, warm-up + cosine schedule, DP gradient averaging and the global
gradient norm over tensor-parallel shards."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn
from vlr_kernels._backend import check_backend
from vlr_kernels.adamw import adamw_step

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


def adam_step_tensor(group: dict, device: torch.device, step: float = 0.0) -> torch.Tensor:
    """The 0-d ``step`` entry torch's Adam/AdamW keeps for a parameter of param group ``group`` on ``device``:
    float32 (float64 under a float64 default dtype, except for the fused implementation), on ``device`` for the
    fused/capturable implementations, else on the CPU."""
    fused = bool(group.get("fused"))
    wide = not fused and torch.get_default_dtype() == torch.float64
    return torch.tensor(float(step), dtype=torch.float64 if wide else torch.float32,
                        device=device if fused or group.get("capturable") else "cpu")


class MasterAdamW:
    """AdamW over ``params``; parameters held in a 16-bit dtype get fp32 master copies that the optimizer updates
    (then copied back), so bf16 training does not lose small updates. fp32 parameters are updated in place.

    Matrices (``ndim >= 2``) get weight decay; norm weights, biases and the 1-d head bias do not.

    ``self.optimizer`` (a ``torch.optim.AdamW`` over the masters) holds the hyper-parameters and the state
    (``step``, ``exp_avg``, ``exp_avg_sq``) whichever path runs the update, so checkpoints have one format.
    Paths of :meth:`step`:

    - fused (default when every parameter is on CUDA): one Triton kernel per parameter
      (:func:`vlr_kernels.adamw.adamw_step`) reads the 16-bit gradient, updates master and moments and writes the
      rounded parameter: 28 B of traffic per bf16 element instead of ~44 B.
    - torch: an fp32 copy of each gradient, ``torch.optim.AdamW`` (fused on CUDA) on the masters, copy back.

    ``fused``: None = fused on CUDA unless the environment sets ``VLR_FUSED_ADAMW=0`` (A/B benchmarks), torch
    elsewhere; True forces the kernel (on CPU tensors only under ``TRITON_INTERPRET=1``, for tests); False forces
    torch.
    """

    def __init__(self, params: list[nn.Parameter], cfg: OptimConfig, fused: bool | None = None) -> None:
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                        for p in params]
        decay = [m for p, m in zip(params, self.masters) if p.ndim >= 2]
        no_decay = [m for p, m in zip(params, self.masters) if p.ndim < 2]
        # On CUDA torch's fused kernel for the torch path: one launch per step and no per-element temporaries (the
        # multi-tensor path allocates sqrt(v) for every element); elsewhere torch's default implementation. It
        # also keeps ``step`` on the device, where the Triton kernel reads it.
        on_cuda = bool(params) and all(p.is_cuda for p in params)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=on_cuda or None,
        )
        if fused is None:
            fused = on_cuda and os.environ.get("VLR_FUSED_ADAMW", "1") != "0"
        if fused:
            # raises BackendUnavailable now (not at the first step) when the kernel cannot run on these tensors
            check_backend("adamw", "triton", params[0].device if params else torch.device("cpu"))
        self.fused = fused
        self._param_of = {id(m): p for p, m in zip(params, self.masters)}

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, grad_scale: float | torch.Tensor = 1.0) -> None:
        """One AdamW step of every parameter that has a gradient, with the gradients multiplied by ``grad_scale``
        (the clipping factor: a python float, or a 0-d fp32 tensor on the parameters' device so the step needs no
        host synchronisation). The gradients themselves are NOT modified (unlike :func:`clip_gradients`); pass
        the factor here instead of clipping in place. Parameters without a gradient are skipped, their state
        untouched (as torch's AdamW does)."""
        if self.fused:
            self._fused_step(grad_scale)
        else:
            self._torch_step(grad_scale)

    def _torch_step(self, grad_scale: float | torch.Tensor) -> None:
        scale = None if isinstance(grad_scale, float | int) and grad_scale == 1 else grad_scale
        held: list[tuple[nn.Parameter, torch.Tensor]] = []  # fp32 parameters whose gradient is swapped for a step
        for p, m in zip(self.params, self.masters):
            if p.grad is None:
                if m is not p:
                    m.grad = None
            elif m is not p:
                m.grad = p.grad.float() if scale is None else p.grad.float().mul_(scale)
            elif scale is not None:
                held.append((p, p.grad))
                p.grad = p.grad * scale
        try:
            self.optimizer.step()
        finally:
            for p, grad in held:
                p.grad = grad
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)

    @torch.no_grad()
    def _fused_step(self, grad_scale: float | torch.Tensor) -> None:
        for group in self.optimizer.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("the fused AdamW kernel implements neither amsgrad nor maximize")
            work = [(m, self._param_of[id(m)]) for m in group["params"] if self._param_of[id(m)].grad is not None]
            if not work:
                continue
            states = [self._state(m, group) for m, _ in work]
            # torch's AdamW counts the step before its kernel reads it: one multi-tensor launch for all of them
            torch._foreach_add_([s["step"] for s in states], 1)
            beta1, beta2 = group["betas"]
            for (m, p), s in zip(work, states):
                adamw_step(m, p.grad, s["exp_avg"], s["exp_avg_sq"], s["step"], lr=group["lr"], beta1=beta1,
                           beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], grad_scale=grad_scale,
                           param=None if m is p else p, backend="triton")

    def _state(self, master: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """The AdamW state of ``master``, created at its first step as torch's AdamW creates it: zero moments like
        the master and a zero :func:`adam_step_tensor` (on the master's device with torch's fused implementation,
        so on CUDA, where the kernel reads it; on the CPU otherwise, the master's device in the CPU tests)."""
        state = self.optimizer.state[master]
        if not state:
            state["step"] = adam_step_tensor(group, master.device)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state

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


def clip_factor(grad_norm: float | torch.Tensor, max_norm: float) -> float | torch.Tensor:
    """The factor gradient clipping multiplies every gradient by: ``max_norm / (grad_norm + 1e-6)`` when the
    (global) norm exceeds ``max_norm > 0``, else 1. Pass it to ``MasterAdamW.step(grad_scale=...)`` instead of
    calling :func:`clip_gradients`; a 0-d tensor norm gives a 0-d tensor (no host synchronisation)."""
    if max_norm <= 0:
        return 1.0
    if torch.is_tensor(grad_norm):
        return torch.where(grad_norm > max_norm, max_norm / (grad_norm.float() + 1e-6), 1.0)
    return max_norm / (grad_norm + 1e-6) if grad_norm > max_norm else 1.0


def clip_gradients(params: list[nn.Parameter], grad_norm: float, max_norm: float) -> None:
    """Scale every gradient in place by :func:`clip_factor` (when the norm exceeds ``max_norm > 0``)."""
    scale = clip_factor(grad_norm, max_norm)
    if scale == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
