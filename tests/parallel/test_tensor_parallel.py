"""TP=2 in two processes (gloo): same scores as stock transformers, same gradients as TP=1 for every parameter,
and an export from TP=2 shards identical to the checkpoint it was loaded from."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.model.conftest import GRIDS
from tests.model.hf_reference import hf_scores, make_sample, pack, write_tiny_checkpoint
from tests.parallel.helpers import spawn
from vlr_runtime.data.types import PackedBatch

pytestmark = pytest.mark.slow
TIMEOUT_S = 240


def _inputs():
    gen = torch.Generator().manual_seed(7)
    pixels = [torch.randn(t * h * w, 1176, generator=gen) for t, h, w in GRIDS]
    samples = [make_sample([5, 7], [0], GRIDS, gen), make_sample([3, 4, 6], [1, 0], GRIDS, gen),
               make_sample([9], [], GRIDS, gen), make_sample([2, 11], [0], GRIDS, gen)]
    return samples, pixels


def full_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as full HF-shaped tensors (TP shards gathered), via the export gather."""
    from vlr_runtime.checkpoint.hf import iter_full_tensors

    saved = {n: p.data for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data = p.grad
    try:
        return dict(iter_full_tensors(model))
    finally:
        for n, p in model.named_parameters():
            p.data = saved[n]


BATCH_FIELDS = ("input_ids", "position_ids", "cu_seqlens", "scored_index", "pair_index", "pixel_values",
                "image_grid_thw", "image_index")


def save_batch(batch: PackedBatch, path: str) -> None:
    save_file({k: getattr(batch, k).contiguous() for k in BATCH_FIELDS}, path)


def load_batch(path: str) -> PackedBatch:
    t = load_file(path)
    lens = t["cu_seqlens"][1:] - t["cu_seqlens"][:-1]
    return PackedBatch(max_seqlen=int(lens.max()), **t)


def run_model(model_dir, batch: PackedBatch, out_dir=None, sequence_parallel: bool = False):
    """Load, score, loss + backward; returns (rewards, loss, grads, model) and exports to out_dir when given."""
    from vlr_runtime.checkpoint.hf import export_hf_checkpoint, load_hf_checkpoint
    from vlr_runtime.model import ModelArgs, build_reward_model

    model = build_reward_model(ModelArgs.from_hf_config(model_dir), device="cpu", seed=None,
                               sequence_parallel=sequence_parallel)
    assert model.language.sequence_parallel == (sequence_parallel and model.tp > 1)
    load_hf_checkpoint(model, model_dir)
    vision_width = model.args.vision.intermediate_size
    assert model.vision.tp == (model.tp if vision_width % model.tp == 0 else 1)
    params = dict(model.named_parameters())
    split = model.tp > 1
    assert params["language.layers.0.attn.qkv.weight"].tensor_model_parallel is split
    assert params["language.final_norm.weight"].tensor_model_parallel is False
    assert params["vision.blocks.0.attn.qkv.bias"].tensor_model_parallel is (split and model.vision.tp > 1)
    rewards = model.rewards(batch)
    loss, _, _ = model.loss(batch, center_coef=0.1)
    loss.backward()
    grads = full_grads(model)
    if out_dir is not None:
        export_hf_checkpoint(model, model.args, out_dir)
    return rewards, loss.detach(), grads, model


def frozen_encoder_run(model, batch: PackedBatch) -> dict[str, torch.Tensor]:
    """Patch embedding + blocks frozen (merger trainable): with a replicated vision tower the TP ranks split the
    images. Returns rewards, loss, the merger's weight gradient and the patches this rank encoded."""
    for p in [model.vision.patch_embed, *model.vision.blocks.parameters()]:
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    encoded = []
    encode = model.vision.encode
    model.vision.encode = lambda pv, grid: (encoded.append(pv.shape[0]), encode(pv, grid))[1]
    loss, rewards, _ = model.loss(batch, center_coef=0.1)
    loss.backward()
    return {"rewards": rewards.detach(), "loss": loss.detach().reshape(1), "encoded": torch.tensor(encoded),
            "merger_grad": model.vision.merger.fc1.weight.grad}


CASES = {"split": 48, "replicated_vision": 45, "sequence_parallel": 48}
"""Vision MLP widths: 48 divides by TP=2 (every layer sharded); 45 does not, so the vision tower runs replicated on
each TP rank while the decoder is sharded (the 3420-wide Qwen2.5-VL vision MLP at TP=8). ``sequence_parallel``:
the decoder additionally shards its tokens (an odd token count, so the padding path runs too)."""


def pipeline_run(model_dir, microbatches, export_dir=None):
    """Load, one forward_backward step over the microbatches; returns (results, {param: grad}, model)."""
    from vlr_runtime.checkpoint.hf import export_hf_checkpoint, load_hf_checkpoint
    from vlr_runtime.model import ModelArgs, build_reward_model
    from vlr_runtime.parallel.pipeline import forward_backward

    model = build_reward_model(ModelArgs.from_hf_config(model_dir), device="cpu", seed=None)
    load_hf_checkpoint(model, model_dir)
    results = forward_backward(model, microbatches, center_coef=0.1)
    grads = {n: p.grad for n, p in model.named_parameters()}
    if export_dir is not None:
        export_hf_checkpoint(model, model.args, export_dir)
    return results, grads, model


def _pipeline_worker(rank: int, root: str) -> None:
    """Second part of the worker: the same two processes as two pipeline stages (tp=1, pp=2)."""
    from vlr_runtime.parallel import setup_distributed, teardown

    ctx = setup_distributed(tp=1, pp=2)
    assert (ctx.pp, ctx.pp_rank, ctx.tp) == (2, rank, 1)
    micro = [load_batch(f"{root}/micro_{i}.safetensors") for i in range(2)]
    results, grads, model = pipeline_run(f"{root}/split/ckpt", micro, f"{root}/pipeline_export")
    layers = sorted(model.language.layers)
    assert layers == (["0"] if rank == 0 else ["1"]), layers
    assert (model.vision is not None, model.head is not None) == (rank == 0, rank == 1)
    out = {f"loss_{i}": r.loss.reshape(1) for i, r in enumerate(results)}
    out.update({f"rewards_{i}": r.rewards for i, r in enumerate(results)})
    save_file(out, f"{root}/pipeline_result_{rank}.safetensors")
    save_file({n: g.contiguous() for n, g in grads.items()}, f"{root}/pipeline_grads_{rank}.safetensors")
    teardown()


def _worker(rank: int, root: Path) -> None:
    """Run by :func:`tests.parallel.helpers.spawn` in each of the two processes (env and error files set there)."""
    from vlr_kernels import set_default_backend

    from vlr_runtime.parallel import setup_distributed, teardown

    world = int(os.environ["WORLD_SIZE"])
    set_default_backend("torch")
    ctx = setup_distributed(tp=world)
    assert (ctx.tp, ctx.tp_rank, ctx.backend) == (world, rank, "gloo")
    for case in CASES:
        out_dir = f"{root}/{case}"
        # The batch comes from the parent so that the workers never import transformers (start-up time).
        batch = load_batch(f"{root}/batch.safetensors")
        rewards, loss, grads, model = run_model(f"{out_dir}/ckpt", batch, f"{out_dir}/export",
                                                sequence_parallel=case == "sequence_parallel")
        with torch.no_grad():
            hidden = model(batch)
        frozen = frozen_encoder_run(model, batch)
        if rank == 0:
            save_file({"rewards": rewards, "loss": loss.reshape(1), "hidden": hidden},
                      f"{out_dir}/result.safetensors")
            save_file({k: v.contiguous() for k, v in grads.items()}, f"{out_dir}/grads.safetensors")
            save_file(frozen, f"{out_dir}/frozen.safetensors")
    teardown()
    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
    _pipeline_worker(rank, root)


def test_tp2_matches_transformers_and_tp1(tmp_path):
    from vlr_kernels import set_default_backend

    from vlr_runtime.parallel import setup_distributed, teardown

    samples, pixels = _inputs()
    refs = {}
    for case, width in CASES.items():
        hf, w, b = write_tiny_checkpoint(tmp_path / case / "ckpt", seed=11, vision_intermediate=width)
        refs[case] = hf_scores(hf, samples, pixels, GRIDS, w, b)
    batch = pack(hf, samples, pixels, GRIDS)  # positions depend on the grids only, not on the weights
    assert batch.num_tokens % 2 == 1  # sequence parallelism at TP=2 has to pad
    save_batch(batch, str(tmp_path / "batch.safetensors"))
    micro = [pack(hf, samples[:2], pixels, GRIDS), pack(hf, samples[2:], pixels, GRIDS)]
    for i, mb in enumerate(micro):
        save_batch(mb, str(tmp_path / f"micro_{i}.safetensors"))
    spawn(_worker, 2, tmp_path, TIMEOUT_S)

    set_default_backend("torch")
    setup_distributed(1)
    try:
        for case in CASES:
            d = tmp_path / case
            result = load_file(str(d / "result.safetensors"))
            ref = refs[case]
            assert float(((result["rewards"].double() - ref).abs() / ref.abs()).max()) <= 1e-4, case

            exported = load_file(str(d / "export" / "model.safetensors"))
            original = load_file(str(d / "ckpt" / "model.safetensors"))
            original.pop("lm_head.weight")
            assert exported.keys() == original.keys()
            for k, v in original.items():
                assert torch.equal(exported[k], v), (case, k)

            _, loss1, grads1, model1 = run_model(d / "ckpt", batch)
            assert torch.allclose(result["loss"], loss1.reshape(1), rtol=1e-5), case
            with torch.no_grad():
                hidden1 = model1(batch)
            assert torch.allclose(result["hidden"], hidden1, rtol=1e-4, atol=1e-5 * float(hidden1.abs().max())), case
            grads2 = load_file(str(d / "grads.safetensors"))
            assert grads2.keys() == grads1.keys()
            for k, g in grads1.items():
                assert torch.allclose(grads2[k], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), (case, k)

            frozen1, frozen2 = frozen_encoder_run(model1, batch), load_file(str(d / "frozen.safetensors"))
            # Image split (replicated tower): rank 0 encodes only image 0 (60 of the 240 patches); sharded tower:
            # every rank runs all of them.
            assert frozen2["encoded"].tolist() == ([60] if case == "replicated_vision" else [240]), case
            assert torch.allclose(frozen2["rewards"], frozen1["rewards"], rtol=1e-4), case
            assert torch.allclose(frozen2["loss"], frozen1["loss"], rtol=1e-5), case
            g1 = frozen1["merger_grad"]
            if case == "replicated_vision":  # the merger is replicated: its whole gradient lives on rank 0
                assert torch.allclose(frozen2["merger_grad"], g1, rtol=1e-4, atol=1e-6 * float(g1.abs().max()))
        check_pipeline(tmp_path, micro, refs["split"])
    finally:
        teardown()
        set_default_backend(None)


def check_pipeline(root, micro, ref) -> None:
    """pp=2 vs the same step at pp=1 (in this process): losses, rewards, every gradient, and the export."""
    from safetensors import safe_open

    results1, grads1, _ = pipeline_run(root / "split" / "ckpt", micro)
    assert torch.allclose(torch.cat([r.rewards for r in results1]).double(), ref, rtol=1e-4)
    for rank in range(2):
        result = load_file(str(root / f"pipeline_result_{rank}.safetensors"))  # identical on both stages
        for i, r in enumerate(results1):
            assert torch.allclose(result[f"loss_{i}"], r.loss.reshape(1), rtol=1e-5), (rank, i)
            assert torch.allclose(result[f"rewards_{i}"], r.rewards, rtol=1e-4), (rank, i)
    stage_grads = {}
    for rank in range(2):
        stage_grads.update(load_file(str(root / f"pipeline_grads_{rank}.safetensors")))
    assert stage_grads.keys() == grads1.keys()
    for name, g in grads1.items():
        assert torch.allclose(stage_grads[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), name
    original = load_file(str(root / "split" / "ckpt" / "model.safetensors"))
    original.pop("lm_head.weight")
    with safe_open(str(root / "pipeline_export" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(original)
        for k, v in original.items():
            assert torch.equal(f.get_tensor(k), v), k
