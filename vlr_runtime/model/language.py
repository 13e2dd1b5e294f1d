"""Qwen2 decoder over packed tokens: GQA with q/k/v bias and M-RoPE, SwiGLU MLP, RMSNorm; returns the last layer's
hidden states BEFORE the final RMSNorm (the reward head applies that norm to the scored rows only)."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from torch import nn
from vlr_kernels.rotary import apply_rotary_qk, mrope_cos_sin, rope_inv_freq

from vlr_runtime.data.types import to_device
from vlr_runtime.model.args import TextArgs
from vlr_runtime.model.layers import (
    CoreAttention,
    RMSNorm,
    SwiGLUMLP,
    _no_init,
    column_linear,
    row_linear,
    run_layer,
)


class SelfAttention(nn.Module):
    """Causal GQA; ``qkv`` column-parallel (local ``[q_r; k_r; v_r]``: ``Hq/tp`` and ``Hkv/tp`` heads), ``o_proj``
    row-parallel without bias."""

    def __init__(self, args: TextArgs, config, group) -> None:
        super().__init__()
        tp = group.size()
        if args.num_kv_heads % tp:
            raise ValueError(f"num_key_value_heads {args.num_kv_heads} not divisible by tensor-parallel size {tp}")
        self.q_heads, self.kv_heads = args.num_heads // tp, args.num_kv_heads // tp
        self.head_dim = args.head_dim
        self.qkv = column_linear(args.hidden_size, (args.num_heads + 2 * args.num_kv_heads) * self.head_dim,
                                 bias=True, config=config, group=group)
        self.o_proj = row_linear(args.num_heads * self.head_dim, args.hidden_size, bias=False, config=config,
                                 group=group)
        self.core = CoreAttention(causal=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, prefix_lens: torch.Tensor | None, split_lens: torch.Tensor | None) -> torch.Tensor:
        """``x [T, H]`` (``[T/tp, H]`` with sequence parallelism), ``cos/sin [T, head_dim]`` -> like ``x``."""
        d = self.head_dim
        qkv = self.qkv(x)[0]
        t = qkv.shape[0]  # all tokens: with sequence parallelism x holds T/tp of them and qkv gathered them
        q, k, v = qkv.split([self.q_heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k = apply_rotary_qk(q.view(t, self.q_heads, d), k.view(t, self.kv_heads, d), cos, sin)
        out = self.core(q, k, v.view(t, self.kv_heads, d), cu_seqlens, max_seqlen, prefix_lens, split_lens)
        return self.o_proj(out.reshape(t, self.q_heads * d))[0]


class DecoderLayer(nn.Module):
    """Pre-norm residual block; with sequence parallelism the residual stream and norms hold ``T/tp`` tokens and
    the attention/MLP linears gather and reduce-scatter them (megatron's column/row-parallel layers)."""

    def __init__(self, args: TextArgs, config, group) -> None:
        super().__init__()
        sp_group = group if config.sequence_parallel else None
        self.input_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, sp_group)
        self.attn = SelfAttention(args, config, group)
        self.post_attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, sp_group)
        self.mlp = SwiGLUMLP(args.hidden_size, args.intermediate_size, bias=False, config=config, group=group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, prefix_lens: torch.Tensor | None, split_lens: torch.Tensor | None) -> torch.Tensor:
        attn = self.attn(self.input_norm(x), cos, sin, cu_seqlens, max_seqlen, prefix_lens, split_lens)
        normed, x = self.post_attn_norm(attn, residual=x)
        return x + self.mlp(normed)


class LanguageModel(nn.Module):
    """Token embedding (vocab-parallel), decoder layers, and the final RMSNorm (applied by the reward head);
    ``layer_ids``/``pre_process``/``post_process`` select one pipeline stage's part."""

    def __init__(self, args: TextArgs, config, group, layer_ids: range | None = None, pre_process: bool = True,
                 post_process: bool = True) -> None:
        super().__init__()
        self.args = args
        tp = group.size()
        layer_ids = range(args.num_layers) if layer_ids is None else layer_ids
        for name, size in (("vocab_size", args.vocab_size), ("intermediate_size", args.intermediate_size),
                           ("num_attention_heads", args.num_heads)):
            if size % tp:
                raise ValueError(f"{name} {size} not divisible by tensor-parallel size {tp}")
        # A pipeline stage holds the embedding only on the first stage, the final norm only on the last, and its own
        # decoder layers under their global indices (so parameter names are those of the whole model).
        self.embed = VocabParallelEmbedding(args.vocab_size, args.hidden_size, init_method=_no_init, config=config,
                                            tp_group=group) if pre_process else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(args, config, group) for i in layer_ids})
        # Applied by the reward head to gathered scored rows only, so never sequence-parallel.
        self.final_norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if post_process else None
        self.group = group
        self.sequence_parallel = bool(config.sequence_parallel) and tp > 1
        self.recompute = False
        """Activation checkpointing of every decoder layer (set by :meth:`RewardModel.set_recompute`)."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                prefix_lens: torch.Tensor | None = None, split_lens: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the token embeddings ``[T, H]`` on the first pipeline stage, else the previous stage's output as
        this rank holds it (like the return value); ``position_ids [3, T]`` (M-RoPE t/h/w streams). Returns the
        hidden states before the final norm: ``[T, H]``, or with sequence parallelism this rank's ``[T_pad / tp, H]``
        rows ``[rank * T_pad / tp, ...)`` of the tokens padded to ``T_pad`` (a multiple of tp; the padding is one
        extra segment of zero embeddings)."""
        if self.sequence_parallel:
            pad = -position_ids.shape[1] % self.group.size()
            position_ids, cu_seqlens, max_seqlen, prefix_lens, split_lens = self._pad_segments(
                pad, position_ids, cu_seqlens, max_seqlen, prefix_lens, split_lens)
            if self.embed is not None:
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x
                x = scatter_to_sequence_parallel_region(x, group=self.group)
        # computed on the host like transformers' buffer (same bits), moved without making the host wait
        inv_freq = to_device(rope_inv_freq(self.args.head_dim, self.args.rope_theta), x.device)
        cos, sin = mrope_cos_sin(position_ids, inv_freq, self.args.mrope_section)
        # transformers casts the rotary tables to the activation dtype before rotating; do the same for parity.
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers.values():
            x = run_layer(layer, self.recompute, x, cos, sin, cu_seqlens, max_seqlen, prefix_lens, split_lens)
        return x

    @staticmethod
    def _pad_segments(pad, position_ids, cu_seqlens, max_seqlen, prefix_lens, split_lens):
        """Segment metadata for ``pad`` extra tokens: one more segment at position 0."""
        if pad == 0:
            return position_ids, cu_seqlens, max_seqlen, prefix_lens, split_lens
        t = position_ids.shape[1]
        position_ids = torch.cat([position_ids, position_ids.new_zeros(3, pad)], dim=1)
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_full((1,), t + pad)])
        if prefix_lens is not None:
            prefix_lens = torch.cat([prefix_lens, prefix_lens.new_zeros(1)])
            split_lens = torch.cat([split_lens, split_lens.new_full((1,), pad)])
        return position_ids, cu_seqlens, max(max_seqlen, pad), prefix_lens, split_lens
