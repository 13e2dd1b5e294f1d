"""``RewardScorer``: the same scores as the CLI and as stock transformers, on the other model-directory layout
(``score.weight`` head in sharded weights, released flat config.json, chat_template.json); PIL inputs, batching,
and every bad input with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.fixtures.score_rows import write_score_rows
from tests.fixtures.tiny_hf import ReferenceScorer, build_tiny_model_dir
from vlr_runtime.data.errors import DataError
from vlr_runtime.parallel import teardown
from vlr_runtime.score import main
from vlr_runtime.scorer import RewardScorer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # Under pytest TRITON_INTERPRET=1 is set, which would route every op through the (slow) Triton interpreter;
    # the kernels have their own tests, here the eager references run.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLR_KERNEL_BACKEND", "torch")
        root = tmp_path_factory.mktemp("scorer")
        model_dir = build_tiny_model_dir(root / "model", head="score", shard_size="300KB", legacy_config=True,
                                         chat_template_file="json")
        data, expected = write_score_rows(root / "data")
        out = root / "cli.jsonl"
        assert main(["--model", str(model_dir), "--data", str(data), "--out", str(out)]) == 0
        cli = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        scorer = RewardScorer(model_dir, batch_tokens=400)
        yield model_dir, expected, cli, scorer
        teardown()


def scored_rows(expected):
    return [e for e in expected if e.error is None]


def test_scorer_equals_cli_and_transformers(env):
    model_dir, expected, cli, scorer = env
    assert scorer.head_source == "score"
    convs, images, want = [], [], []
    for e in scored_rows(expected):
        row = cli[e.id]
        want += [row["chosen_score"], row["rejected_score"]] if e.is_pair else row["scores"]
        convs += e.conversations
        images += [e.images] * len(e.conversations)
    got = scorer.score(convs, images)
    assert got.dtype == torch.float32 and got.shape == (len(want),)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    ref = ReferenceScorer(model_dir)
    expected_ref = torch.tensor([ref.score(c, i) for c, i in zip(convs, images)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected_ref, rtol=1e-4, atol=1e-6)


def test_pil_images_and_batch_budget(env):
    _, expected, _, scorer = env
    rows = [e for e in scored_rows(expected) if e.images][:3]
    convs = [e.conversations[0] for e in rows]
    by_path = scorer.score(convs, [e.images for e in rows])
    by_pil = scorer.score(convs, [[Image.open(p) for p in e.images] for e in rows])
    torch.testing.assert_close(by_pil, by_path, rtol=0, atol=0)
    budget = scorer.batch_tokens
    try:
        scorer.batch_tokens = 1  # every conversation alone in its batch
        torch.testing.assert_close(scorer.score(convs, [e.images for e in rows]), by_path, rtol=1e-5, atol=1e-6)
    finally:
        scorer.batch_tokens = budget
    # String conversations and text-only calls without an images argument.
    assert scorer.score(["Count the apples.", [{"role": "user", "content": "Hi"}]]).shape == (2,)
    assert scorer.score([]).shape == (0,)


def test_bad_inputs(env, tmp_path):
    model_dir, expected, _, scorer = env
    with_image = next(e for e in scored_rows(expected) if len(e.images) == 1)
    text_only = next(e for e in scored_rows(expected) if not e.images)
    with pytest.raises(DataError, match="conversation 1: .*placeholder"):
        scorer.score([text_only.conversations[0], with_image.conversations[0]], [[], []])
    with pytest.raises(DataError, match="image_missing: conversation 0"):
        scorer.score([with_image.conversations[0]], [[tmp_path / "nope.png"]])
    with pytest.raises(ValueError, match="2 conversations but 1 image lists"):
        scorer.score([text_only.conversations[0]] * 2, [[]])
    with pytest.raises(TypeError, match="path or a PIL image"):
        scorer.score([with_image.conversations[0]], [[123]])
    with pytest.raises(DataError, match="bad_field"):
        scorer.score([[{"content": "no role"}]])
    with pytest.raises(ValueError, match="dtype"):
        RewardScorer(model_dir, dtype="int8")
    with pytest.raises(ValueError, match="batch_tokens"):
        RewardScorer(model_dir, batch_tokens=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        RewardScorer(tmp_path)
    headless = build_tiny_model_dir(tmp_path / "headless", head="none")
    with pytest.raises(ValueError, match="no reward head"):
        RewardScorer(headless)
