"""The reward model: vision tower + Qwen2 decoder + scalar head, over one :class:`PackedBatch`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from torch import nn
from vlr_kernels.reward_loss import fused_reward_loss, gather_scored_rows, reward_scores

from vlr_runtime.data.types import PackedBatch, image_token_index
from vlr_runtime.model.args import ModelArgs
from vlr_runtime.model.language import LanguageModel
from vlr_runtime.model.layers import parallel_config, training_config
from vlr_runtime.model.vision import VisionTower, vision_splits_over


def stage_layer_ids(num_layers: int, pp: int, pp_rank: int) -> range:
    """Decoder layers of pipeline stage ``pp_rank``: contiguous, sizes differing by at most one (earlier stages get
    the extra layers; the first stage also runs the vision tower, the last the head)."""
    if num_layers < pp:
        raise ValueError(f"{num_layers} decoder layers cannot fill {pp} pipeline stages")
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


VISION_PARALLEL = ("auto", "tensor", "images")
"""How the vision tower uses the TP group: ``tensor`` shards its layers like the decoder's; ``images`` keeps full
weights on every rank and, while the patch embedding and blocks are frozen, splits the images between the ranks;
``auto`` = ``tensor`` when every vision width divides by tp, else ``images``."""


class RewardModel(nn.Module):
    """Qwen2.5-VL with a ``Linear(H, 1)`` head on the final-normed hidden state of each scored token.

    Built by :func:`build_reward_model`; see the package docstring for the parameter tree and the HF names.
    """

    model_type = ModelType.encoder_or_decoder
    """Read by megatron's pipeline schedules."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype, tp_group: dist.ProcessGroup,
                 self_group: dist.ProcessGroup, vision_parallel: str = "auto", sequence_parallel: bool = False,
                 pp_rank: int = 0, pp: int = 1, vp_stage: int = 0, vpp: int = 1) -> None:
        super().__init__()
        self.args = args
        self.tp = tp_group.size()
        self.tp_rank = tp_group.rank()
        self.tp_group = tp_group
        self.pp, self.pp_rank = pp, pp_rank
        if vpp > 1 and pp == 1 or not 0 <= vp_stage < vpp:
            raise ValueError(f"virtual stage {vp_stage} of {vpp} (needs pp > 1), pp={pp}")
        self.vpp, self.vp_stage = vpp, vp_stage
        # Virtual stage v of pipeline rank r is global stage v * pp + r (megatron's interleaved order).
        stage, stages = vp_stage * pp + pp_rank, pp * vpp
        self.is_first_stage, self.is_last_stage = stage == 0, stage == stages - 1
        self.input_tensor: torch.Tensor | None = None
        """``[T, 1, H]`` hidden states received from the previous stage (set by the pipeline schedule)."""
        config = parallel_config(self.tp, dtype)
        self.config = training_config(args.text, self.tp, pp, dtype, vpp if vpp > 1 else None)
        """What megatron's DDP and pipeline schedules read (``get_model_config``)."""
        if vision_parallel not in VISION_PARALLEL:
            raise ValueError(f"vision_parallel must be one of {VISION_PARALLEL}, got {vision_parallel!r}")
        if vision_parallel == "auto":
            vision_parallel = "tensor" if vision_splits_over(args.vision, self.tp) else "images"
        if vision_parallel == "tensor" and not vision_splits_over(args.vision, self.tp):
            raise ValueError(f"vision widths of {args.vision} do not divide by tp={self.tp}; use vision_parallel="
                             "'images'")
        # Pipeline stages: the vision tower and the embedding live on the first, the head on the last.
        self.vision: VisionTower | None = None
        if self.is_first_stage and vision_parallel == "tensor":
            self.vision = VisionTower(args.vision, config, tp_group)
        elif self.is_first_stage:
            self.vision = VisionTower(args.vision, config, self_group, image_split_group=tp_group)
        self.language = LanguageModel(args.text, parallel_config(self.tp, dtype, sequence_parallel and self.tp > 1),
                                      tp_group, stage_layer_ids(args.text.num_layers, stages, stage),
                                      pre_process=self.is_first_stage, post_process=self.is_last_stage)
        self.head = nn.Linear(args.hidden_size, 1, bias=True) if self.is_last_stage else None

    def set_input_tensor(self, input_tensor: list[torch.Tensor | None]) -> None:
        """megatron's pipeline hook: the previous stage's output for the next :meth:`stage_forward`."""
        self.input_tensor = input_tensor[0]

    def set_recompute(self, *, llm: bool, vision: bool) -> None:
        """Activation checkpointing per decoder layer / vision block: memory of one layer's activations instead of
        all of them, for one extra forward of the recomputed layers in backward. Results are unchanged."""
        self.language.recompute = llm
        if self.vision is not None:
            self.vision.recompute = vision

    def shard_of(self, param_name: str) -> tuple[int, int]:
        """``(rank, size)`` of the group a parameter is sharded over (the vision tower may run replicated)."""
        if param_name.startswith("vision.") and self.vision.tp == 1:
            return 0, 1
        return self.tp_rank, self.tp

    @property
    def final_norm(self) -> nn.Module:
        return self.language.final_norm

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings ``[T, H]`` with every ``<|image_pad|>`` row replaced by its image's vision embedding.

        Each unique image (``batch.pixel_values``) is encoded once; ``batch.image_index [G]`` says which image fills
        the G-th placeholder group, so images shared by chosen and rejected are reused, not re-encoded. With the
        host-side fields of a collated batch (``image_grid_thw_host``, ``image_token_pos``/``rows``) nothing here
        makes the host wait for the device.
        """
        embeds = self.language.embed(batch.input_ids)
        image_pos, rows = self._image_token_index(batch)
        if batch.num_images == 0:
            return embeds
        if batch.pixel_values is None:
            raise ValueError("image_grid_thw is set but pixel_values is None")
        grid = batch.image_grid_thw if batch.image_grid_thw_host is None else batch.image_grid_thw_host
        image_embeds = self.vision(batch.pixel_values, grid)
        return embeds.index_put((image_pos,), image_embeds[rows.to(image_embeds.device)].to(embeds.dtype))

    def _image_token_index(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_token_pos [M], image_token_rows [M])`` (see :class:`PackedBatch`): the batch's own, or, for a
        batch without them, derived from its device tensors (host synchronisations; the same checks)."""
        pos, rows = batch.image_token_pos, batch.image_token_rows
        if pos is None or rows is None:
            return image_token_index(batch.input_ids, batch.image_grid_thw, batch.image_index,
                                     image_token_id=self.args.image_token_id,
                                     spatial_merge_size=self.args.vision.spatial_merge_size,
                                     sample_ids=batch.sample_ids)
        # collate checked them against the image groups on the host; what is left to check uses shapes (host-known)
        # and, for their agreement with input_ids, one device-side assertion instead of a read-back.
        if pos.shape != rows.shape:
            raise ValueError(f"image_token_pos {tuple(pos.shape)} and image_token_rows {tuple(rows.shape)} differ "
                             f"(ids {batch.sample_ids})")
        if batch.num_images == 0 and pos.numel():
            raise ValueError(f"batch has {pos.numel()} <|image_pad|> tokens but no images (ids {batch.sample_ids})")
        is_image = batch.input_ids == self.args.image_token_id
        torch._assert_async((is_image.sum() == pos.numel()) & is_image[pos].all(),
                            f"image_token_pos does not list exactly the <|image_pad|> tokens of input_ids (ids "
                            f"{batch.sample_ids})")
        return pos, rows

    def stage_tokens(self, batch: PackedBatch) -> int:
        """Rows of the hidden states this rank holds between layers (and passes between pipeline stages): ``T``, or
        ``T_pad / tp`` with sequence parallelism."""
        if not self.language.sequence_parallel:
            return batch.num_tokens
        return -(-batch.num_tokens // self.tp)

    def hidden_local(self, batch: PackedBatch, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder output as this rank holds it: ``[stage_tokens(batch), H]`` (see
        :meth:`LanguageModel.forward`). ``hidden_in``: the previous pipeline stage's output as this rank holds it
        (every stage but the first)."""
        if self.is_first_stage != (hidden_in is None):
            raise ValueError("hidden_in must be given exactly on the pipeline stages after the first")
        x = self.embed(batch) if self.is_first_stage else hidden_in
        return self.language(x, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, batch.prefix_lens,
                             batch.split_lens)

    def stage_forward(self, batch: PackedBatch, hidden_in: torch.Tensor | None = None, center_coef: float = 0.0):
        """One pipeline stage: ``[T, H]`` hidden states for the next stage, or on the last stage ``(loss, rewards,
        accuracy)`` as :meth:`loss`. Driven by :func:`vlr_runtime.parallel.pipeline.forward_backward`."""
        if not self.is_last_stage:
            return self.hidden_local(batch, hidden_in)
        return self.loss(batch, center_coef, hidden_in)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Final-layer hidden states ``[T, H]`` BEFORE the final RMSNorm (the same on every TP rank); pp = 1 only."""
        if self.pp > 1:
            raise RuntimeError("with pipeline stages use vlr_runtime.parallel.pipeline.forward_backward")
        hidden = self.hidden_local(batch)
        if not self.language.sequence_parallel:
            return hidden
        # Every rank uses the full result identically, so the backward of the gather is a plain split.
        full = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=self.tp_group)
        return full[: batch.num_tokens]

    def _scored_rows(self, batch: PackedBatch, hidden_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, scored_index)`` for the head: the full hidden states and the batch's index, or, with sequence
        parallelism, only the ``[S, H]`` scored rows gathered from their ranks and ``arange(S)``."""
        hidden = self.hidden_local(batch, hidden_in)
        if not self.language.sequence_parallel:
            return hidden, batch.scored_index
        rows = gather_scored_rows(hidden, batch.scored_index, self.tp_rank * hidden.shape[0], self.tp_group)
        return rows, torch.arange(rows.shape[0], device=rows.device)

    def _head_args(self) -> dict:
        return {"head_weight": self.head.weight.view(-1), "head_bias": self.head.bias,
                    "norm_weight": self.final_norm.weight, "eps": self.args.text.rms_norm_eps}

    @torch.no_grad()
    def rewards(self, batch: PackedBatch) -> torch.Tensor:
        """``[S]`` float32 rewards at ``batch.scored_index`` (final norm + head); no autograd graph is built; pp = 1
        (with stages: ``forward_backward(..., forward_only=True)``)."""
        if self.pp > 1:
            raise RuntimeError("with pipeline stages use vlr_runtime.parallel.pipeline.forward_backward")
        return reward_scores(*self._scored_rows(batch), **self._head_args())

    def loss(self, batch: PackedBatch, center_coef: float = 0.0, hidden_in: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bradley-Terry loss over ``batch.pair_index`` (with ``batch.margin``): ``(loss 0-d, rewards [S] float32,
        accuracy 0-d)`` via ``vlr_kernels.fused_reward_loss``; differentiable w.r.t. every trainable parameter.
        Last pipeline stage only (``hidden_in``: the previous stage's output when pp > 1)."""
        if not self.is_last_stage:
            raise RuntimeError("the loss is computed on the last pipeline stage")
        hidden, scored_index = self._scored_rows(batch, hidden_in)
        return fused_reward_loss(hidden, scored_index, batch.pair_index, margin=batch.margin, center_coef=center_coef,
                                 **self._head_args())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, for freezing and per-group learning rates: ``vision`` (patch embed + blocks),
        ``merger``, ``llm`` (embedding, decoder layers, final norm), ``head``."""
        vision = self.vision
        return {
            "vision": [] if vision is None else [vision.patch_embed, *vision.blocks.parameters()],
            "merger": [] if vision is None else list(vision.merger.parameters()),
            "llm": list(self.language.parameters()),
            "head": [] if self.head is None else list(self.head.parameters()),
        }


def build_reward_model(
    args: ModelArgs,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    vision_parallel: str = "auto",
    sequence_parallel: bool = False,
    vp_stage: int | None = None,
) -> RewardModel:
    """Build the model on ``device`` with parameters in ``dtype``, sharded over the tensor-parallel group of
    :func:`vlr_runtime.parallel.setup_distributed` (which must have been called). ``seed``: deterministic random init, identical for any TP size
    (every rank draws the full HF-shaped tensor and keeps its slice); ``None`` leaves the storage uninitialised, for
    a checkpoint load that follows. On the meta device nothing is allocated or initialised. ``vision_parallel``:
    see :data:`VISION_PARALLEL`. ``sequence_parallel`` (TP > 1): the decoder's residual stream, norms and activations
    between the linears hold ``T/tp`` tokens per rank (megatron sequence parallelism; the vision tower is not
    sequence-parallel); the head reads only the gathered scored rows. With ``pp > 1`` this rank builds its pipeline
    stage only (see :func:`stage_layer_ids`; run it with :func:`vlr_runtime.parallel.pipeline.forward_backward`).
    With virtual stages (``setup_distributed(..., vpp=V)``) it builds chunk ``vp_stage`` (0..V-1) of this rank:
    global stage ``vp_stage * pp + pp_rank`` of ``pp * V``; pass the list of all V chunks to ``forward_backward``.
    """
    from vlr_runtime.model.hf_names import init_random_weights, mark_tensor_parallel
    from vlr_runtime.parallel import get_context

    ctx = get_context()
    if (vp_stage is None) != (ctx.vpp == 1):
        raise ValueError(f"vp_stage={vp_stage} with {ctx.vpp} virtual pipeline stages per rank: pass vp_stage "
                         "exactly when setup_distributed(vpp=...) was called with vpp > 1")
    device = torch.device(device)
    with torch.device(device):
        model = RewardModel(args, dtype, ctx.tp_group, ctx.self_group, vision_parallel, sequence_parallel,
                            ctx.pp_rank, ctx.pp, vp_stage or 0, ctx.vpp)
    model.to(dtype=dtype)
    mark_tensor_parallel(model)
    if seed is not None and device.type != "meta":
        init_random_weights(model, seed)
    return model
