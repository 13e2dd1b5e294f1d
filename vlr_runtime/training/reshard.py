"""Layout-independent checkpoint content, so a run can resume at another TP/PP/VPP/DP size or with the other
optimizer: every parameter, its fp32 master (16-bit parameters only) and its AdamW moments as FULL tensors under
their HF names (``full.<kind>.<hf name>``, kind in ``param``, ``master``, ``exp_avg``, ``exp_avg_sq``).

Each pipeline stage's TP-rank-0 / DP-rank-0 process writes its own stage's tensors (all its virtual-stage chunks)
into its own checkpoint file (TP slices all-gathered inside the TP group; nothing crosses stages), so the union of
the rank files holds every tensor once. With megatron's distributed optimizer each DP rank owns a contiguous range
of every parameter's fp32 master and Adam moments; the full local (TP-slice) tensors are first summed onto DP rank
0 from zero-filled buffers holding each rank's range (exact: every element has one non-zero contribution). On load
every rank cuts its slices from that union with the same slicing as the HF import
(:func:`vlr_runtime.model.hf_names.local_value`) and, with the distributed optimizer, keeps its own DP range.

For a resume on the same layout without reading other ranks' files, :func:`distributed_shards` is the distributed
optimizer's per-rank state as it lies (MasterAdamW's is its torch ``state_dict``, saved by the trainer).

Supported optimizers: :class:`~vlr_runtime.training.optim.MasterAdamW` and megatron's ``DistributedOptimizer``
(or a ``ChainedOptimizer`` of them) over torch's Adam/AdamW, which megatron uses without Transformer Engine/Apex.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from vlr_runtime.checkpoint.hf import full_tensors
from vlr_runtime.model import RewardModel
from vlr_runtime.model.hf_names import ParamSpec, hf_param_specs, local_value
from vlr_runtime.parallel import get_context
from vlr_runtime.training.optim import MasterAdamW, adam_step_tensor

MOMENTS = ("exp_avg", "exp_avg_sq")
Optimizer = MasterAdamW | MegatronOptimizer


def _parts(optimizer: MegatronOptimizer) -> list[DistributedOptimizer]:
    """The distributed optimizers inside ``optimizer``; raises for anything whose state this module cannot read."""
    parts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for part in parts:
        if not isinstance(part, DistributedOptimizer):
            raise TypeError(f"checkpoints support megatron's DistributedOptimizer, got {type(part).__name__}")
        if type(part.optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            raise NotImplementedError(
                f"checkpoints of the distributed optimizer read torch Adam/AdamW state; this megatron uses "
                f"{type(part.optimizer).__name__} (Transformer Engine / Apex installed)")
    return parts


def _owned(parts: list[DistributedOptimizer], param: torch.nn.Parameter
           ) -> tuple[torch.optim.Optimizer, torch.Tensor, int, int] | None:
    """``(inner torch optimizer, main shard, start, end)``: the range ``[start, end)`` of ``param`` (flattened)
    whose fp32 main copy and Adam state this DP rank's distributed optimizer holds, or None when it owns none."""
    for part in parts:
        if param in part.model_param_gbuf_map:
            group, order = part.model_param_group_index_map[param]
            rng = part._get_model_param_range_map(param)["param"]
            return part.optimizer, part.optimizer.param_groups[group]["params"][order], rng.start, rng.end
    return None


def _steps(chunks: Sequence[RewardModel], optimizer: Optimizer, dp_group: dist.ProcessGroup | None
           ) -> dict[torch.nn.Parameter, int]:
    """Adam steps taken by every trained parameter of ``chunks`` (0: no state yet; torch's AdamW skips a parameter
    that had no gradient, e.g. the merger in a text-only step). With the distributed optimizer the owners' counts
    are max-reduced over the DP group, so every DP rank knows them even for a parameter it owns nothing of."""
    trained = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    if isinstance(optimizer, MasterAdamW):
        return {p: int(optimizer.optimizer.state.get(optimizer.master_of(p), {}).get("step", 0)) for p in trained}
    parts = _parts(optimizer)
    counts = torch.zeros(len(trained), dtype=torch.float64, device=get_context().device)
    for i, p in enumerate(trained):
        owned = _owned(parts, p)
        if owned is not None:
            counts[i] = float(owned[0].state.get(owned[1], {}).get("step", 0))
    if dp_group is not None and dp_group.size() > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=dp_group)
    return {p: int(c) for p, c in zip(trained, counts.tolist())}


def _local_state(optimizer: Optimizer, param: torch.nn.Parameter, step: int, dp_group: dist.ProcessGroup | None
                 ) -> dict[str, torch.Tensor]:
    """``{kind: tensor shaped like param}`` of this rank's TP slice of one trained parameter: itself, its fp32
    master (16-bit parameters) and Adam moments (``step > 0``). With the distributed optimizer the master and
    moments are complete on DP rank 0 only (collective over ``dp_group``)."""
    out = {"param": param.detach()}
    kinds = (["master"] if param.dtype != torch.float32 else []) + (list(MOMENTS) if step else [])
    if isinstance(optimizer, MasterAdamW):
        master = optimizer.master_of(param)
        state = optimizer.optimizer.state.get(master, {})
        for kind in kinds:
            out[kind] = master.detach() if kind == "master" else state[kind]
        return out
    owned = _owned(_parts(optimizer), param)
    for kind in kinds:
        full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        if owned is not None:
            inner, main, start, end = owned
            full[start:end] = main.detach() if kind == "master" else inner.state[main][kind]
        if dp_group is not None and dp_group.size() > 1:
            dist.reduce(full, dst=dist.get_global_rank(dp_group, 0), group=dp_group)
        out[kind] = full.view(param.shape)
    return out


def canonical_tensors(chunks: Sequence[RewardModel], optimizer: Optimizer, *, tp_rank: int, dp_rank: int,
                      dp_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """``full.<kind>.<hf name>`` tensors of this rank's stage (all its chunks), and ``full.step.<hf name>`` (``[1]``
    float64: the trained parameter's Adam steps); empty except on TP rank 0 of DP rank 0, which writes them.
    Collective over the TP group and, with the distributed optimizer, the DP group."""
    steps = _steps(chunks, optimizer, dp_group)
    out: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for spec in hf_param_specs(chunk.args):
            param = params.get(spec.param)
            if param is None:  # another pipeline stage's
                continue
            local = _local_state(optimizer, param, steps[param], dp_group) if param.requires_grad \
                else {"param": param.detach()}
            if dp_rank != 0:  # the whole TP group of this DP rank skips the gathers together
                continue
            for kind, value in local.items():
                for name, full in full_tensors(chunk, spec, value=value):
                    if tp_rank == 0:
                        out[f"full.{kind}.{name}"] = full
                        if kind == "param" and param.requires_grad:
                            out[f"full.step.{name}"] = torch.tensor([float(steps[param])], dtype=torch.float64)
    return out


def _set_adam_state(inner: torch.optim.Optimizer, main: torch.Tensor, step: int, moment: Callable[[str], torch.Tensor]
                    ) -> None:
    """Adam state of ``main`` (the tensor ``inner`` updates) after ``step`` steps, moments ``moment(name)`` (any
    device/dtype), placed as torch's AdamW keeps it: moments like ``main``, the step as :func:`adam_step_tensor`."""
    group = next(g for g in inner.param_groups if any(p is main for p in g["params"]))
    inner.state[main] = {
        "step": adam_step_tensor(group, main.device, step),
        **{k: moment(k).to(device=main.device, dtype=main.dtype).clone() for k in MOMENTS}}


def _set_state(optimizer: Optimizer, param: torch.nn.Parameter, local: Callable[[str], torch.Tensor],
               step: int) -> None:
    """Set the optimizer's master and Adam state of ``param`` (Adam ``step`` = ``step``; none when 0) from full
    local (TP-slice) tensors ``local(kind)``; with the distributed optimizer only this DP rank's range."""
    if isinstance(optimizer, MasterAdamW):
        master = optimizer.master_of(param)
        if master is not param:
            master.copy_(local("master"))
        if step:
            _set_adam_state(optimizer.optimizer, master, step, local)
        return
    owned = _owned(_parts(optimizer), param)
    if owned is None:
        return
    inner, main, start, end = owned
    # fp32 parameters: the main shard is a view of the parameter, already set by the caller.
    if param.dtype != torch.float32:
        main.copy_(local("master").reshape(-1)[start:end])
    if step:
        _set_adam_state(inner, main, step, lambda k: local(k).reshape(-1)[start:end])


@torch.no_grad()
def load_canonical(chunks: Sequence[RewardModel], optimizer: Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Set this rank's parameters (every chunk), masters and AdamW state from the union of the ``full.*`` tensors
    of a checkpoint written at any layout with either optimizer (a parameter trained now but frozen then starts
    without Adam state). Raises KeyError naming a missing tensor. No communication."""

    def reader(kind: str):
        def read(name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
            key = f"full.{kind}.{name}"
            if key not in tensors:
                raise KeyError(f"checkpoint has no {key!r} (saved by a version without resharding support?)")
            return tensors[key] if dim is None else tensors[key].narrow(dim, start, length)
        return read

    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for spec in hf_param_specs(chunk.args):
            param = params.get(spec.param)
            if param is None:
                continue

            def local(kind: str, spec: ParamSpec = spec, param: torch.nn.Parameter = param,
                      chunk: RewardModel = chunk) -> torch.Tensor:
                # HF shape -> the parameter's (the patch embedding is flattened)
                return local_value(spec, reader(kind), *chunk.shard_of(spec.param)).reshape(param.shape)

            param.copy_(local("param"))
            if param.requires_grad:
                step = tensors.get(f"full.step.{spec.parts[0].name}")
                _set_state(optimizer, param, local, 0 if step is None else int(step))


def distributed_shards(chunks: Sequence[RewardModel], optimizer: MegatronOptimizer) -> dict[str, torch.Tensor]:
    """This DP rank's own part of the distributed optimizer's state, for a resume on the same layout that reads
    only this rank's file: per trained parameter ``name`` whose flattened range ``[start, end)`` this rank owns,
    ``dist.range.<name>`` (``[2]`` int64 start, end), ``dist.step.<name>`` (``[1]`` float64 Adam steps) and
    ``dist.<kind>.<name>`` (``[end - start]``: ``master`` for 16-bit parameters, the Adam moments once stepped).
    No communication."""
    parts = _parts(optimizer)
    out: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            owned = _owned(parts, param) if param.requires_grad else None
            if owned is None:
                continue
            inner, main, start, end = owned
            state = inner.state.get(main, {})
            out[f"dist.range.{name}"] = torch.tensor([start, end], dtype=torch.int64)
            out[f"dist.step.{name}"] = torch.tensor([float(state.get("step", 0))], dtype=torch.float64)
            if param.dtype != torch.float32:
                out[f"dist.master.{name}"] = main.detach()
            out.update({f"dist.{k}.{name}": state[k] for k in MOMENTS if k in state})
    return out


@torch.no_grad()
def load_distributed_shards(chunks: Sequence[RewardModel], optimizer: MegatronOptimizer,
                            tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`distributed_shards` on the same layout (the parameters themselves are set by the caller).
    Raises RuntimeError when this rank's ranges differ from the saved ones (another DP size or bucketing)."""
    parts = _parts(optimizer)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            owned = _owned(parts, param) if param.requires_grad else None
            saved = tensors.get(f"dist.range.{name}")
            mine = None if owned is None else [owned[2], owned[3]]
            if (None if saved is None else saved.tolist()) != mine:
                raise RuntimeError(f"{name}: this rank owns range {mine} of the distributed optimizer's state, the "
                                   f"checkpoint holds {None if saved is None else saved.tolist()}")
            if owned is None:
                continue
            inner, main, _, _ = owned
            if param.dtype != torch.float32:
                main.copy_(tensors[f"dist.master.{name}"])
            step = int(tensors[f"dist.step.{name}"])
            if step:
                _set_adam_state(inner, main, step, lambda k, name=name: tensors[f"dist.{k}.{name}"])
