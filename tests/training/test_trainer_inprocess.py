"""The trainer in one process (world size 1): a NaN/Inf step stops before the optimizer touches anything, and a run
resumed from its checkpoint continues exactly like an uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.training.helpers import run_args
from vlr_runtime.config import parse_args


@pytest.fixture
def single_process(monkeypatch):
    from vlr_kernels import set_default_backend

    from vlr_runtime.parallel import teardown

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    teardown()
    yield
    teardown()
    set_default_backend(None)  # the trainer sets the process-wide kernel backend from its config


def _train_rows(run_dir: Path) -> list[dict]:
    """The training-step lines of a run's metrics.jsonl (evaluation lines carry a ``split``)."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "split" not in x]


def _trainer(tmp, *extra):
    from vlr_runtime.training import Trainer

    return Trainer(parse_args(run_args(tmp, "--parallel.tp", "1", "--train.eval_interval", "0", *extra)))


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, single_process):
    from vlr_runtime.training import TrainingDiverged

    trainer = _trainer(tmp_path, "--run.dir", str(tmp_path / "run"), "--train.max_steps", "5")
    trainer.metrics.write(trainer._train_step())  # one healthy step: the optimizer has state from here on
    with torch.no_grad():
        trainer.model.head.bias.fill_(float("inf"))  # r_c - r_r = inf - inf = NaN
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    adam_steps = [float(s["step"]) for s in trainer.optimizer.optimizer.state.values()]
    with pytest.raises(TrainingDiverged, match=r"step 2: non-finite loss on rank\(s\) \[0\], non-finite gradients "
                                               r"on rank\(s\) \[0\]; batch ids on rank 0: \['"):
        trainer.train()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]) or (n == "head.bias"), n
    assert [float(s["step"]) for s in trainer.optimizer.optimizer.state.values()] == adam_steps
    assert all(p.grad is None for p in trainer.trainable)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1]  # the failed step is reported by the exception, not as a metrics row
    assert not (tmp_path / "run" / "export").exists()


def test_non_finite_gradient_with_a_finite_loss_stops_too(tmp_path, single_process):
    """An Inf in one gradient element (the loss itself finite) is caught by the per-tensor norms as well."""
    from vlr_runtime.training import TrainingDiverged

    trainer = _trainer(tmp_path, "--run.dir", str(tmp_path / "run"), "--train.max_steps", "5")

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[3] = float("inf")
        return grad

    trainer.model.head.weight.register_hook(poison)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(TrainingDiverged, match=r"step 1: non-finite loss on rank\(s\) \[\], non-finite gradients "
                                               r"on rank\(s\) \[0\]"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_resume_continues_like_an_uninterrupted_run(tmp_path, single_process):
    from vlr_runtime.parallel import teardown

    # all 6 steps are inside the 20-step warm-up, so stopping the first run at 4 does not change its schedule
    common = ("--train.max_steps", "6", "--optim.warmup_steps", "20", "--checkpoint.export", "false")
    straight = _trainer(tmp_path, "--run.dir", str(tmp_path / "a"), *common)
    straight.train()
    reference = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    teardown()

    first = _trainer(tmp_path, "--run.dir", str(tmp_path / "b"), "--checkpoint.interval", "2", *common)
    first.total_steps = 4  # stop early, as a killed job would after its step-4 checkpoint
    first.train()
    teardown()
    resumed = _trainer(tmp_path, "--run.dir", str(tmp_path / "b"), "--checkpoint.interval", "2", *common)
    assert resumed.step == 4
    resumed.train()
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, reference[n]), n
    assert [r["loss"] for r in _train_rows(tmp_path / "b")] == [r["loss"] for r in _train_rows(tmp_path / "a")]


def test_shared_prompt_layout_trains_like_the_plain_one(tmp_path, single_process):
    """``--data.shared_prompt`` packs a pair as [prompt | chosen | rejected]; the loss and every gradient equal
    those of the plain layout (two full sequences) on the same pairs."""
    from vlr_runtime.data.collate import collate
    from vlr_runtime.data.formats import read_examples

    trainer = _trainer(tmp_path, "--run.dir", str(tmp_path / "run"))
    pre = trainer.preprocessor
    train_file = next((tmp_path / "cache").glob("synthetic-*")) / "train.jsonl"
    examples = [pre(ex) for _, ex in list(read_examples(train_file))[:6]]
    results = []
    for shared in (False, True):
        batch = collate(examples, image_token_id=pre.image_token_id, shared_prompt=shared)
        stats = trainer.compute_gradients([(batch, len(examples))], global_pairs=len(examples))
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        trainer.optimizer.zero_grad()
        results.append((batch.num_tokens, stats, grads))
    (plain_tokens, plain, plain_grads), (shared_tokens, shared, shared_grads) = results
    assert shared_tokens < 0.75 * plain_tokens  # the prompt (and its image tokens) is stored once
    assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert shared["margin"] == pytest.approx(plain["margin"], rel=1e-4, abs=1e-7)
    assert plain_grads.keys() == shared_grads.keys()
    for n, g in plain_grads.items():
        # a different attention layout sums in a different order: fp32 noise, not the 1e-5 of equal layouts
        assert float((shared_grads[n] - g).norm() / g.norm().clamp_min(1e-30)) <= 1e-4, n


def test_export_hf_of_the_latest_checkpoint_without_training(tmp_path, single_process):
    from safetensors.torch import load_file

    from vlr_runtime.parallel import teardown
    from vlr_runtime.train import main

    run = tmp_path / "run"
    common = ("--checkpoint.interval", "2", "--train.max_steps", "2")
    _trainer(tmp_path, "--run.dir", str(run), *common).train()  # exports its final (= step-2) model to run/export
    teardown()
    assert main(["--export-hf", str(tmp_path / "out"), "--run.dir", str(run), "--log.progress", "false",
                 "--data.validate", "false"]) == 0
    for name in ("model.safetensors", "value_head.safetensors"):
        got, ref = load_file(str(tmp_path / "out" / name)), load_file(str(run / "export" / name))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name
    assert [r["step"] for r in _train_rows(run)] == [1, 2]  # no training step was added
    assert main(["--export-hf", str(tmp_path / "out2"), "--run.dir", str(tmp_path / "empty"),
                 "--parallel.tp", "1"] + run_args(tmp_path)) == 2  # no checkpoint there: a clear config error


def test_full_tensors_carry_bf16_masters_and_adam_state_across_optimizers(tmp_path, single_process):
    """The layout-independent checkpoint content of a bf16 run (parameters, fp32 masters, Adam moments and step
    counts) survives MasterAdamW -> megatron's distributed optimizer -> MasterAdamW resumes bit for bit, and the
    last resumed trainer takes a finite step (its optimizer state is usable where it lives)."""
    from vlr_runtime.parallel import get_context, teardown
    from vlr_runtime.training.reshard import canonical_tensors

    def content(trainer) -> dict[str, torch.Tensor]:
        ctx = get_context()
        return canonical_tensors(trainer.chunks, trainer.optimizer, tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank,
                                 dp_group=ctx.dp_group)

    run = ("--run.dir", str(tmp_path / "run"), "--checkpoint.interval", "2", "--train.max_steps", "2",
           "--model.dtype", "bfloat16", "--checkpoint.export", "false")
    first = _trainer(tmp_path, *run)
    first.train()
    saved = content(first)
    assert any(k.startswith("full.master.") for k in saved) and any(k.startswith("full.exp_avg.") for k in saved)
    assert {float(v) for k, v in saved.items() if k.startswith("full.step.")} == {2.0}
    teardown()
    distributed = _trainer(tmp_path, *run, "--parallel.distributed_optimizer", "true")
    assert distributed.step == 2
    got = content(distributed)
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    distributed._save_checkpoint()  # the same step again, now written by the distributed optimizer
    teardown()
    last = _trainer(tmp_path, *run, "--train.max_steps", "3")
    got = content(last)
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    last.train()
    rows = _train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)


def test_distributed_optimizer_checkpoint_without_full_tensors(tmp_path, single_process):
    """``checkpoint.full_tensors false``: each rank writes only its own state (the distributed optimizer's ranges);
    a resume on the same layout continues exactly like the uninterrupted run, one with the other optimizer (another
    layout) is refused naming the setting."""
    from safetensors.torch import load_file

    from vlr_runtime.config import ConfigError
    from vlr_runtime.parallel import teardown

    common = ("--train.max_steps", "4", "--optim.warmup_steps", "20", "--checkpoint.export", "false",
              "--parallel.distributed_optimizer", "true")
    straight = _trainer(tmp_path, "--run.dir", str(tmp_path / "a"), *common)
    straight.train()
    reference = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    teardown()

    run = ("--run.dir", str(tmp_path / "b"), "--checkpoint.interval", "2", "--checkpoint.full_tensors", "false")
    first = _trainer(tmp_path, *run, *common)
    first.total_steps = 2  # stop after the step-2 checkpoint, as a killed job would
    first.train()
    teardown()
    saved = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000002" / "tensors-rank00000.safetensors"))
    assert not any(k.startswith("full.") for k in saved) and any(k.startswith("dist.exp_avg.") for k in saved)
    resumed = _trainer(tmp_path, *run, *common)
    assert resumed.step == 2
    resumed.train()
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, reference[n]), n
    assert [r["loss"] for r in _train_rows(tmp_path / "b")] == [r["loss"] for r in _train_rows(tmp_path / "a")]
    teardown()
    with pytest.raises(ConfigError, match=r"written with checkpoint.full_tensors false and resumes only on its own"):
        _trainer(tmp_path, *run, *common, "--parallel.distributed_optimizer", "false")


def test_launch_tuner_choices_are_kept_for_a_resumed_run(tmp_path, single_process, monkeypatch):
    """What the tuner picked during a step is saved per rank in the run directory and loaded by the next trainer on
    it, so a resumed run launches the same kernel configurations (on the CPU nothing is tuned: the pick is faked)."""
    from vlr_kernels import _tune

    from vlr_runtime.parallel import teardown
    from vlr_runtime.training.trainer import Trainer

    monkeypatch.setattr(_tune, "_PICKED", {})
    monkeypatch.setattr(_tune, "_LOADED", {})
    real_step = Trainer._train_step

    def step_that_tunes(self):
        _tune._PICKED[("some_kernel", 3584)] = {"BLOCK": 64, "num_warps": 8}
        return real_step(self)

    monkeypatch.setattr(Trainer, "_train_step", step_that_tunes)
    common = ("--run.dir", str(tmp_path / "run"), "--train.max_steps", "1", "--checkpoint.export", "false")
    _trainer(tmp_path, *common).train()
    teardown()
    saved = tmp_path / "run" / "tuning" / "rank00000.json"
    assert json.loads(saved.read_text())["choices"] == {"('some_kernel', 3584)": {"BLOCK": 64, "num_warps": 8}}

    monkeypatch.setattr(Trainer, "_train_step", real_step)
    monkeypatch.setattr(_tune, "_PICKED", {})
    _trainer(tmp_path, *common)
    teardown()
    cands = [{"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 8}]
    assert _tune.pick(("some_kernel", 3584), cands, lambda c: None, torch.device("cpu")) == cands[1]
