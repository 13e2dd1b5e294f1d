"""One training/eval step over microbatches for any pipeline size: ``forward_backward(model, microbatches)``.

With ``pp == 1`` it is a loop of ``model.loss`` + backward. With pipeline stages it runs the fill-drain (GPipe)
schedule: every microbatch's forward through the stages (each stage receives ``[T, H]`` hidden states from the
previous stage and sends its output on; ``T`` is known from the batch, which every stage holds, so no shapes are
exchanged), then the backwards in reverse order (each stage receives the gradient of its output from the next and
sends the gradient of its input back). Point-to-point messages go through ``torch.distributed.send/recv`` over
the pipeline group, in one fixed order on every stage, so the schedule cannot deadlock. The last stage's metrics are
broadcast, so every rank returns the same values.

Why not megatron's ``get_forward_backward_func``: its p2p layer assumes ``[s, b, h]`` activations and its
loss-function contract changed between 0.16 and 0.19; this schedule is ~60 lines, version independent, and holds
all microbatches' activations (1F1B would hold ``pp`` of them: a later improvement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel

from vlr_runtime.data.types import PackedBatch


@dataclass(frozen=True)
class MicrobatchResult:
    loss: torch.Tensor
    """0-d float32 (detached)."""
    rewards: torch.Tensor
    """``[S]`` float32 (detached)."""
    accuracy: torch.Tensor
    """0-d float32."""


def forward_backward(model, microbatches: list[PackedBatch], *, center_coef: float = 0.0,
                     forward_only: bool = False) -> list[MicrobatchResult]:
    """Loss, rewards and accuracy of each microbatch (the same on every rank); unless ``forward_only``, the
    gradients of ``mean(loss over microbatches)`` are accumulated into the parameters' ``.grad``."""
    if not microbatches:
        raise ValueError("forward_backward needs at least one microbatch")
    # megatron's DDP wrapper: gradients flow through hooks on the parameters, so the inner model runs as is.
    model = model.module if isinstance(model, DistributedDataParallel) else model
    n = len(microbatches)
    if model.pp == 1:
        results = []
        for batch in microbatches:
            with torch.set_grad_enabled(not forward_only):
                loss, rewards, accuracy = model.loss(batch, center_coef)
            if not forward_only:
                (loss / n).backward()
            results.append(MicrobatchResult(loss.detach(), rewards.detach(), accuracy.detach()))
        return results
    from megatron.core import parallel_state

    from vlr_runtime.parallel import get_context

    device = get_context().device
    group = parallel_state.get_pipeline_model_parallel_group()
    prev_rank = None if model.is_first_stage else parallel_state.get_pipeline_model_parallel_prev_rank()
    next_rank = None if model.is_last_stage else parallel_state.get_pipeline_model_parallel_next_rank()
    dtype = next(model.parameters()).dtype
    inputs: list[torch.Tensor | None] = []
    outputs: list = []
    for batch in microbatches:
        hidden_in = None
        if prev_rank is not None:
            hidden_in = torch.empty(batch.num_tokens, model.args.hidden_size, dtype=dtype, device=device)
            dist.recv(hidden_in, prev_rank)
            hidden_in.requires_grad_(not forward_only)
        with torch.set_grad_enabled(not forward_only):
            out = model.stage_forward(batch, hidden_in, center_coef)
        if next_rank is not None:
            dist.send(out.detach().contiguous(), next_rank)
        inputs.append(hidden_in)
        outputs.append(out)
    if not forward_only:
        for i in reversed(range(n)):
            if next_rank is None:
                (outputs[i][0] / n).backward()
            else:
                grad = torch.empty_like(outputs[i])
                dist.recv(grad, next_rank)
                outputs[i].backward(grad)
            if prev_rank is not None:
                dist.send(inputs[i].grad.contiguous(), prev_rank)
    last = dist.get_global_rank(group, model.pp - 1)
    results = []
    for batch, out in zip(microbatches, outputs):
        if model.is_last_stage:
            loss, rewards, accuracy = (t.detach().float().reshape(-1).to(device) for t in out)
        else:
            s = batch.scored_index.numel()
            loss, accuracy = torch.empty(1, device=device), torch.empty(1, device=device)
            rewards = torch.empty(s, device=device)
        for t in (loss, rewards, accuracy):
            dist.broadcast(t, last, group=group)
        results.append(MicrobatchResult(loss.reshape(()), rewards, accuracy.reshape(())))
    return results
