"""megatron-core's data parallelism for the reward model: ``DistributedDataParallel`` (contiguous gradient buffers,
gradients averaged over the DP group) and megatron's optimizer, optionally the distributed optimizer (gradient
reduce-scatter, Adam state and fp32 main parameters sharded over DP, parameter all-gather after the step).

One training step with the pair returned by :func:`wrap_ddp_and_optimizer`::

    ddp.zero_grad_buffer(); optimizer.zero_grad()
    results = forward_backward(ddp, microbatches)     # grads accumulate into the DDP buffer (param.main_grad)
    ddp.finish_grad_sync()                            # all-reduce, or reduce-scatter with the distributed optimizer
    stepped, grad_norm = step_if_finite(optimizer)    # clip, AdamW, (all-gather the updated parameters)

Each DP rank averages its own microbatches (``forward_backward`` scales by ``1/len(microbatches)``) and DDP
averages over the DP ranks, so with the same number of microbatches per rank the update is that of the mean over
the global batch. On the CPU this path runs through :mod:`vlr_runtime.parallel.compat` (items 3-4).

The gradient reduction runs after the backward passes, not overlapped with them: megatron's overlapped buckets
launch when every parameter's gradient hook has fired, and a microbatch without images gives the vision merger no
gradient at all, so its bucket would never be ready.
"""

from __future__ import annotations

import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer

from vlr_runtime.parallel.context import get_context


def wrap_ddp_and_optimizer(
    model: torch.nn.Module | list[torch.nn.Module],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    clip_grad: float = 0.0,
    distributed_optimizer: bool = False,
    grad_reduce_in_fp32: bool = True,
) -> tuple[DistributedDataParallel | list[DistributedDataParallel], MegatronOptimizer]:
    """Wrap this rank's pipeline stage of the reward model (:func:`vlr_runtime.model.build_reward_model`), or the
    list of its virtual stage chunks, in megatron's DDP (one per chunk) and build one megatron AdamW (decoupled
    weight decay) over their trainable parameters.

    Frozen parameters (``requires_grad`` False) get no gradient buffer and no optimizer state. Weight decay applies
    to matrices only (megatron's default: no decay for biases and 1-d parameters); ``lr`` is the constant rate
    of every group until a scheduler writes ``param_group["lr"]``. ``clip_grad > 0`` clips the global gradient
    norm (over TP, PP and, with the distributed optimizer, DP shards). bf16 parameters get fp32 main
    copies (megatron's mixed-precision optimizer); fp32 parameters are updated in place. ``grad_reduce_in_fp32``:
    the DDP gradient buffer (and its collectives) in fp32 whatever the parameter dtype.

    Returns ``(ddp_model, optimizer)`` (``ddp_model`` a list when ``model`` is); ``ddp_model.module`` is ``model``,
    and the parameters' gradients live in ``param.main_grad`` (``param.grad`` stays ``None``).
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0 or eps <= 0 or clip_grad < 0 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"bad AdamW settings: weight_decay={weight_decay}, betas={betas}, eps={eps}, "
                         f"clip_grad={clip_grad}")
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    trainable = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    dtypes = {p.dtype for p in trainable}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
        # fp16 would need megatron's loss scaler, which nothing here drives.
        raise ValueError(f"trainable parameters must all be fp32 or all bf16, got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,  # the trainer checks loss and grad norm on every rank itself
    )
    ddps = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_eps=eps,
        clip_grad=clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed_optimizer,
        decoupled_weight_decay=True,
    )
    # setup_distributed creates megatron's gloo copies of the groups only on the CPU (where they are the groups).
    optimizer = get_megatron_optimizer(opt_config, ddps, use_gloo_process_groups=get_context().backend == "gloo")
    # megatron leaves lr and the per-group decay multiplier to its scheduler; apply them once here so the
    # optimizer is correct on its own.
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
    return (ddps if isinstance(model, (list, tuple)) else ddps[0]), optimizer


def step_if_finite(optimizer: MegatronOptimizer) -> tuple[bool, float]:
    """Clip and step only when the global gradient norm is finite: ``(stepped, grad_norm)``.

    The norm is all-reduced by megatron over every rank holding part of the gradients (TP, PP and, with the
    distributed optimizer, DP shards; without it DP replicas hold identical reduced gradients), so a NaN/Inf
    gradient on any rank makes every rank skip the same step. megatron's own ``step()`` would apply it.
    """
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    # step() prepares and norms the unchanged gradients again: a local copy and one scalar all-reduce.
    stepped, grad_norm, _ = optimizer.step()
    return bool(stepped), float(grad_norm)
