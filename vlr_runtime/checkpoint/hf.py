"""Hugging Face Qwen2.5-VL directories in and out of the (tensor-parallel) reward model.

Import: ``model.safetensors`` or sharded ``model-*.safetensors`` + ``model.safetensors.index.json``; each TP rank
reads only its slices (safetensors slices are memory-mapped, so a rank never materialises a full tensor it shards)
and each pipeline stage only its own layers.
Reward head, first found of: ``value_head.safetensors`` (``v_head.summary.weight [1, H]``, ``v_head.summary.bias
[1]``: Skywork-VL-Reward / LLaMA-Factory), ``score.weight [1, H]`` (+ optional ``score.bias``) in the main weights
(sequence classification), else a freshly initialised head (logged, and reported as ``head="initialised"``).

Export writes format (a) of design.md: HF Qwen2.5-VL safetensors in the released naming (``model.*``, ``visual.*``),
``config.json`` (``tie_word_embeddings: true``: the reward model has no LM head, so ``lm_head`` is the embedding and
nothing is missing when stock transformers loads it), ``value_head.safetensors``, and the tokenizer/processor files
copied from ``source_dir``. TP shards are gathered, pipeline stages send their tensors to rank 0, which writes.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from vlr_runtime.model.args import ModelArgs
from vlr_runtime.model.hf_names import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    ParamSpec,
    fill_parameters,
    hf_param_specs,
    init_head,
)
from vlr_runtime.model.reward_model import RewardModel, stage_layer_ids

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
PREPROCESSING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)
_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def canonical_name(name: str) -> str:
    """transformers-5 module names -> the released (4.x) names used by the mapping table."""
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.name != VALUE_HEAD_FILE)
    if not files:
        if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
            raise ValueError(f"{model_dir} holds only pickle weights (.bin/.pt); only safetensors are loaded")
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


class _SafetensorsReader:
    """``read(name, dim, start, length)`` over a set of safetensors files (see ``hf_names.Reader``)."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self.location: dict[str, tuple[object, str]] = {}
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"weight file {path} listed in the index is missing")
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                self.location[canonical_name(key)] = (handle, key)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def __call__(self, name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
        if name not in self.location:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        handle, key = self.location[name]
        if dim is None:
            return handle.get_tensor(key)
        sl = handle.get_slice(key)
        index = tuple([slice(None)] * dim + [slice(start, start + length)])
        return sl[index]


def load_hf_checkpoint(model: RewardModel, model_dir: str | Path, *, head_seed: int = 0) -> dict:
    """Load an HF Qwen2.5-VL directory into ``model`` (any TP size; this rank's slices only).

    Returns ``{"files": [...], "head": "value_head" | "score" | "initialised", "ignored": [unused tensor names]}``.
    Raises with the tensor name on a missing tensor or a shape mismatch.
    """
    model_dir = Path(model_dir)
    args_dir = ModelArgs.from_hf_config(model_dir)
    if hf_param_specs(args_dir) != hf_param_specs(model.args):
        raise ValueError(f"{model_dir}/config.json describes a different model than the one built")
    files = _weight_files(model_dir)
    with ExitStack() as stack:
        reader = _SafetensorsReader(files, stack)
        fill_parameters(model, reader, skip=frozenset({"head.weight", "head.bias"}))
        head_file = model_dir / VALUE_HEAD_FILE
        if head_file.is_file():
            head_reader = _SafetensorsReader([head_file], stack)
            weight, bias, head = head_reader(HEAD_WEIGHT, None, 0, 0), head_reader(HEAD_BIAS, None, 0, 0), "value_head"
        elif "score.weight" in reader:
            weight = reader("score.weight", None, 0, 0)
            bias = reader("score.bias", None, 0, 0) if "score.bias" in reader else torch.zeros(1)
            head = "score"
        else:
            weight = bias = None
            head = "initialised"
        if weight is not None:
            if weight.numel() != model.args.hidden_size or bias.numel() != 1:
                raise ValueError(f"reward head in {model_dir} has shapes {tuple(weight.shape)}/{tuple(bias.shape)}, "
                                 f"expected [1, {model.args.hidden_size}] and [1] (one score per sequence)")
            if model.head is not None:  # the last pipeline stage
                with torch.no_grad():
                    model.head.weight.copy_(weight.view_as(model.head.weight))
                    model.head.bias.copy_(bias.view_as(model.head.bias))
        else:
            init_head(model, head_seed)
            log.warning("%s has no reward head (no %s, no score.weight): the head is freshly initialised",
                        model_dir, VALUE_HEAD_FILE)
        used = {part.name for spec in hf_param_specs(model.args) for part in spec.parts}
        ignored = sorted(n for n in reader.location if n not in used and n not in ("score.weight", "score.bias"))
    unexpected = [n for n in ignored if n != "lm_head.weight"]
    if unexpected:
        log.warning("%s: %d tensors not used by the reward model, e.g. %s", model_dir, len(unexpected), unexpected[:5])
    return {"files": [f.name for f in files], "head": head, "ignored": ignored}


def full_tensors(model: RewardModel, spec: ParamSpec, dtype: torch.dtype | None = None,
                 value: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """The HF tensor(s) ``(name, full tensor on the CPU)`` of one parameter of ``model`` (this rank's stage or
    virtual-stage chunk), TP slices all-gathered (collective over the TP group: every TP rank must call it).

    ``value``: a tensor shaped like this rank's slice of the parameter to gather instead of the parameter itself (its
    fp32 master or an Adam moment, for checkpoints); ``dtype``: convert before gathering (default: keep).
    """
    from megatron.core import parallel_state

    local = dict(model.named_parameters())[spec.param].detach() if value is None else value.detach()
    local = local if dtype is None else local.to(dtype)
    if spec.split_dim is None:
        return [(spec.parts[0].name, local.reshape(spec.parts[0].shape).cpu())]
    _, tp = model.shard_of(spec.param)
    if tp > 1:
        pieces = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(pieces, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    else:
        pieces = [local]
    lengths = [(p.length if p.length is not None else p.shape[spec.split_dim]) // tp for p in spec.parts]
    per_rank = [piece.split(lengths, dim=spec.split_dim) for piece in pieces]
    segments: dict[str, list[torch.Tensor]] = defaultdict(list)
    for j, part in enumerate(spec.parts):  # parts of one HF tensor (vision qkv) are its row blocks, in order
        segments[part.name].append(torch.cat([r[j] for r in per_rank], dim=spec.split_dim).cpu())
    return [(name, blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)) for name, blocks in segments.items()]


def _hf_names_of(spec: ParamSpec) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, full shape)`` of the HF tensors of one parameter, in the order :func:`full_tensors` yields."""
    return list(dict.fromkeys((p.name, p.shape) for p in spec.parts))


def iter_full_tensors(model: RewardModel | Sequence[RewardModel], dtype: torch.dtype | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor on the CPU)`` for every HF tensor of the WHOLE model, one parameter at a time, so
    that at most one full tensor per parameter is held. ``model``: this rank's stage, or the list of its virtual
    stage chunks. TP slices are all-gathered; with pipeline stages, rank 0 of the world receives the other stages'
    tensors (sent by their TP-rank-0, DP-rank-0 process) and is the only rank that gets everything (the others get
    their own stage's tensors). Every rank must iterate it to the end."""
    from megatron.core import parallel_state

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    first = chunks[0]
    owner = {name: chunk for chunk in chunks for name, _ in chunk.named_parameters()}
    if first.pp == 1:
        for spec in hf_param_specs(first.args):
            yield from full_tensors(owner[spec.param], spec, dtype)
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    dst = dist.get_global_rank(pp_group, 0)
    rank = dist.get_rank()
    # Only the TP-rank-0, DP-rank-0 pipeline (whose stage 0 is world rank 0) moves tensors between stages; the
    # first-stage ranks of the other TP/DP ranks' pipelines must not wait for sends that never come.
    sender = first.tp_rank == 0 and parallel_state.get_data_parallel_rank() == 0
    dtype = dtype or next(first.parameters()).dtype
    stages = first.pp * first.vpp
    by_stage = [stage_layer_ids(first.args.text.num_layers, stages, s) for s in range(stages)]
    for spec in hf_param_specs(first.args):
        if spec.param in owner:
            for name, tensor in full_tensors(owner[spec.param], spec, dtype):
                if rank != dst and sender:
                    dist.send(tensor.to(_comm_device()).contiguous(), dst)
                yield name, tensor
        elif rank == dst and sender:
            # Global (virtual) stage s runs on pipeline rank s % pp (megatron's interleaved assignment).
            src = dist.get_global_rank(pp_group, _stage_of(spec.param, by_stage) % first.pp)
            for name, shape in _hf_names_of(spec):
                buf = torch.empty(shape, dtype=dtype, device=_comm_device())
                dist.recv(buf, src)
                yield name, buf.cpu()


def _stage_of(param: str, by_stage: list[range]) -> int:
    """Global (virtual) pipeline stage holding a parameter: vision/embedding on the first, head/final norm on the
    last, decoder layers by ``by_stage`` (the layers of every global stage)."""
    if param.startswith(("vision.", "language.embed.")):
        return 0
    if param.startswith(("head.", "language.final_norm.")):
        return len(by_stage) - 1
    layer = int(param.split(".")[2])
    return next(s for s, ids in enumerate(by_stage) if layer in ids)


def _comm_device() -> torch.device:
    """Where point-to-point buffers live: the process's device for NCCL, the CPU for gloo."""
    from vlr_runtime.parallel import get_context

    return get_context().device


def export_hf_checkpoint(model: RewardModel | Sequence[RewardModel], args: ModelArgs, out_dir: str | Path, *,
                         source_dir: str | Path | None = None, dtype: torch.dtype | None = None,
                         max_shard_bytes: int = 5 * 2**30) -> Path | None:
    """Write ``model`` (this rank's stage, or the list of its virtual stage chunks) as an HF Qwen2.5-VL directory +
    ``value_head.safetensors`` (see the module docstring).

    Collective over all ranks (TP gathers, pipeline stages send to rank 0); rank 0 of the world writes and gets ``out_dir`` back,
    the other ranks ``None``. ``dtype``: tensor dtype on disk (default: the parameters' dtype). Shards of at most
    ``max_shard_bytes`` are written as the tensors are gathered (rank 0 holds one shard at a time).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = model[0] if isinstance(model, (list, tuple)) else model
    dtype = dtype or next(first.parameters()).dtype
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)
    head: dict[str, torch.Tensor] = {}
    shard: dict[str, torch.Tensor] = {}
    written: list[list[str]] = []
    size = total = 0

    def flush() -> None:
        save_file(shard, str(out_dir / f"model-part-{len(written):05d}.safetensors"), metadata={"format": "pt"})
        written.append(list(shard))
        shard.clear()

    for name, tensor in iter_full_tensors(model, dtype):
        if rank != 0:
            continue
        if name in (HEAD_WEIGHT, HEAD_BIAS):
            head[name] = tensor.contiguous()
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor.contiguous()
        size, total = size + nbytes, total + nbytes
    if rank != 0:
        dist.barrier()
        return None
    flush()
    save_file(head, str(out_dir / VALUE_HEAD_FILE), metadata={"format": "pt"})
    if len(written) == 1:
        (out_dir / "model-part-00000.safetensors").rename(out_dir / "model.safetensors")
    else:
        weight_map = {}
        for i, names in enumerate(written):
            fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            (out_dir / f"model-part-{i:05d}.safetensors").rename(out_dir / fname)
            weight_map.update({k: fname for k in names})
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = args.to_hf_config()
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if source_dir is not None:
        for fname in PREPROCESSING_FILES:
            src = Path(source_dir) / fname
            if src.is_file():
                shutil.copy2(src, out_dir / fname)
    if dist.is_initialized():
        dist.barrier()
    return out_dir
