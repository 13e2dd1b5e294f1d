"""megatron-core's pipeline schedules over packed variable-length microbatches (gloo, CPU): 1F1B at pp=2 and the
interleaved schedule at pp=2 x 2 virtual stages give pp=1's losses, rewards and every gradient (and forward_only its
losses without touching gradients); with megatron DDP + distributed optimizer, pp=2 x 2 virtual stages and TP2 x PP2
(4 processes, with and without sequence parallelism) give TP1's losses and parameters after 3 AdamW steps."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from tests.parallel.helpers import (
    CLIP,
    MICROBATCHES,
    build,
    global_batch,
    load_tensors,
    reference_run,
    rel_err,
    save_tensors,
    spawn,
    train_megatron,
)
from vlr_runtime.model import ModelArgs

pytestmark = pytest.mark.slow


def four_layer_args() -> ModelArgs:
    """The tiny model with 4 decoder layers: one per stage at pp=2 x 2 virtual stages."""
    tiny = ModelArgs.tiny()
    return ModelArgs.tiny(text=dataclasses.replace(tiny.text, num_layers=4))


def stage_full_tensors(model) -> dict[str, torch.Tensor]:
    """HF-named full tensors of this pipeline stage's parameters (TP shards all-gathered: collective over TP).

    Not ``iter_full_tensors``: at TP > 1 with PP > 1 it makes every TP rank of the first stage wait for tensors that
    only TP rank 0 of the other stages sends (it hangs at TP2 x PP2)."""
    from vlr_runtime.checkpoint.hf import full_tensors
    from vlr_runtime.model.hf_names import hf_param_specs

    owned = {name for name, _ in model.named_parameters()}
    return {name: t for spec in hf_param_specs(model.args) if spec.param in owned
            for name, t in full_tensors(model, spec, None)}


def _run_and_save(model, root: Path, tag: str, rank: int) -> None:
    from vlr_runtime.parallel import forward_backward

    chunks = model if isinstance(model, list) else [model]
    results = forward_backward(model, global_batch(four_layer_args(), MICROBATCHES), center_coef=0.1)
    out = {f"loss_{i}": r.loss.reshape(1) for i, r in enumerate(results)}
    out.update({f"rewards_{i}": r.rewards for i, r in enumerate(results)})
    save_tensors(out, root / f"{tag}_result_{rank}.safetensors")
    save_tensors({n: p.grad for c in chunks for n, p in c.named_parameters()}, root / f"{tag}_grads_{rank}.safetensors")


def _schedules_worker(rank: int, root: Path) -> None:
    from vlr_runtime.parallel import setup_distributed, teardown

    args = four_layer_args()
    setup_distributed(tp=1, pp=2)
    model = build(args, freeze_vision=False)
    assert sorted(model.language.layers) == (["0", "1"] if rank == 0 else ["2", "3"])
    _run_and_save(model, root, "1f1b", rank)
    teardown()
    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
    setup_distributed(tp=1, pp=2, vpp=2)
    chunks = [build(args, freeze_vision=False, vp_stage=v) for v in range(2)]
    # Global stage v * pp + rank holds layer v * pp + rank; vision on stage 0, head on stage 3.
    assert [sorted(c.language.layers) for c in chunks] == [[str(rank)], [str(2 + rank)]]
    assert [c.vision is not None for c in chunks] == [rank == 0, False]
    assert [c.head is not None for c in chunks] == [False, rank == 1]
    _run_and_save(chunks, root, "interleaved", rank)
    _check_forward_only(chunks, root)
    chunks = [build(args, vp_stage=v) for v in range(2)]
    _train_and_save(chunks, root, f"interleaved_{rank}")
    teardown()


def _check_forward_only(chunks, root: Path) -> None:
    """Eval through the interleaved schedule: the losses of the training pass, no gradient written."""
    from vlr_runtime.parallel import forward_backward, get_context

    before = {n: p.grad.clone() for c in chunks for n, p in c.named_parameters()}
    results = forward_backward(chunks, global_batch(four_layer_args(), MICROBATCHES), center_coef=0.1,
                               forward_only=True)
    trained = load_tensors(root / f"interleaved_result_{get_context().rank}.safetensors")
    for i, r in enumerate(results):
        assert torch.allclose(r.loss.reshape(1), trained[f"loss_{i}"], rtol=1e-6), i
    for c in chunks:
        for n, p in c.named_parameters():
            assert torch.equal(p.grad, before[n]), n


def _train_and_save(model, root: Path, tag: str) -> None:
    """3 steps of megatron DDP + distributed optimizer; losses from every rank, parameters from TP rank 0."""
    from vlr_runtime.parallel import get_context

    args = four_layer_args()
    losses, norms = train_megatron(model, lambda step: global_batch(args, MICROBATCHES, step),
                                   distributed_optimizer=True)
    chunks = model if isinstance(model, list) else [model]
    full = {name: t for chunk in chunks for name, t in stage_full_tensors(chunk).items()}
    if get_context().tp_rank == 0:
        save_tensors(full, root / f"params_{tag}.safetensors")
    save_tensors({"loss": torch.tensor(losses), "norm": torch.tensor(norms)}, root / f"losses_{tag}.safetensors")


def reference_step(args: ModelArgs) -> tuple[list, dict[str, torch.Tensor]]:
    from vlr_runtime.parallel import forward_backward, setup_distributed, teardown

    setup_distributed(1)
    try:
        model = build(args, freeze_vision=False)
        results = forward_backward(model, global_batch(args, MICROBATCHES), center_coef=0.1)
        return results, {n: p.grad for n, p in model.named_parameters()}
    finally:
        teardown()


@pytest.fixture(scope="module")
def schedules_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("schedules")
    spawn(_schedules_worker, 2, root)
    return root


def test_1f1b_and_interleaved_match_pp1(schedules_run):
    results, grads = reference_step(four_layer_args())
    for tag in ("1f1b", "interleaved"):
        stage_grads = {}
        for rank in range(2):
            got = load_tensors(schedules_run / f"{tag}_result_{rank}.safetensors")  # broadcast: the same on every stage
            for i, r in enumerate(results):
                assert torch.allclose(got[f"loss_{i}"], r.loss.reshape(1), rtol=1e-5, atol=0), (tag, rank, i)
                assert torch.allclose(got[f"rewards_{i}"], r.rewards, rtol=1e-5, atol=1e-6), (tag, rank, i)
            rank_grads = load_tensors(schedules_run / f"{tag}_grads_{rank}.safetensors")
            assert not rank_grads.keys() & stage_grads.keys()
            stage_grads.update(rank_grads)
        assert stage_grads.keys() == grads.keys(), tag
        for name, g in grads.items():
            assert float(g.abs().max()) > 0, name
            assert rel_err(stage_grads[name], g) <= 1e-5, (tag, name, rel_err(stage_grads[name], g))


def _tp2_pp2_worker(rank: int, root: Path) -> None:
    from vlr_runtime.parallel import setup_distributed, teardown

    ctx = setup_distributed(tp=2, pp=2)
    assert (ctx.tp, ctx.pp, ctx.dp) == (2, 2, 1)
    _train_and_save(build(four_layer_args()), root, f"stage{ctx.pp_rank}_tp{ctx.tp_rank}")
    model = build(four_layer_args(), sequence_parallel=True)
    assert model.language.sequence_parallel
    _train_and_save(model, root, f"sp_stage{ctx.pp_rank}_tp{ctx.tp_rank}")
    teardown()


def check_training(root: Path, loss_tags: list[str], param_tags: list[str], reference) -> None:
    """Losses and grad norms of every rank, and the parameters gathered from the stages, against the TP1 run."""
    losses, norms, params = reference
    assert (norms > CLIP).all(), norms
    for tag in loss_tags:
        got = load_tensors(root / f"losses_{tag}.safetensors")
        assert torch.allclose(got["loss"], losses, rtol=1e-5, atol=0), (tag, got["loss"], losses)
        assert torch.allclose(got["norm"], norms, rtol=1e-5, atol=0), (tag, got["norm"], norms)
    got_params: dict[str, torch.Tensor] = {}
    for tag in param_tags:
        stage = load_tensors(root / f"params_{tag}.safetensors")
        assert not got_params.keys() & stage.keys()
        got_params.update(stage)
    assert got_params.keys() == params.keys()
    for name, ref in params.items():
        assert rel_err(got_params[name], ref) <= 1e-5, (name, rel_err(got_params[name], ref))


@pytest.fixture(scope="module")
def tp1_training():
    return reference_run(four_layer_args(), stage_full_tensors)


def test_interleaved_training_matches_tp1(schedules_run, tp1_training):
    check_training(schedules_run, ["interleaved_0", "interleaved_1"], ["interleaved_0", "interleaved_1"],
                   tp1_training)


def test_tp2_pp2_training_matches_tp1(tmp_path, tp1_training):
    spawn(_tp2_pp2_worker, 4, tmp_path, timeout_s=300)
    for sp in ("", "sp_"):  # without and with sequence parallelism (odd token counts: the padding path runs)
        tags = [f"{sp}stage{s}_tp{t}" for s in range(2) for t in range(2)]
        check_training(tmp_path, tags, [f"{sp}stage0_tp0", f"{sp}stage1_tp0"], tp1_training)
