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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bad_inputs(root: Path) -> tuple[Path, dict[str, str]]:
    """A JSONL file mixing good rows with one row per kind of bad input; returns (file, {row id: expected reason}).

    Good rows have ids starting with ``good``."""
    import struct
    import zlib

    img = root / "img"
    img.mkdir()
    write_image(img / "ok.png", 61, 45)
    write_image(img / "ok2.jpg", 30, 90, seed=3)
    full = (img / "ok.png").read_bytes()
    (img / "truncated.png").write_bytes(full[: len(full) // 2])
    (img / "zero.png").write_bytes(b"")
    (img / "text.png").write_text("this is not an image\n")
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    (img / "bomb.png").write_bytes(bomb)
    write_image(img / "strip.png", 600, 2)
    rows: list[dict | str] = []
    expected: dict[str, str] = {}

    def add(row: dict | str, reason: str | None) -> None:
        rows.append(row)
        if reason:
            expected[row["id"] if isinstance(row, dict) else f"data.jsonl:{len(rows)}"] = reason

    add(pair_row("good-1", ["img/ok.png"]), None)
    add(pair_row("truncated", ["img/truncated.png"]), "image_unreadable")
    add(pair_row("zero-byte", ["img/zero.png"]), "image_unreadable")
    add(pair_row("not-image", ["img/text.png"]), "image_unreadable")
    add(pair_row("bomb", ["img/bomb.png"]), "image_bomb")
    add(pair_row("good-2", ["img/ok2.jpg", "img/ok.png"]), None)
    add(pair_row("aspect", ["img/strip.png"]), "image_aspect_ratio")
    no_rej = pair_row("no-rejected", ["img/ok.png"])
    del no_rej["rejected"]
    add(no_rej, "missing_field")
    add(pair_row("empty-response", [], rejected="   "), "empty_field")
    more = pair_row("more-placeholders", ["img/ok.png"])
    more["prompt"][0]["content"].insert(0, {"type": "image"})
    add(more, "placeholder_mismatch")
    add(pair_row("over-length", [], chosen="The square is red. " * 200), "over_length")
    add(pair_row("missing-file", ["img/nope.png"]), "image_missing")
    add("{not json", "bad_json")
    add(pair_row("good-3", []), None)
    add({"id": "good-4", "prompt": "What is in <image>?", "chosen": "A cat.", "rejected": "A dog.",
         "images": ["img/ok2.jpg"], "margin": 1.0}, None)
    return write_jsonl(root / "data.jsonl", rows), expected
