"""Qwen2.5-VL image preprocessing: ``smart_resize`` + rescale + normalize + patchify, reproducing transformers'
``Qwen2VLImageProcessorPil`` (the PIL implementation) bit for bit: bicubic PIL resize of the uint8 RGB image,
``uint8 -> float64 * rescale_factor -> float32``, ``(x - mean) / std`` in float32, then the block-major patch layout
(every ``merge x merge`` block of patches contiguous; each patch row is ``C x temporal x patch x patch`` with the
single frame repeated ``temporal`` times).

Settings come from the model directory's ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlr_runtime.data.errors import DataError
from vlr_runtime.data.types import ProcessedImage

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, kw_only=True)
class ImageProcessorConfig:
    """The settings of ``Qwen2VLImageProcessor`` that change its output."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = _CLIP_MEAN
    image_std: tuple[float, float, float] = _CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    """PIL resampling filter (transformers' ``resample``; Qwen2.5-VL uses bicubic)."""

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ImageProcessorConfig:
        """Read ``preprocessor_config.json`` (``min_pixels``/``max_pixels`` win over ``size``, as in transformers)."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the model directory must carry its image processor settings")
        cfg = json.loads(path.read_text())
        size = cfg.get("size") or {}
        kw: dict = {
            "min_pixels": cfg.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            "max_pixels": cfg.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
        }
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample"):
            if cfg.get(key) is not None:
                kw[key] = cfg[key]
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                kw[key] = tuple(float(v) for v in cfg[key])
        if cfg.get("do_resize") is False or cfg.get("do_rescale") is False or cfg.get("do_normalize") is False:
            raise ValueError(f"{path}: do_resize/do_rescale/do_normalize = false is not supported")
        return cls(**kw)


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, ``min_pixels <= h*w <= max_pixels``, aspect ratio kept as
    closely as possible (same arithmetic as transformers, so the same rounding)."""
    if max(height, width) / min(height, width) > 200:
        raise DataError("image_aspect_ratio", f"{width}x{height} has an aspect ratio above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """(t, h, w) patch grid an image of this size gets, without touching its pixels (for cost estimates)."""
    h, w = smart_resize(height, width, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def process_image(image: Image.Image, cfg: ImageProcessorConfig) -> ProcessedImage:
    """An RGB PIL image -> ``pixel_values [h*w, 3*temporal*patch*patch]`` float32 and ``grid_thw (1, h, w)``."""
    if image.mode != "RGB":
        raise ValueError(f"process_image expects an RGB image (decode with images.decode_image), got {image.mode}")
    width, height = image.size
    new_h, new_w = smart_resize(height, width, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling(cfg.resample)))
    pixels = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    pixels = (pixels - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = new_h // p, new_w // p
    # HWC -> (gh/m, gw/m, m, m, C, p, p): block-major patch order, channel-first inside a patch.
    blocks = pixels.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    patches = torch.from_numpy(np.ascontiguousarray(blocks)).reshape(gh * gw, 3, 1, p, p)
    pixel_values = patches.expand(gh * gw, 3, tp, p, p).reshape(gh * gw, 3 * tp * p * p)
    return ProcessedImage(pixel_values=pixel_values.contiguous(), grid_thw=(1, gh, gw))
