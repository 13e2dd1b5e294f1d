"""The built-in default data: a synthetic multimodal preference set and the tiny model it trains, made at first use.

Image pairs (PIL-drawn PNGs of various sizes on a light background) ask about what is drawn:

===========  ==========================================  ===================================
kind         question                                    answers (chosen = the true one)
===========  ==========================================  ===================================
color        "What color is the circle?"                 Red. / Green. / Blue. / Yellow. / Black.
shape        "What shape is in the picture?"             A circle. / A square. / A triangle.
count        "How many shapes are there?"                One. / Two. / Three.
position     "Where is the square?"                      On the left. / On the right. / At the top. / At the bottom.
===========  ==========================================  ===================================

The rejected answer is drawn uniformly from the *other* answers of the same kind (for positions: the opposite side),
and the true answer is uniform over the kind's answers, so chosen and rejected share one marginal distribution: a model that does not look at the pixels
scores 0.5 in expectation. Text-only pairs (copying a word, naming an opposite) follow the same rule.

Files (pair JSONL of design.md, image paths relative to the file) under ``<cache>/synthetic-<version>-<hash>/``:
``train.jsonl``, ``eval.jsonl`` (held-out image + text pairs), ``eval_noise.jsonl`` (the held-out image pairs with
every image replaced by uniform noise of the same size), ``img/``, and ``model/``: a tokenizer built from the set's
texts with :func:`~vlr_runtime.data.tokenizer_builder.build_tokenizer`, a tiny Qwen2.5-VL ``config.json``, a
``preprocessor_config.json`` with small min/max pixels and initial weights ``model.safetensors`` (no value head: the
trainer initialises the head). Generation is deterministic; concurrent generators (several ranks) each write a private temporary directory and
the first atomic rename wins.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from vlr_runtime.data.tokenizer_builder import DEFAULT_SYSTEM_PROMPT, build_tokenizer, special_token_ids

VERSION = "v7"
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("One", "Two", "Three")
POSITIONS = {"left": "On the left.", "right": "On the right.", "top": "At the top.", "bottom": "At the bottom."}
OPPOSITE_SIDE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
KIND_WEIGHTS = {"color": 0.8, "shape": 0.08, "position": 0.07, "count": 0.05}
"""Share of each question kind among image pairs. Colour dominates because it is what the tiny model learns from
scratch within a 10-minute CPU run (measured: colour 1.0 held-out accuracy after 200 steps of 16 pairs while shape
and position were still at chance after 1000); the other kinds keep the images' layout in play."""
WORDS = ("apple", "river", "candle", "tiger", "pencil", "garden", "rocket", "violin", "bridge", "cloud",
         "marble", "forest", "anchor", "lemon", "castle", "mirror")
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "old": "new",
             "open": "closed", "early": "late", "happy": "sad", "full": "empty", "hard": "soft", "high": "low"}
IMAGE_SIDE_RANGE = (56, 160)
ASPECT_RANGE = (0.6, 1.6)
"""Generated image sides in pixels and height/width ratios; the processor then resizes within the model's min/max
pixels. Shapes are sized relative to the short side so they stay several patches wide after the resize."""
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112
"""Processor bounds of the tiny model: an image becomes 4 to 16 merged tokens (of 28x28 px)."""


@dataclass(kw_only=True, frozen=True)
class SyntheticSpec:
    """What to generate. Every field enters the cache key, so a change regenerates."""

    train_pairs: int = 4000
    eval_pairs: int = 400
    text_fraction: float = 0.15
    """Share of text-only pairs in both splits."""
    seed: int = 0
    """Seed of the generator (fixed by default so the data do not change with ``train.seed``)."""

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": VERSION}, sort_keys=True)
        return f"synthetic-{VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass(kw_only=True, frozen=True)
class SyntheticPaths:
    root: Path
    train: Path
    eval: Path
    eval_noise: Path
    model_dir: Path


def default_cache_dir() -> Path:
    """``$VLR_CACHE`` or ``~/.cache/vlr_runtime``."""
    return Path(os.environ.get("VLR_CACHE") or Path.home() / ".cache" / "vlr_runtime")


def _paths(root: Path) -> SyntheticPaths:
    return SyntheticPaths(root=root, train=root / "train.jsonl", eval=root / "eval.jsonl",
                          eval_noise=root / "eval_noise.jsonl", model_dir=root / "model")


def ensure_synthetic(cache_dir: str | Path | None = None, spec: SyntheticSpec = SyntheticSpec()) -> SyntheticPaths:
    """Return the paths of the synthetic set for ``spec``, generating it first if the cache does not hold it."""
    if spec.train_pairs < 2 or spec.eval_pairs < 2:
        raise ValueError(f"synthetic splits need >= 2 pairs each, got {spec.train_pairs} / {spec.eval_pairs}")
    if not 0.0 <= spec.text_fraction < 1.0:
        raise ValueError(f"text_fraction must be in [0, 1), got {spec.text_fraction}")
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    final = base / spec.key()
    if (final / "DONE").is_file():
        return _paths(final)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key()}-", dir=base))
    try:
        _generate(tmp, spec)
        (tmp / "DONE").write_text("ok\n")
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "DONE").is_file():  # lost the race to a generator that has not finished: take over
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(final)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.9), (cx - r, cy + r * 0.9)], fill=fill)


def _canvas(rng: random.Random) -> Image.Image:
    w = rng.randint(*IMAGE_SIDE_RANGE)
    h = min(max(round(w * rng.uniform(*ASPECT_RANGE)), IMAGE_SIDE_RANGE[0]), IMAGE_SIDE_RANGE[1])
    grey = rng.randint(230, 255)
    return Image.new("RGB", (w, h), (grey, grey, grey))


def _place(rng: random.Random, w: int, h: int, r: float, taken: list[tuple[float, float, float]],
           box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> tuple[float, float]:
    """A centre for a shape of radius ``r`` inside ``box`` (fractions of the image), clear of ``taken`` shapes."""
    x0, y0 = max(r + 1, box[0] * w + r), max(r + 1, box[1] * h + r)
    x1, y1 = min(w - r - 1, box[2] * w - r), min(h - r - 1, box[3] * h - r)
    for _ in range(200):
        cx, cy = rng.uniform(x0, max(x0, x1)), rng.uniform(y0, max(y0, y1))
        if all((cx - tx) ** 2 + (cy - ty) ** 2 > (r + tr + 2) ** 2 for tx, ty, tr in taken):
            return cx, cy
    raise RuntimeError("could not place a shape")  # unreachable with the radii below; kept as a loud guard


def _image_pair(rng: random.Random) -> tuple[Image.Image, str, str, str, str]:
    """One image with (kind, question, chosen, rejected) about it."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    img = _canvas(rng)
    draw = ImageDraw.Draw(img)
    w, h = img.size
    side = min(w, h)
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    if kind == "count":
        n = rng.randint(1, len(COUNT_WORDS))
        r = side * rng.uniform(0.12, 0.16)
        taken: list[tuple[float, float, float]] = []
        for _ in range(n):
            cx, cy = _place(rng, w, h, r, taken)
            taken.append((cx, cy, r))
            _draw_shape(draw, shape, cx, cy, r, COLORS[color])
        question = rng.choice(["How many shapes are there?", f"How many {shape}s are in the image?"])
        answers, truth = [f"{c}." for c in COUNT_WORDS], f"{COUNT_WORDS[n - 1]}."
    elif kind == "position":
        where = rng.choice(list(POSITIONS))
        box = {"left": (0, 1 / 3, 0.4, 2 / 3), "right": (0.6, 1 / 3, 1, 2 / 3),
               "top": (1 / 3, 0, 2 / 3, 0.4), "bottom": (1 / 3, 0.6, 2 / 3, 1)}[where]
        r = side * rng.uniform(0.13, 0.18)
        cx, cy = _place(rng, w, h, r, [], box)
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
        question = rng.choice([f"Where is the {shape}?", f"Where is the {color} shape?"])
        # The wrong answer is the opposite side (left/right, top/bottom): still uniform over the four positions.
        answers, truth = [POSITIONS[OPPOSITE_SIDE[where]], POSITIONS[where]], POSITIONS[where]
    else:
        r = side * rng.uniform(0.2, 0.35)
        cx, cy = _place(rng, w, h, r, [])
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
        if kind == "color":
            question = rng.choice([f"What color is the {shape}?", "What color is the shape?"])
            answers, truth = [f"{c.capitalize()}." for c in COLORS], f"{color.capitalize()}."
        else:
            question = rng.choice(["What shape is in the picture?", f"Which shape is drawn in {color}?"])
            answers, truth = [f"A {s}." for s in SHAPES], f"A {shape}."
    wrong = rng.choice([a for a in answers if a != truth])
    return img, kind, question, truth, wrong


def _text_pair(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        word = rng.choice(WORDS)
        other = rng.choice([x for x in WORDS if x != word])
        return rng.choice([f"Repeat the word: {word}", f"Say '{word}' once."]), f"{word}.", f"{other}."
    pairs = list(OPPOSITES.items()) + [(b, a) for a, b in OPPOSITES.items()]
    word, opposite = rng.choice(pairs)
    wrong = rng.choice([b for a, b in pairs if b != opposite])
    return f"What is the opposite of {word}?", f"{opposite.capitalize()}.", f"{wrong.capitalize()}."


def _row(pair_id: str, kind: str, question: str, chosen: str, rejected: str, image: str | None) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return {
        "id": pair_id,
        "images": [image] if image else [],
        "prompt": [{"role": "user", "content": content}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        "margin": 0.0,
        "category": kind,
    }


def _write_split(root: Path, name: str, n: int, spec: SyntheticSpec, rng: random.Random,
                 noise_rng: np.random.Generator | None) -> list[str]:
    """Write ``<name>.jsonl`` (and ``<name>_noise.jsonl`` when ``noise_rng``); return the texts for the tokenizer."""
    texts: list[str] = []
    rows, noise_rows = [], []
    for i in range(n):
        pair_id = f"{name}-{i:05d}"
        if rng.random() < spec.text_fraction:
            question, chosen, rejected = _text_pair(rng)
            rows.append(_row(pair_id, "text", question, chosen, rejected, None))
        else:
            img, kind, question, chosen, rejected = _image_pair(rng)
            rel = f"img/{pair_id}.png"
            img.save(root / rel)
            rows.append(_row(pair_id, kind, question, chosen, rejected, rel))
            if noise_rng is not None:
                noise = noise_rng.integers(0, 256, size=(img.size[1], img.size[0], 3), dtype=np.uint8)
                noise_rel = f"img/{pair_id}-noise.png"
                Image.fromarray(noise, "RGB").save(root / noise_rel)
                noise_rows.append(_row(pair_id, kind, question, chosen, rejected, noise_rel))
        texts += [question, chosen, rejected]
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if noise_rng is not None:
        (root / f"{name}_noise.jsonl").write_text("".join(json.dumps(r) + "\n" for r in noise_rows))
    return texts


def tiny_model_config(tokens: dict[str, int], vocab_size: int) -> dict:
    """HF ``config.json`` of the tiny default model (transformers 5 layout).

    Sizes are chosen for a 2-core CPU run with TP=2: every head count, the vocabulary and the MLP widths divide by 2
    (and by 4, so TP=4 also works); the vision window (112 px) covers a whole image (at most 112x112 after resizing),
    and block 1 attends over the full image so both code paths run.
    """
    hidden, heads = 128, 4
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": tokens["<|image_pad|>"],
        "video_token_id": tokens["<|video_pad|>"],
        "vision_start_token_id": tokens["<|vision_start|>"],
        "vision_end_token_id": tokens["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "bos_token_id": tokens["<|endoftext|>"],
            "eos_token_id": tokens["<|im_end|>"],
            "pad_token_id": tokens["<|endoftext|>"],
        },
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
            "hidden_act": "silu",
            "initializer_range": 0.02,
        },
    }


def tiny_preprocessor_config() -> dict:
    """``preprocessor_config.json`` of the tiny model: Qwen2.5-VL's processor settings with small pixel bounds."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def _generate(root: Path, spec: SyntheticSpec) -> None:
    (root / "img").mkdir()
    rng = random.Random(spec.seed)
    texts = _write_split(root, "train", spec.train_pairs, spec, rng, None)
    # The held-out split continues the same stream (no overlap by construction of ids, fresh random draws) and its
    # noise images come from an independent generator so they do not depend on how many draws the drawing used.
    texts += _write_split(root, "eval", spec.eval_pairs, spec, rng, np.random.default_rng(spec.seed + 1))
    model_dir = root / "model"
    texts.append(DEFAULT_SYSTEM_PROMPT)
    build_tokenizer(model_dir, texts, vocab_size=512, min_frequency=2)
    tokens = special_token_ids(model_dir)
    vocab = max(tokens.values()) + 1
    vocab = -(-vocab // 64) * 64  # a multiple of 64 so the vocabulary splits evenly over TP ranks
    (model_dir / "config.json").write_text(json.dumps(tiny_model_config(tokens, vocab), indent=2))
    (model_dir / "preprocessor_config.json").write_text(json.dumps(tiny_preprocessor_config(), indent=2))
    save_file(tiny_initial_weights(model_dir, spec.seed), str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})


def tiny_initial_weights(model_dir: Path, seed: int) -> dict:
    """Initial weights of the tiny model in HF names, with PyTorch's default scales: linear weights
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, embeddings ``N(0, 1)``, norms 1, biases 0; no value head.

    Why not the HF/megatron ``N(0, 0.02)``: that scale suits widths in the thousands; at width 128 it leaves the
    attention logits ~0 and the reward flat for hundreds of steps (measured: the held-out accuracy stayed at chance
    for ~300 steps of 16 pairs), which a 10-minute CPU run cannot afford.
    """
    import torch

    from vlr_runtime.model.args import ModelArgs
    from vlr_runtime.model.hf_names import HEAD_BIAS, HEAD_WEIGHT, hf_tensor_shapes

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(hf_tensor_shapes(ModelArgs.from_hf_config(model_dir)).items()):
        if name in (HEAD_WEIGHT, HEAD_BIAS):
            continue
        if name.endswith("embed_tokens.weight"):
            out[name] = torch.randn(shape, generator=gen)
        elif len(shape) >= 2:
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
            out[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        elif name.endswith(".bias"):
            out[name] = torch.zeros(shape)
        else:
            out[name] = torch.ones(shape)
    return out
