"""One training/eval step over microbatches for any pipeline size: ``forward_backward(model, microbatches)``.

With ``pp == 1`` it is a loop of ``model.loss`` + backward. With pipeline stages it runs megatron-core's schedules
(``get_forward_backward_func``): 1F1B, or the interleaved 1F1B when the model is a list of virtual stage chunks
(``build_reward_model(..., vp_stage=v)`` for every ``v``, after ``setup_distributed(tp, pp, vpp=...)``). Every stage
holds every microbatch (positions, ``cu_seqlens`` and the scored rows are needed on all of them), so only hidden
states travel: ``[T_max, 1, H]`` (megatron's ``[s, b, h]`` with one packed sequence; with sequence parallelism each
TP rank sends its ``T_pad / tp`` rows to the same TP rank of the next stage), zero-padded to the step's longest
microbatch and cut back to the microbatch's length on arrival. One fixed shape per step instead of megatron's
``variable_seq_lengths`` saves a shape exchange before every message, and is required for correctness at pp = 2 with
virtual stages: there the previous and next stage are the same process, and megatron's shape exchange (always a
batched send/recv in the pipeline group) pairs the forward and backward messages by posting order, which crosses
them over gloo. For the same reason ``model.config.batch_p2p_comm`` is off: megatron's unbatched p2p puts the two
directions of a two-rank pipeline in different process groups. Each microbatch's loss is scaled by
``1/len(microbatches)`` by the schedule; the last stage's metrics are broadcast over the pipeline group, so every
rank returns the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

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


def _unwrap(model):
    """The reward model inside megatron's DDP wrapper: gradients flow through hooks on its parameters, so the inner
    model runs as is."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def forward_backward(model, microbatches: list[PackedBatch], *, center_coef: float = 0.0,
                     forward_only: bool = False) -> list[MicrobatchResult]:
    """Loss, rewards and accuracy of each microbatch (the same on every rank); unless ``forward_only``, the
    gradients of ``mean(loss over microbatches)`` are accumulated into the parameters' ``.grad`` (or, under megatron
    DDP, their ``main_grad``). ``model``: the reward model (this rank's pipeline stage), optionally DDP-wrapped, or
    the list of this rank's virtual stage chunks (interleaved schedule)."""
    if not microbatches:
        raise ValueError("forward_backward needs at least one microbatch")
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks:
        raise ValueError("forward_backward needs at least one model chunk")
    first = _unwrap(chunks[0])
    if len(chunks) != first.vpp:
        raise ValueError(f"got {len(chunks)} model chunks for {first.vpp} virtual pipeline stages")
    if first.pp == 1 and first.vpp == 1:
        return _without_pipeline(first, microbatches, center_coef, forward_only)
    return _pipelined(chunks, microbatches, center_coef, forward_only)


def _without_pipeline(model, microbatches, center_coef, forward_only) -> list[MicrobatchResult]:
    n = len(microbatches)
    results = []
    for batch in microbatches:
        with torch.set_grad_enabled(not forward_only):
            loss, rewards, accuracy = model.loss(batch, center_coef)
        if not forward_only:
            (loss / n).backward()
        results.append(MicrobatchResult(loss.detach(), rewards.detach(), accuracy.detach()))
    return results


def _loss_func(rewards: torch.Tensor, accuracy: torch.Tensor, loss: torch.Tensor):
    """megatron's loss-function contract ``(loss, reduced)``: the schedule scales ``loss`` in place by
    ``1/num_microbatches`` and backpropagates it (hence a copy), and returns ``reduced`` of every microbatch."""
    metrics = {"loss": loss.detach().float(), "rewards": rewards.detach().float(), "accuracy": accuracy.detach().float()}
    return loss.clone(), metrics


def _stage_step(center_coef: float, padded_tokens: int, data_iterator, chunk):
    """megatron's ``forward_step_func``: this chunk's stage on the next microbatch (activations travel as
    ``[padded_tokens, 1, H]``)."""
    batch = next(data_iterator)
    stage = _unwrap(chunk)
    hidden_in = None if stage.is_first_stage else stage.input_tensor[: stage.stage_tokens(batch), 0]
    out = stage.stage_forward(batch, hidden_in, center_coef)
    if not stage.is_last_stage:
        return torch.nn.functional.pad(out, (0, 0, 0, padded_tokens - out.shape[0])).unsqueeze(1), None
    loss, rewards, accuracy = out
    return loss, partial(_loss_func, rewards, accuracy)


def _pipelined(chunks, microbatches, center_coef, forward_only) -> list[MicrobatchResult]:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from vlr_runtime.parallel import get_context

    schedule = get_forward_backward_func()
    padded_tokens = max(_unwrap(chunks[0]).stage_tokens(b) for b in microbatches)
    with torch.set_grad_enabled(not forward_only):
        reduced = schedule(
            forward_step_func=partial(_stage_step, center_coef, padded_tokens),
            # Every chunk reads every microbatch; the interleaved schedule wants one iterator per chunk.
            data_iterator=[iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(microbatches),
            seq_length=padded_tokens,
            micro_batch_size=1,
            forward_only=forward_only,
        )
    device = get_context().device
    group = parallel_state.get_pipeline_model_parallel_group()
    last = dist.get_global_rank(group, group.size() - 1)
    on_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if on_last and len(reduced) != len(microbatches):
        raise RuntimeError(f"the schedule returned {len(reduced)} results for {len(microbatches)} microbatches")
    # One broadcast for the whole step: per microbatch [loss, accuracy, rewards...].
    sizes = [2 + b.scored_index.numel() for b in microbatches]
    if on_last:
        flat = torch.cat([torch.cat([r["loss"].reshape(1), r["accuracy"].reshape(1), r["rewards"].reshape(-1)])
                          for r in reduced]).to(device)
    else:
        flat = torch.empty(sum(sizes), device=device)
    dist.broadcast(flat, last, group=group)
    return [MicrobatchResult(part[0], part[2:], part[1]) for part in flat.split(sizes)]
