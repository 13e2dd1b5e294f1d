"""Building blocks shared by the vision tower and the decoder: tensor-parallel linears, RMSNorm, SwiGLU MLP and the
one core-attention module.

Tensor parallelism follows megatron-core: ``ColumnParallelLinear`` splits output features (each rank keeps
``out/tp`` rows of the weight), ``RowParallelLinear`` splits input features and all-reduces its output.
Fused projections (``qkv``, ``gate_up``) keep, on every rank, the concatenation of that rank's slice of each part
(``[q_r; k_r; v_r]``, ``[gate_r; up_r]``), so a rank's heads/features are contiguous and no cross-rank reshuffle is
ever needed. :mod:`vlr_runtime.checkpoint.hf` maps these local layouts to and from the HF tensors.

Every layer gets its tensor-parallel group explicitly (megatron >= 0.17 requires it): the decoder uses the TP group;
the vision tower uses it too, or a one-rank group when its sizes do not divide by the TP size (the 3420-wide
vision MLP of every Qwen2.5-VL at TP=8), in which case each TP rank runs the whole (small) vision tower.

All parameters are allocated with ``torch.empty`` inside a ``torch.device`` context (megatron's
``use_cpu_initialization`` path honours it), so one code path builds on CPU, CUDA and the meta device; values are
written later by :mod:`vlr_runtime.checkpoint.hf` (checkpoint or seeded random init).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer import TransformerConfig
from torch import nn
from vlr_kernels.rmsnorm import rms_norm
from vlr_kernels.swiglu import swiglu
from vlr_kernels.varlen_attention import varlen_attention


def parallel_config(tp: int, dtype: torch.dtype, sequence_parallel: bool = False) -> ModelParallelConfig:
    """The megatron config every TP layer of the model is built with (no fusions that need apex/TE, values written
    by our loader rather than megatron's initialisers). ``sequence_parallel``: column-parallel layers all-gather
    their token-sharded input, row-parallel layers reduce-scatter their output (megatron's sequence parallelism)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


def training_config(args, tp: int, pp: int, dtype: torch.dtype, vpp: int | None = None) -> TransformerConfig:
    """The config megatron's DDP and pipeline schedules read from the model (``model.config``): sizes of the decoder
    (``args: TextArgs``), parallel sizes, dtypes, and unbatched pipeline p2p (see
    :mod:`vlr_runtime.parallel.pipeline` for why). The layers themselves are built with :func:`parallel_config`.
    ``sequence_parallel`` stays off here even when the layers use it: the schedules are given per-rank token counts
    already, and the sequence-parallel norm gradients are reduced inside autograd (see :class:`RMSNorm`)."""
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_kv_heads,
        ffn_hidden_size=args.intermediate_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        batch_p2p_comm=False,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


def _no_init(_: torch.Tensor) -> None:
    """Megatron wants an init method; weights are written by the loader instead."""


def column_linear(in_features: int, out_features: int, *, bias: bool, config: ModelParallelConfig,
                  group: dist.ProcessGroup) -> ColumnParallelLinear:
    return ColumnParallelLinear(in_features, out_features, config=config, init_method=_no_init, bias=bias,
                                gather_output=False, tp_group=group)


def row_linear(in_features: int, out_features: int, *, bias: bool, config: ModelParallelConfig,
               group: dist.ProcessGroup) -> RowParallelLinear:
    return RowParallelLinear(in_features, out_features, config=config, init_method=_no_init, bias=bias,
                             input_is_parallel=True, skip_bias_add=False, tp_group=group)


def run_layer(layer: nn.Module, recompute: bool, *inputs):
    """``layer(*inputs)``; with ``recompute`` (and autograd on) only the inputs are kept and the layer's activations
    are recomputed in backward (collectives included, in the same order on every rank)."""
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *inputs, use_reentrant=False)
    return layer(*inputs)


class RMSNorm(nn.Module):
    """HF Qwen2 RMSNorm (normalise in fp32, cast back, multiply by ``weight``) through ``vlr_kernels.rms_norm``.

    ``sequence_parallel_group``: the norm sees only this rank's tokens, so the weight's gradient is partial; it is
    routed through megatron's copy-to-TP-region (identity forward, all-reduce backward) so that every rank ends
    with the full gradient inside autograd, with no extra step for the trainer (and no ``sequence_parallel``
    attribute, so megatron's ``finalize_model_grads`` would not all-reduce it a second time).
    """

    def __init__(self, hidden_size: int, eps: float, sequence_parallel_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps
        self.sequence_parallel_group = sequence_parallel_group

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``x [T, H]`` -> ``[T, H]``; with ``residual [T, H]``: ``(norm(x + residual), x + residual)`` in one pass
        (the residual add of a pre-norm block fused into the next norm)."""
        weight = self.weight
        if self.sequence_parallel_group is not None:
            weight = copy_to_tensor_model_parallel_region(weight, group=self.sequence_parallel_group)
        return rms_norm(x, weight, self.eps, residual=residual)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with ``gate_up`` column-parallel (local ``[gate_r; up_r]``) and ``down``
    row-parallel."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool, config: ModelParallelConfig,
                 group: dist.ProcessGroup) -> None:
        super().__init__()
        self.gate_up = column_linear(hidden, 2 * intermediate, bias=bias, config=config, group=group)
        self.down = row_linear(intermediate, hidden, bias=bias, config=config, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` -> ``[T, H]`` (all-reduced over the TP group)."""
        gate, up = self.gate_up(x)[0].chunk(2, dim=-1)
        return self.down(swiglu(gate, up))[0]


class CoreAttention(nn.Module):
    """The one attention entry point of the model: packed ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` and segment metadata
    in, ``[T, Hq, D]`` out, through ``vlr_kernels.varlen_attention`` (whose backend is chosen there, not here)."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        prefix_lens: torch.Tensor | None = None,
        split_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``cu_seqlens [N+1]`` int32 segment boundaries; ``prefix_lens``/``split_lens [N]`` the shared-prompt
        layout (causal only, see ``vlr_kernels.varlen_attention``)."""
        return varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal,
                                prefix_lens=prefix_lens, split_lens=split_lens)

    def extra_repr(self) -> str:
        return f"causal={self.causal}"
