"""Independent references from stock transformers (Qwen2.5-VL) for the data-index tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

IMAGE_TOKEN_ID = 151655
VISION_START_ID = 151652
VISION_END_ID = 151653


def hf_rope_index(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int = IMAGE_TOKEN_ID
) -> torch.Tensor:
    """transformers' ``get_rope_index`` for one sequence ``[L]`` -> ``[3, L]``."""
    cfg = Qwen2_5_VLConfig()
    fake = SimpleNamespace(
        config=cfg, get_vision_position_ids=lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(None, *a, **k)
    )
    ids = input_ids.reshape(1, -1)
    mm = (ids == image_token_id).to(torch.int32)
    pos, _ = Qwen2_5_VLModel.get_rope_index(fake, ids, mm, image_grid_thw=image_grid_thw)
    return pos[:, 0]


def hf_window_index(grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=112, patch_size=14)


def hf_vision_position_ids(grid_thw: torch.Tensor) -> torch.Tensor:
    return get_vision_position_ids(grid_thw, 2)
