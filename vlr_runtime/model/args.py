"""Model sizes of the Qwen2.5-VL reward model, read from a Hugging Face ``config.json``.

Two layouts of ``config.json`` exist in the wild and both are accepted:
- the released checkpoints (transformers 4.x): text fields at the top level, ``rope_theta`` and
  ``rope_scaling = {"type": "mrope", "mrope_section": [...]}``, ``vision_config.in_chans``;
- transformers 5 ``save_pretrained``: a nested ``text_config`` with ``rope_parameters`` and ``vision_config.in_channels``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class VisionArgs:
    """Vision transformer sizes (HF ``vision_config``)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    """Width of the merger output = the LLM hidden size."""
    fullatt_block_indexes: list[int]
    """Blocks with full attention per image; every other block attends inside windows."""
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    """Window side in pixels (112 = 4x4 merged units of 2x2 patches of 14 px)."""
    rope_theta: float = 10000.0
    tokens_per_second: int = 2
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch: ``C * temporal_patch * patch * patch``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(kw_only=True)
class TextArgs:
    """Qwen2 decoder sizes (HF ``text_config`` or the top level of a 4.x config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    """Split of the ``head_dim/2`` rotary frequencies between the temporal, height and width position streams."""
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(kw_only=True)
class ModelArgs:
    """Everything :func:`vlr_runtime.model.build_reward_model` needs; ``from_hf_config`` reads it from a model dir."""

    vision: VisionArgs
    text: TextArgs
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)
    """The raw ``config.json`` it came from (kept so that export writes back every field it does not model)."""

    def __post_init__(self) -> None:
        v, t = self.vision, self.text
        if v.hidden_size % v.num_heads:
            raise ValueError(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        if t.hidden_size % t.num_heads:
            raise ValueError(f"text hidden_size {t.hidden_size} not divisible by num_heads {t.num_heads}")
        if t.num_heads % t.num_kv_heads:
            raise ValueError(f"num_heads {t.num_heads} not a multiple of num_kv_heads {t.num_kv_heads}")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if v.head_dim % 4:
            raise ValueError(f"vision head_dim {v.head_dim} must be a multiple of 4 (2D rotary over h and w)")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside [0, {v.depth})")

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | dict[str, Any]) -> ModelArgs:
        """Read a Qwen2.5-VL ``config.json`` (a model directory, the file itself, or its parsed dict)."""
        if isinstance(path_or_dict, dict):
            cfg = path_or_dict
        else:
            path = Path(path_or_dict)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            cfg = json.loads(path.read_text())
        model_type = cfg.get("model_type")
        if model_type not in ("qwen2_5_vl", None):
            raise ValueError(f"expected a Qwen2.5-VL config (model_type 'qwen2_5_vl'), got {model_type!r}")
        if "vision_config" not in cfg:
            raise ValueError("config.json has no vision_config: not a Qwen2.5-VL config")
        text = {**cfg, **cfg.get("text_config", {})}
        vis = cfg["vision_config"]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}

        def need(d: dict, key: str, where: str) -> Any:
            if key not in d:
                raise ValueError(f"config.json: {where} lacks {key!r}")
            return d[key]

        vision = VisionArgs(
            depth=need(vis, "depth", "vision_config"),
            hidden_size=need(vis, "hidden_size", "vision_config"),
            intermediate_size=need(vis, "intermediate_size", "vision_config"),
            num_heads=need(vis, "num_heads", "vision_config"),
            out_hidden_size=need(vis, "out_hidden_size", "vision_config"),
            fullatt_block_indexes=list(vis.get("fullatt_block_indexes", [7, 15, 23, 31])),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            window_size=vis.get("window_size", 112),
            rope_theta=float((vis.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            tokens_per_second=vis.get("tokens_per_second", 2),
            hidden_act=vis.get("hidden_act", "silu"),
        )
        text_args = TextArgs(
            vocab_size=need(text, "vocab_size", "text config"),
            hidden_size=need(text, "hidden_size", "text config"),
            intermediate_size=need(text, "intermediate_size", "text config"),
            num_layers=need(text, "num_hidden_layers", "text config"),
            num_heads=need(text, "num_attention_heads", "text config"),
            num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1000000.0))),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
            max_position_embeddings=text.get("max_position_embeddings", 128000),
            hidden_act=text.get("hidden_act", "silu"),
        )
        for name, act in (("vision", vision.hidden_act), ("text", text_args.hidden_act)):
            if act != "silu":
                raise ValueError(f"{name} hidden_act {act!r} is not supported (Qwen2.5-VL uses 'silu')")
        return cls(
            vision=vision,
            text=text_args,
            image_token_id=cfg.get("image_token_id", 151655),
            video_token_id=cfg.get("video_token_id", 151656),
            vision_start_token_id=cfg.get("vision_start_token_id", 151652),
            vision_end_token_id=cfg.get("vision_end_token_id", 151653),
            hf_config=cfg,
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelArgs:
        """A few-MB model for tests and the default CPU job (vocab 512, image token ids at its top end)."""
        vision = VisionArgs(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=[1])
        text = TextArgs(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, rope_theta=10000.0, mrope_section=[2, 3, 3])
        kw: dict[str, Any] = {"vision": vision, "text": text, "image_token_id": 508, "video_token_id": 509,
                                  "vision_start_token_id": 510, "vision_end_token_id": 511}
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers-5 ``config.json`` dict for ``Qwen2_5_VLForConditionalGeneration``.

        Fields this class does not model are taken from :attr:`hf_config` when it has them. ``tie_word_embeddings``
        is set because the reward model has no LM head: the exported directory then loads without missing tensors.
        """
        v, t = self.vision, self.text
        base = {k: val for k, val in self.hf_config.items() if k not in ("text_config", "vision_config")}
        text_base = dict(self.hf_config.get("text_config", {}))
        vis_base = dict(self.hf_config.get("vision_config", {}))
        vis_base.pop("in_chans", None)
        text_config = {
            **text_base,
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": True,
        }
        for legacy in ("rope_scaling", "rope_theta", "layer_types"):
            text_config.pop(legacy, None)
        vision_config = {
            **vis_base,
            "model_type": "qwen2_5_vl_vision",
            **{k: val for k, val in asdict(v).items() if k not in ("rope_theta",)},
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        # The 4.x top-level text fields would shadow text_config in some readers: keep only model-level keys.
        model_keys = ("architectures", "dtype", "torch_dtype", "transformers_version")
        out = {k: val for k, val in base.items() if k in model_keys}
        out.update({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text_config,
            "vision_config": vision_config,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": True,
        })
        out.pop("torch_dtype", None)
        return out
