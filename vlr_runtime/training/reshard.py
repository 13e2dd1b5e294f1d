"""Layout-independent checkpoint content, so a run can resume at another TP/PP size: every parameter, its fp32
master (16-bit parameters only) and its AdamW moments as FULL tensors under their HF names
(``full.<kind>.<hf name>``, kind in ``param``, ``master``, ``exp_avg``, ``exp_avg_sq``).

Each pipeline stage's TP-rank-0 / DP-rank-0 process writes its own stage's tensors into its own checkpoint file (TP
slices all-gathered inside the TP group; nothing crosses stages), so the union of the rank files holds every tensor
once. On load every rank cuts its slices from that union with the same slicing as the HF import
(:func:`vlr_runtime.model.hf_names.local_value`).
"""

from __future__ import annotations

import torch

from vlr_runtime.checkpoint.hf import _full_tensors_of
from vlr_runtime.model import RewardModel
from vlr_runtime.model.hf_names import ParamSpec, hf_param_specs, local_value
from vlr_runtime.training.optim import MasterAdamW

MOMENTS = ("exp_avg", "exp_avg_sq")


def _gather(model: RewardModel, param: torch.nn.Parameter, spec: ParamSpec, value: torch.Tensor):
    """Full HF tensors of ``value`` (shaped like ``param``'s local slice): the export's TP gather applied to it by
    lending it to the parameter for the call (collective over the TP group)."""
    saved = param.data
    param.data = value
    try:
        return _full_tensors_of(model, spec, None)
    finally:
        param.data = saved


def _master_of(optimizer: MasterAdamW, param: torch.nn.Parameter) -> torch.Tensor | None:
    """The tensor the optimizer updates for ``param`` (itself when fp32), None when it is frozen."""
    return next((m for p, m in zip(optimizer.params, optimizer.masters) if p is param), None)


def _tensors_of(optimizer: MasterAdamW, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """``{kind: local tensor}`` of one parameter: itself, its master and Adam moments when it is trained."""
    out = {"param": param.detach()}
    master = _master_of(optimizer, param)
    if master is None:  # frozen
        return out
    if master is not param:
        out["master"] = master.detach()
    state = optimizer.optimizer.state.get(master, {})
    out.update({k: state[k] for k in MOMENTS if k in state})
    return out


def canonical_tensors(model: RewardModel, optimizer: MasterAdamW, writer: bool) -> dict[str, torch.Tensor]:
    """``full.<kind>.<hf name>`` tensors of this rank's stage (empty unless ``writer``: TP rank 0, DP rank 0).
    Collective over the TP group: every TP rank must call it."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for spec in hf_param_specs(model.args):
        param = params.get(spec.param)
        if param is None:  # another pipeline stage's
            continue
        for kind, value in _tensors_of(optimizer, param).items():
            for name, full in _gather(model, param, spec, value):
                if writer:
                    out[f"full.{kind}.{name}"] = full
    return out


@torch.no_grad()
def load_canonical(model: RewardModel, optimizer: MasterAdamW, tensors: dict[str, torch.Tensor],
                   adam_step: int) -> None:
    """Set this rank's parameters, masters and AdamW state (``step`` = ``adam_step``) from the union of the
    ``full.*`` tensors of a checkpoint written at any layout. Raises KeyError naming a missing tensor."""
    params = dict(model.named_parameters())

    def reader(kind: str):
        def read(name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
            key = f"full.{kind}.{name}"
            if key not in tensors:
                raise KeyError(f"checkpoint has no {key!r} (saved by a version without resharding support?)")
            return tensors[key] if dim is None else tensors[key].narrow(dim, start, length)
        return read

    for spec in hf_param_specs(model.args):
        param = params.get(spec.param)
        if param is None:
            continue
        def local(kind: str, spec: ParamSpec = spec, param: torch.nn.Parameter = param) -> torch.Tensor:
            # HF shape -> the parameter's (the patch embedding is flattened)
            return local_value(spec, reader(kind), *model.shard_of(spec.param)).reshape(param.shape)

        param.copy_(local("param"))
        master = _master_of(optimizer, param)
        if master is None:
            continue
        if master is not param:
            master.copy_(local("master"))
        if adam_step > 0:
            state = optimizer.optimizer.state[master]
            state["step"] = torch.tensor(float(adam_step))
            for k in MOMENTS:
                state[k] = local(k).to(master.dtype).clone()
