"""The built-in synthetic preference set: deterministic, in the design.md pair format, needs the pixels (a model
blind to the image cannot beat chance), and comes with a loadable tiny model directory."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlr_runtime.data.synthetic import MAX_PIXELS, SyntheticSpec, ensure_synthetic

SPEC = SyntheticSpec(train_pairs=600, eval_pairs=300)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), SPEC)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_and_cached(synthetic, tmp_path):
    again = ensure_synthetic(tmp_path, SPEC)
    assert _digest(again.root) == _digest(synthetic.root)
    mtime = again.train.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, SPEC).train.stat().st_mtime_ns == mtime  # second call reuses the cache
    other = ensure_synthetic(tmp_path, SyntheticSpec(train_pairs=600, eval_pairs=300, seed=1))
    assert other.root != again.root and other.train.read_text() != again.train.read_text()


def test_rows_parse_in_the_pair_format(synthetic):
    from vlr_runtime.data.formats import read_examples
    from vlr_runtime.data.types import PairExample

    for path, n in ((synthetic.train, SPEC.train_pairs), (synthetic.eval, SPEC.eval_pairs)):
        examples = [ex for _, ex in read_examples(path)]
        assert len(examples) == n and all(isinstance(ex, PairExample) for ex in examples)
        assert all(ex.chosen != ex.rejected for ex in examples)
        assert all(p.is_file() for ex in examples for p in ex.images)
    n_text = sum(not r["images"] for r in _rows(synthetic.train))
    assert 0.08 * SPEC.train_pairs < n_text < 0.25 * SPEC.train_pairs  # text_fraction 0.15
    sizes = {Image.open(synthetic.root / r["images"][0]).size for r in _rows(synthetic.train) if r["images"]}
    assert len(sizes) > 100  # images of many sizes


def test_noise_split_mirrors_the_eval_image_pairs(synthetic):
    ev = {r["id"]: r for r in _rows(synthetic.eval) if r["images"]}
    noise = _rows(synthetic.eval_noise)
    assert [r["id"] for r in noise] == list(ev)
    for r in noise[:50]:
        orig = ev[r["id"]]
        assert (r["prompt"], r["chosen"], r["rejected"]) == (orig["prompt"], orig["chosen"], orig["rejected"])
        a, b = Image.open(synthetic.root / orig["images"][0]), Image.open(synthetic.root / r["images"][0])
        assert a.size == b.size and len(set(b.getdata())) > 0.9 * b.size[0] * b.size[1]  # noise, not shapes


def _key(row: dict) -> str:
    return " ".join(p.get("text", "<image>") for m in row["prompt"] for p in m["content"])


def _answer(row: dict, side: str) -> str:
    return row[side][0]["content"][0]["text"]


def test_a_blind_model_scores_chance(synthetic):
    """The best image-blind rule learnable from the training split (prefer the answer that was chosen more often
    for that question) stays at chance on held-out image pairs: rejected answers share the chosen distribution."""
    chosen, rejected = Counter(), Counter()
    for r in _rows(synthetic.train):
        chosen[(_key(r), _answer(r, "chosen"))] += 1
        rejected[(_key(r), _answer(r, "rejected"))] += 1

    def score(row, side):
        k = (_key(row), _answer(row, side))
        return (chosen[k] + 1) / (chosen[k] + rejected[k] + 2)

    image_rows = [r for r in _rows(synthetic.eval) if r["images"]]
    wins = sum(score(r, "chosen") > score(r, "rejected") for r in image_rows)
    ties = sum(score(r, "chosen") == score(r, "rejected") for r in image_rows)
    accuracy = (wins + 0.5 * ties) / len(image_rows)
    assert 0.38 < accuracy < 0.62, accuracy
    # The same rule does learn the text-only pairs (their answers follow from the question), so it is not vacuous.
    text_rows = [r for r in _rows(synthetic.eval) if not r["images"]]
    text_acc = sum(score(r, "chosen") > score(r, "rejected") for r in text_rows) / len(text_rows)
    assert text_acc > 0.8, text_acc


def test_model_dir_loads(synthetic):
    from transformers import AutoTokenizer, Qwen2_5_VLConfig

    from vlr_runtime.data.processor import ImageProcessorConfig, image_grid
    from vlr_runtime.model import ModelArgs

    cfg = json.loads((synthetic.model_dir / "config.json").read_text())
    hf = Qwen2_5_VLConfig(**cfg)
    tok = AutoTokenizer.from_pretrained(str(synthetic.model_dir))
    assert hf.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert hf.text_config.vocab_size >= len(tok) and hf.text_config.vocab_size % 64 == 0
    args = ModelArgs.from_hf_config(synthetic.model_dir)
    assert args.text.num_heads % 2 == 0 and args.text.num_kv_heads % 2 == 0
    text = tok.apply_chat_template(_rows(synthetic.train)[0]["prompt"], tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and "You are a helpful assistant." in text
    from safetensors.torch import load_file

    from vlr_runtime.model.hf_names import HEAD_BIAS, HEAD_WEIGHT, hf_tensor_shapes

    weights = load_file(str(synthetic.model_dir / "model.safetensors"))
    expected = {k: v for k, v in hf_tensor_shapes(args).items() if k not in (HEAD_WEIGHT, HEAD_BIAS)}
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected  # a base model: no value head
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert abs(float(q.std()) - 1 / (3 * q.shape[1]) ** 0.5) < 0.01  # PyTorch's default scale, not 0.02
    img_cfg = ImageProcessorConfig.from_model_dir(synthetic.model_dir)
    _, h, w = image_grid(160, 56, img_cfg)
    assert h * w <= MAX_PIXELS // 14**2 and h * w // 4 <= 16


def test_bad_spec():
    with pytest.raises(ValueError, match=">= 2 pairs"):
        ensure_synthetic("/nonexistent", SyntheticSpec(train_pairs=1))
    with pytest.raises(ValueError, match="text_fraction"):
        ensure_synthetic("/nonexistent", SyntheticSpec(text_fraction=1.0))
