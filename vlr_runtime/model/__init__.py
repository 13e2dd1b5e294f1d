"""Qwen2.5-VL reward model on megatron-core (tensor-parallel layers), exact parity with stock transformers.

Entry points::

    ctx = vlr_runtime.parallel.setup_distributed(tp)            # groups, device, backend (CPU: gloo + compat)
    args = ModelArgs.from_hf_config(model_dir)                  # or ModelArgs.tiny()
    model = build_reward_model(args, dtype=torch.bfloat16, device=ctx.device, seed=None)
    vlr_runtime.checkpoint.hf.load_hf_checkpoint(model, model_dir)
    hidden = model(batch)                   # [T, H] last-layer hidden states BEFORE the final RMSNorm
    rewards = model.rewards(batch)          # [S] float32 at batch.scored_index (final norm + head), no grad
    loss, rewards, acc = model.loss(batch)  # vlr_kernels.fused_reward_loss over batch.pair_index

Module tree (``model.named_parameters()``; ``[q_r; k_r; v_r]`` = this TP rank's slice of each part, concatenated;
column = ColumnParallelLinear (output rows split), row = RowParallelLinear (input columns split, output all-reduced,
bias replicated), vocab = VocabParallelEmbedding; everything else replicated)::

    vision.patch_embed               [C, 3*2*14*14]     <- visual.patch_embed.proj.weight [C,3,2,14,14] (reshaped)
    vision.blocks.{i}.norm1.weight   [C]                <- visual.blocks.{i}.norm1.weight
    vision.blocks.{i}.attn.qkv       column, bias       <- visual.blocks.{i}.attn.qkv.{weight,bias} (3 row blocks)
    vision.blocks.{i}.attn.proj      row, bias          <- visual.blocks.{i}.attn.proj
    vision.blocks.{i}.norm2.weight                      <- visual.blocks.{i}.norm2.weight
    vision.blocks.{i}.mlp.gate_up    column, bias       <- visual.blocks.{i}.mlp.{gate_proj,up_proj}
    vision.blocks.{i}.mlp.down       row, bias          <- visual.blocks.{i}.mlp.down_proj
    vision.merger.ln_q.weight                           <- visual.merger.ln_q.weight
    vision.merger.fc1                column, bias       <- visual.merger.mlp.0
    vision.merger.fc2                row, bias          <- visual.merger.mlp.2
    language.embed.weight            vocab              <- model.embed_tokens.weight
    language.layers.{i}.input_norm.weight               <- model.layers.{i}.input_layernorm.weight
    language.layers.{i}.attn.qkv     column, bias       <- model.layers.{i}.self_attn.{q,k,v}_proj
    language.layers.{i}.attn.o_proj  row, no bias       <- model.layers.{i}.self_attn.o_proj
    language.layers.{i}.post_attn_norm.weight           <- model.layers.{i}.post_attention_layernorm.weight
    language.layers.{i}.mlp.gate_up  column, no bias    <- model.layers.{i}.mlp.{gate_proj,up_proj}
    language.layers.{i}.mlp.down     row, no bias       <- model.layers.{i}.mlp.down_proj
    language.final_norm.weight                          <- model.norm.weight
    head.weight [1, H], head.bias [1]                   <- value_head.safetensors v_head.summary.{weight,bias}
                                                           (or score.weight / score.bias in the main weights)

transformers-5 names ``model.language_model.*`` / ``model.visual.*`` are accepted on import; ``lm_head.weight`` is
ignored (a reward model has no LM head). The exact table is :func:`vlr_runtime.model.hf_names.hf_param_specs`.

Vision tower and TP (``build_reward_model(..., vision_parallel=)``): ``tensor`` shards it like the decoder;
``images`` keeps its full weights on every TP rank (forced when a width does not divide by tp, e.g. the 3420-wide
vision MLP at TP=8) and, while patch embedding and blocks are frozen, each TP rank encodes only its share of the
images (balanced by patches) and one all-gather rebuilds the block outputs before the (trainable) merger.
``auto`` (default) picks ``tensor`` when it divides, else ``images``.

Sequence parallelism (``build_reward_model(..., sequence_parallel=True)``, TP > 1): the decoder's residual stream
holds ``T_pad/tp`` tokens per rank (padded with one extra segment), megatron's column/row-parallel layers all-gather
and reduce-scatter around attention and MLP, norm-weight gradients are all-reduced inside autograd, and the head
reads the scored rows gathered with ``vlr_kernels.gather_scored_rows``. ``forward()`` still returns the full
``[T, H]``. Activation checkpointing: ``model.set_recompute(llm=..., vision=...)``.

Pipeline parallelism (``setup_distributed(tp, pp)`` with pp > 1): each rank builds its stage only
(:func:`~vlr_runtime.model.reward_model.stage_layer_ids`: contiguous decoder layers; vision tower + embedding on
the first stage, final norm + head on the last; parameter names stay global, e.g. ``language.layers.17.*``), loads
only its tensors, and runs through :func:`vlr_runtime.parallel.pipeline.forward_backward` (which is also the pp = 1
training step; megatron-core's 1F1B schedule). Virtual stages (``setup_distributed(tp, pp, vpp=V)``): each rank
builds V chunks, ``build_reward_model(..., vp_stage=v)``, chunk v being global stage ``v * pp + pp_rank`` of
``pp * V``; ``forward_backward`` runs the list with megatron's interleaved schedule. ``model.config`` is the megatron
``TransformerConfig`` that megatron's DDP and schedules read. Export sends every stage's tensors to rank 0 (not yet
for virtual chunks). With sequence parallelism each TP rank passes its ``T_pad / tp`` rows to the next stage.

``param_groups()`` keys: ``vision`` (patch_embed + blocks), ``merger``, ``llm`` (language.*), ``head``.

Why megatron's TP linears but our own attention/decoder modules: megatron's ``TransformerLayer`` applies its own
rotary embedding to [s, b, h] tensors and has no M-RoPE-from-``position_ids[3, T]`` nor the vision 2D rope in the HF
rotate-half layout; the layers here are ~40 lines each, use the same TP layers and collectives, and route every
attention through one :class:`~vlr_runtime.model.layers.CoreAttention` over packed segments (``cu_seqlens``).
"""

from vlr_runtime.model.args import ModelArgs, TextArgs, VisionArgs
from vlr_runtime.model.reward_model import RewardModel, build_reward_model

__all__ = ["ModelArgs", "RewardModel", "TextArgs", "VisionArgs", "build_reward_model"]
