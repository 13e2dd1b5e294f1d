"""The one table that maps every parameter of :class:`RewardModel` to Hugging Face Qwen2.5-VL tensors, and the one
routine that fills a model's local (TP-sharded) parameters from full HF-shaped tensors.

A parameter's local value on TP rank ``r`` of ``tp`` is::

    cat([hf[part.name].narrow(split_dim, part.start + r * part.length // tp, part.length // tp) for part in parts],
        dim=split_dim)

``split_dim`` is 0 for column-parallel weights/biases and the vocab-parallel embedding, 1 for row-parallel weights,
``None`` for replicated tensors (norms, row-parallel biases, patch embedding, head). Import
(:mod:`vlr_runtime.checkpoint.hf`), export (the inverse) and the seeded random init all go through this table, so
a model initialised with a seed is the same function for every TP size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlr_runtime.model.args import ModelArgs

HEAD_WEIGHT = "v_head.summary.weight"
HEAD_BIAS = "v_head.summary.bias"


@dataclass(frozen=True)
class Part:
    """Rows ``[start, start + length)`` (along the spec's ``split_dim``) of the HF tensor ``name`` of full shape
    ``shape``; ``length=None``: all of it."""

    name: str
    shape: tuple[int, ...]
    start: int = 0
    length: int | None = None


@dataclass(frozen=True)
class ParamSpec:
    param: str
    """Our parameter name (``model.named_parameters()``)."""
    parts: tuple[Part, ...]
    split_dim: int | None


def hf_param_specs(args: ModelArgs) -> list[ParamSpec]:
    """Every parameter of the model with its HF source, in a stable order (HF names in the released layout:
    ``visual.*``, ``model.*``; the value head as ``v_head.summary.*``)."""
    v, t = args.vision, args.text
    c, ci = v.hidden_size, v.intermediate_size
    h, hi, q, kv = t.hidden_size, t.intermediate_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    specs: list[ParamSpec] = []

    def add(param: str, parts: list[Part] | Part, split_dim: int | None) -> None:
        specs.append(ParamSpec(param, tuple(parts) if isinstance(parts, list) else (parts,), split_dim))

    add("vision.patch_embed",
        Part("visual.patch_embed.proj.weight", (c, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),
        None)
    for i in range(v.depth):
        src, dst = f"visual.blocks.{i}", f"vision.blocks.{i}"
        add(f"{dst}.norm1.weight", Part(f"{src}.norm1.weight", (c,)), None)
        add(f"{dst}.norm2.weight", Part(f"{src}.norm2.weight", (c,)), None)
        for kind, shape in (("weight", (3 * c, c)), ("bias", (3 * c,))):
            add(f"{dst}.attn.qkv.{kind}", [Part(f"{src}.attn.qkv.{kind}", shape, j * c, c) for j in range(3)], 0)
        add(f"{dst}.attn.proj.weight", Part(f"{src}.attn.proj.weight", (c, c)), 1)
        add(f"{dst}.attn.proj.bias", Part(f"{src}.attn.proj.bias", (c,)), None)
        for kind, shape in (("weight", (ci, c)), ("bias", (ci,))):
            add(f"{dst}.mlp.gate_up.{kind}",
                [Part(f"{src}.mlp.gate_proj.{kind}", shape), Part(f"{src}.mlp.up_proj.{kind}", shape)], 0)
        add(f"{dst}.mlp.down.weight", Part(f"{src}.mlp.down_proj.weight", (c, ci)), 1)
        add(f"{dst}.mlp.down.bias", Part(f"{src}.mlp.down_proj.bias", (c,)), None)
    m = c * v.spatial_merge_size**2
    add("vision.merger.ln_q.weight", Part("visual.merger.ln_q.weight", (c,)), None)
    add("vision.merger.fc1.weight", Part("visual.merger.mlp.0.weight", (m, m)), 0)
    add("vision.merger.fc1.bias", Part("visual.merger.mlp.0.bias", (m,)), 0)
    add("vision.merger.fc2.weight", Part("visual.merger.mlp.2.weight", (h, m)), 1)
    add("vision.merger.fc2.bias", Part("visual.merger.mlp.2.bias", (h,)), None)

    add("language.embed.weight", Part("model.embed_tokens.weight", (t.vocab_size, h)), 0)
    for i in range(t.num_layers):
        src, dst = f"model.layers.{i}", f"language.layers.{i}"
        add(f"{dst}.input_norm.weight", Part(f"{src}.input_layernorm.weight", (h,)), None)
        add(f"{dst}.post_attn_norm.weight", Part(f"{src}.post_attention_layernorm.weight", (h,)), None)
        att = f"{src}.self_attn"
        add(f"{dst}.attn.qkv.weight", [Part(f"{att}.q_proj.weight", (q, h)), Part(f"{att}.k_proj.weight", (kv, h)),
                                        Part(f"{att}.v_proj.weight", (kv, h))], 0)
        add(f"{dst}.attn.qkv.bias", [Part(f"{att}.q_proj.bias", (q,)), Part(f"{att}.k_proj.bias", (kv,)),
                                      Part(f"{att}.v_proj.bias", (kv,))], 0)
        add(f"{dst}.attn.o_proj.weight", Part(f"{att}.o_proj.weight", (h, q)), 1)
        add(f"{dst}.mlp.gate_up.weight",
            [Part(f"{src}.mlp.gate_proj.weight", (hi, h)), Part(f"{src}.mlp.up_proj.weight", (hi, h))], 0)
        add(f"{dst}.mlp.down.weight", Part(f"{src}.mlp.down_proj.weight", (h, hi)), 1)
    add("language.final_norm.weight", Part("model.norm.weight", (h,)), None)
    add("head.weight", Part(HEAD_WEIGHT, (1, h)), None)
    add("head.bias", Part(HEAD_BIAS, (1,)), None)
    return specs


def hf_tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full shape of every HF tensor the model reads (the layout the export writes), value head included."""
    return {part.name: part.shape for spec in hf_param_specs(args) for part in spec.parts}


Reader = Callable[[str, int | None, int, int], torch.Tensor]
"""``read(hf_name, dim, start, length)`` -> that slice of the HF tensor (``dim=None``: the whole tensor)."""


def local_value(spec: ParamSpec, read: Reader, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's value of ``spec.param`` assembled from HF tensors through ``read`` (see the module docstring).
    Raises ValueError naming the tensor when a checkpoint tensor does not have the shape the config implies."""
    pieces = []
    for part in spec.parts:
        if spec.split_dim is None:
            piece, expected = read(part.name, None, 0, 0), part.shape
        else:
            full = part.length if part.length is not None else part.shape[spec.split_dim]
            if full % tp:
                raise ValueError(f"{part.name}: size {full} along dim {spec.split_dim} not divisible by tp={tp}")
            chunk = full // tp
            piece = read(part.name, spec.split_dim, part.start + tp_rank * chunk, chunk)
            expected = part.shape[: spec.split_dim] + (chunk,) + part.shape[spec.split_dim + 1:]
        if tuple(piece.shape) != expected:
            raise ValueError(f"{part.name}: checkpoint slice has shape {tuple(piece.shape)}, the config implies "
                             f"{expected} (tp={tp}, rank {tp_rank})")
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=spec.split_dim)


def fill_parameters(model: nn.Module, read: Reader, skip: frozenset[str] = frozenset()) -> None:
    """Copy every parameter of ``model`` (except ``skip``) from HF tensors; shapes are checked, dtype converted."""
    params = dict(model.named_parameters())
    specs = [spec for spec in hf_param_specs(model.args) if spec.param in params]  # a pipeline stage: its own part
    missing = set(params) - {spec.param for spec in specs}
    if missing:
        raise AssertionError(f"parameters without an HF source: {sorted(missing)}")
    for spec in specs:
        if spec.param in skip:
            continue
        param = params[spec.param]
        value = local_value(spec, read, *model.shard_of(spec.param))
        with torch.no_grad():
            param.copy_(value.reshape(param.shape))


def mark_tensor_parallel(model: nn.Module) -> None:
    """Set megatron's ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` on every parameter from
    this table: True exactly for the parameters holding a 1/tp slice. (Megatron sets them only when it initialises
    weights itself, and flags column-parallel biases even inside a one-rank group such as a replicated vision
    tower; gradient-norm and optimizer code counts a flagged parameter on every TP rank.)"""
    params = dict(model.named_parameters())
    for spec in hf_param_specs(model.args):
        if spec.param not in params:
            continue
        _, size = model.shard_of(spec.param)
        sharded = spec.split_dim is not None and size > 1
        param = params[spec.param]
        param.tensor_model_parallel = sharded
        param.partition_dim = spec.split_dim if sharded else -1
        param.partition_stride = 1


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, hidden: int) -> torch.Tensor:
    """Deterministic HF-shaped init for ``name``: norms 1, biases 0, head ~N(0, 1/(H+1)), others ~N(0, 0.02)."""
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    std = 1.0 / math.sqrt(hidden + 1) if name == HEAD_WEIGHT else 0.02
    return torch.randn(shape, generator=gen) * std


def random_reader(args: ModelArgs, seed: int) -> Reader:
    """A :data:`Reader` over seeded random HF tensors (full tensors drawn on the CPU, then sliced)."""
    shapes = hf_tensor_shapes(args)

    def read(name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
        full = _random_tensor(name, shapes[name], seed, args.hidden_size)
        return full if dim is None else full.narrow(dim, start, length)

    return read


def init_random_weights(model: nn.Module, seed: int) -> None:
    """Seeded random init, identical for every TP size (each rank keeps its slice of the same full tensors)."""
    fill_parameters(model, random_reader(model.args, seed))


def init_head(model: nn.Module, seed: int) -> None:
    """Fresh value head only (a checkpoint without one); no-op on pipeline stages without the head."""
    if model.head is None:
        return
    read = random_reader(model.args, seed)
    with torch.no_grad():
        model.head.weight.copy_(read(HEAD_WEIGHT, None, 0, 0))
        model.head.bias.copy_(read(HEAD_BIAS, None, 0, 0))
