"""Test helpers: tiny random Qwen2.5-VL checkpoints written by stock transformers, and the independent reference
score (stock transformers' last-token post-norm hidden state x value head), plus packing of the same inputs into a
PackedBatch for our model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlr_runtime.data.types import PackedBatch

IMAGE_TOKEN = 120
TINY_TEXT = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
TINY_VISION = {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
                   "fullatt_block_indexes": [1]}


def hf_config(vision_intermediate: int = 48, **overrides):
    from transformers import Qwen2_5_VLConfig

    vision = dict(TINY_VISION, intermediate_size=vision_intermediate)
    kw = {"text_config": dict(TINY_TEXT), "vision_config": vision, "image_token_id": IMAGE_TOKEN,
              "video_token_id": 121, "vision_start_token_id": 122, "vision_end_token_id": 123}
    kw.update(overrides)
    return Qwen2_5_VLConfig(**kw)


def write_tiny_checkpoint(out_dir: Path, *, seed: int = 0, head: str = "value_head", vision_intermediate: int = 48):
    """Random tiny HF model saved with save_pretrained (+ value head). Returns (hf_model, head_w [H], head_b [1])."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(vision_intermediate)).eval()
    with torch.no_grad():  # non-trivial norm weights and biases so that every parameter is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    h = model.config.text_config.hidden_size
    w, b = torch.randn(1, h) * 0.3, torch.randn(1) * 0.1
    if head == "value_head":
        save_file({"v_head.summary.weight": w, "v_head.summary.bias": b}, str(out_dir / "value_head.safetensors"))
    elif head == "score":
        _add_tensors(out_dir, {"score.weight": w, "score.bias": b})
    return model, w.view(-1), b


def _add_tensors(out_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    path = out_dir / "model.safetensors"
    data = load_file(str(path))
    data.update(tensors)
    save_file(data, str(path), metadata={"format": "pt"})


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L]
    images: list[int]        # indices into the shared image list, one per placeholder group


def make_sample(text_lens: list[int], images: list[int], grids: list[tuple[int, int, int]], gen: torch.Generator) -> Sample:
    """text_lens[k] random text tokens, then image images[k]'s placeholder tokens, ..., then text_lens[-1] tokens."""
    pieces = []
    for k, n in enumerate(text_lens):
        pieces.append(torch.randint(0, 110, (n,), generator=gen))
        if k < len(images):
            t, h, w = grids[images[k]]
            pieces.append(torch.cat([torch.tensor([122]), torch.full((t * h * w // 4,), IMAGE_TOKEN), torch.tensor([123])]))
    return Sample(torch.cat(pieces), list(images))


def hf_scores(model, samples: list[Sample], pixels: list[torch.Tensor], grids, head_w, head_b) -> torch.Tensor:
    """Reference: stock transformers, one sequence at a time, last-token post-norm hidden x head -> [S] float64."""
    dev = next(model.parameters()).device
    out = []
    for s in samples:
        kw = {}
        if s.images:
            kw = {"pixel_values": torch.cat([pixels[i] for i in s.images]).to(dev),
                      "image_grid_thw": torch.tensor([grids[i] for i in s.images], device=dev)}
        ids = s.input_ids[None].to(dev)
        with torch.no_grad():
            hidden = model.model(input_ids=ids, mm_token_type_ids=(ids == IMAGE_TOKEN).int(), **kw).last_hidden_state
        last = hidden[0, -1].double()
        out.append(last @ head_w.double().to(last.device) + head_b.double().to(last.device))
    return torch.stack(out).view(-1)


def hf_positions(model, s: Sample, grids) -> torch.Tensor:
    """[3, L] M-RoPE positions of one sequence from transformers' own get_rope_index."""
    ids = s.input_ids[None]
    if not s.images:
        return torch.arange(ids.shape[1]).expand(3, -1)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE_TOKEN).int(),
                                        image_grid_thw=torch.tensor([grids[i] for i in s.images]))
    return pos[:, 0]


def pack(model, samples: list[Sample], pixels: list[torch.Tensor], grids) -> PackedBatch:
    """All samples in one PackedBatch; every image once in pixel_values, image_index per placeholder group."""
    lens = torch.tensor([s.input_ids.numel() for s in samples])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    groups = [i for s in samples for i in s.images]
    used = sorted(set(groups))
    remap = {img: k for k, img in enumerate(used)}
    return PackedBatch(
        input_ids=torch.cat([s.input_ids for s in samples]),
        position_ids=torch.cat([hf_positions(model, s, grids) for s in samples], dim=1).contiguous(),
        cu_seqlens=cu.to(torch.int32),
        max_seqlen=int(lens.max()),
        scored_index=cu[1:] - 1,
        pair_index=torch.arange(len(samples) // 2 * 2).view(-1, 2),
        pixel_values=torch.cat([pixels[i] for i in used]) if used else None,
        image_grid_thw=torch.tensor([grids[i] for i in used]) if used else None,
        image_index=torch.tensor([remap[i] for i in groups], dtype=torch.long) if used else None,
        sample_ids=[str(i) for i in range(len(samples))],
    )


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))
