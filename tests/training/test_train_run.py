"""``torchrun --nproc-per-node 2 -m vlr_runtime.train`` end to end on a tiny synthetic set: TP=2 and DP=2 runs finish,
the loss goes down, metrics.jsonl and config.yaml hold what design.md promises, a frozen group is bit-identical
after training, and the exported model scores the held-out pairs with ``python -m vlr_runtime.score`` to the
accuracy the trainer reported."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.helpers import run_args, subprocess_env, torchrun
from vlr_runtime.config import parse_args, to_dict
from vlr_runtime.training.metrics import TRAIN_KEYS

pytestmark = pytest.mark.slow
TIMEOUT_S = 300
STEPS = 60


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2")
    args = run_args(tmp, "--run.dir", str(tmp / "run"), "--train.max_steps", str(STEPS), "--train.eval_interval",
                    "30", "--optim.lr", "3e-3", "--optim.warmup_steps", "5", "--model.freeze", "vision")
    proc = subprocess.run(torchrun(2) + args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, args, proc


def _lines(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") != "eval"], [r for r in rows if r.get("split") == "eval"]


def test_metrics_and_config(tp2_run):
    tmp, args, proc = tp2_run
    train, evals = _lines(tmp / "run")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(set(TRAIN_KEYS) <= r.keys() for r in train)
    assert all(r["pairs"] == 8 and r["tokens_per_s"] > 0 and r["images_per_s"] >= 0 for r in train)
    assert [r["step"] for r in evals] == [30, STEPS]
    for r in evals:
        assert {"accuracy", "loss", "margin", "accuracy_image", "accuracy_noise"} <= r.keys()
        assert 0.0 <= r["accuracy"] <= 1.0
    assert re.search(r"held-out accuracy: image pairs \d\.\d{4}", proc.stdout)
    assert proc.stdout.count("rows: 32  ok: 32  rejected: 0") == 1  # the validation pass, printed by rank 0
    saved = parse_args(["--config", str(tmp / "run" / "config.yaml")])
    assert to_dict(saved) == to_dict(parse_args(args))


def test_loss_decreases(tp2_run):
    train, _ = _lines(tp2_run[0] / "run")
    first = sum(r["loss"] for r in train[:10]) / 10
    last = sum(r["loss"] for r in train[-10:]) / 10
    assert last < first - 0.1, (first, last)


def test_frozen_group_bit_identical_and_others_trained(tp2_run):
    """The vision tower was frozen: its exported tensors equal the initial weights of the model directory exactly;
    the LLM's moved."""
    tmp = tp2_run[0]
    exported = load_file(str(tmp / "run" / "export" / "model.safetensors"))
    initial = load_file(str(next((tmp / "cache").glob("synthetic-*")) / "model" / "model.safetensors"))
    vision = [n for n in initial if n.startswith("visual.") and not n.startswith("visual.merger")]
    llm = [n for n in initial if n.startswith("model.layers.")]
    assert vision and llm
    for name in vision:
        assert torch.equal(exported[name], initial[name]), name
    moved = [n for n in llm if not torch.equal(exported[n], initial[n])]
    assert len(moved) > 0.9 * len(llm)


def test_export_scores_like_the_trainer(tp2_run):
    tmp = tp2_run[0]
    _, evals = _lines(tmp / "run")
    data = next((tmp / "cache").glob("synthetic-*")) / "eval.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "vlr_runtime.score", "--model", str(tmp / "run" / "export"), "--data", str(data),
         "--out", str(tmp / "scores.jsonl")],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp / "scores.jsonl").read_text().splitlines()]
    assert all("error" not in r for r in rows)
    accuracy = sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(evals[-1]["accuracy"], abs=1e-9)


def test_data_parallel_run_on_user_files_with_a_bad_row(tmp_path):
    """``--parallel.tp 1`` with two processes (data parallel) on user files: a row whose image is missing is
    reported by the validation pass and skipped, the run logs every step, evaluates the user's eval file and
    exports."""
    from tests.training.helpers import TINY_EVAL_PAIRS, TINY_TRAIN_PAIRS
    from vlr_runtime.data.synthetic import SyntheticSpec, ensure_synthetic

    syn = ensure_synthetic(tmp_path / "cache", SyntheticSpec(train_pairs=TINY_TRAIN_PAIRS, eval_pairs=TINY_EVAL_PAIRS))
    rows = syn.train.read_text().splitlines()
    broken = json.loads(next(r for r in rows if json.loads(r)["images"]))
    broken.update(id="broken", images=["img/does-not-exist.png"])
    train = syn.root / "user_train.jsonl"
    train.write_text("\n".join(rows + [json.dumps(broken)]) + "\n")
    args = run_args(tmp_path, "--run.dir", str(tmp_path / "run"), "--parallel.tp", "1", "--train.max_steps", "4",
                    "--train.eval_interval", "0", "--data.train", str(train), "--data.eval", str(syn.eval))
    proc = subprocess.run(torchrun(2) + args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tp=1 pp=1 dp=2" in proc.stdout
    assert re.search(r"rejected +1 +image_missing", proc.stdout)
    train_lines, evals = _lines(tmp_path / "run")
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4] and all(r["pairs"] <= 8 for r in train_lines)
    assert len(evals) == 1 and evals[0]["pairs"] == TINY_EVAL_PAIRS and "accuracy_noise" not in evals[0]
    assert (tmp_path / "run" / "export" / "value_head.safetensors").is_file()
