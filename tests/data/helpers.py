"""Small builders shared by the data tests: a tokenizer + preprocessor model directory and image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.fixtures.tiny_hf import CORPUS, PREPROCESSOR_CONFIG
from vlr_runtime.data.tokenizer_builder import build_tokenizer


def make_model_dir(out: Path, **processor_overrides: int) -> Path:
    """Tokenizer + chat template + preprocessor_config.json (no weights: the data path needs none)."""
    build_tokenizer(out, CORPUS, vocab_size=320, min_frequency=2)
    (out / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR_CONFIG, **processor_overrides}))
    return out


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").convert(mode).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair_row(rid: str, images: list[str], chosen: str = "The square is red.", rejected: str = "It is blue.") -> dict:
    return {
        "id": rid,
        "images": images,
        "prompt": [{"role": "user", "content": [{"type": "image"} for _ in images] + [
            {"type": "text", "text": "What color is the square?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
    }
