"""Shared pieces of the multi-process parallel tests: tiny packed pair batches built without transformers, the
training recipe compared across layouts (megatron DDP + optimizer vs a single-process torch AdamW reference), and a
spawn-and-join runner that can never hang (one deadline for all workers; the first dead worker stops the rest and
its traceback fails the test)."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.ports import free_port
from vlr_runtime.data.types import PackedBatch
from vlr_runtime.model import ModelArgs

STEPS, MICROBATCHES = 3, 4
ADAMW = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-6}
"""eps 1e-6, not 1e-8: the attention key bias has an exactly-zero gradient (softmax ignores a per-row constant), so
its computed gradient is round-off (~1e-9) whose sign and size depend on the reduction order; with eps 1e-8 AdamW
turns that noise into lr-sized, order-dependent updates (1e-4 relative between two correct runs)."""
CLIP = 0.5
"""Below the tiny model's gradient norm (the tests assert it), so clipping is active on every step."""

GRID = (1, 4, 6)
"""One image of 4x6 patches (6 merged tokens) per pair, shared by chosen and rejected."""


def tiny_pair_batch(args: ModelArgs, seed: int, text_lens: list[tuple[int, int]]) -> PackedBatch:
    """Pairs ``(chosen_len, rejected_len)`` of text tokens, each sequence ``[text | image | text]`` with its pair's
    image (encoded once, used twice). Positions are plain per-sequence counters on all three M-RoPE streams:
    parity between parallel layouts does not need HF's image positions."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = GRID
    image_tokens = t * h * w // args.vision.spatial_merge_size**2
    ids, cu, scored = [], [0], []
    for lens in text_lens:
        for n in lens:
            text = torch.randint(0, args.image_token_id, (n,), generator=gen)
            seq = torch.cat([text[: n // 2], torch.full((image_tokens,), args.image_token_id), text[n // 2:]])
            ids.append(seq)
            cu.append(cu[-1] + seq.numel())
            scored.append(cu[-1] - 1)
    lengths = torch.tensor(cu[1:]) - torch.tensor(cu[:-1])
    positions = torch.cat([torch.arange(int(n)) for n in lengths]).expand(3, -1).contiguous()
    pairs = len(text_lens)
    return PackedBatch(
        input_ids=torch.cat(ids), position_ids=positions, cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=int(lengths.max()), scored_index=torch.tensor(scored),
        pair_index=torch.arange(2 * pairs).view(pairs, 2),
        pixel_values=torch.randn(pairs * t * h * w, args.vision.patch_dim, generator=gen),
        image_grid_thw=torch.tensor([GRID] * pairs), image_index=torch.arange(pairs).repeat_interleave(2),
        sample_ids=[f"s{seed}_{i}" for i in range(pairs)],
    )


def global_batch(args: ModelArgs, microbatches: int, step: int = 0) -> list[PackedBatch]:
    """``microbatches`` batches of 1-2 pairs of differing lengths, odd and even totals (new tokens every step)."""
    out = []
    for i in range(microbatches):
        lens = [(3 + i, 5 + 2 * i)] if i % 2 else [(5, 4 + i), (7, 2 + i)]
        out.append(tiny_pair_batch(args, 100 * step + i, lens))
    return out


def freeze_vision_encoder(model) -> None:
    """Freeze the patch embedding and blocks (the usual recipe; the merger stays trainable)."""
    for p in model.param_groups()["vision"]:
        p.requires_grad_(False)


def build(args: ModelArgs, *, freeze_vision: bool = True, vp_stage: int | None = None,
          sequence_parallel: bool = False):
    """The reward model (this rank's stage/chunk) with the seeded init shared by every layout, eager kernels."""
    from vlr_kernels import set_default_backend

    from vlr_runtime.model import build_reward_model

    set_default_backend("torch")
    model = build_reward_model(args, seed=0, vp_stage=vp_stage, sequence_parallel=sequence_parallel)
    if freeze_vision and model.vision is not None:
        freeze_vision_encoder(model)
    return model


def train_megatron(model, batches_of_step, *, distributed_optimizer: bool) -> tuple[list[float], list[float]]:
    """:data:`STEPS` steps through megatron DDP + optimizer (:data:`ADAMW`, :data:`CLIP`) of ``model`` (a stage or
    the list of virtual stage chunks); ``batches_of_step(step)`` gives this rank's microbatches. Returns (loss averaged over microbatches and DP ranks, grad norm) per step."""
    import torch.distributed as dist

    from vlr_runtime.parallel import forward_backward, get_context
    from vlr_runtime.parallel.optimizer import step_if_finite, wrap_ddp_and_optimizer

    ddp, optimizer = wrap_ddp_and_optimizer(model, clip_grad=CLIP, distributed_optimizer=distributed_optimizer,
                                            **ADAMW)
    chunks = ddp if isinstance(ddp, list) else [ddp]
    ctx = get_context()
    losses, norms = [], []
    for step in range(STEPS):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        results = forward_backward(ddp, batches_of_step(step))
        for chunk in chunks:
            chunk.finish_grad_sync()
        stepped, grad_norm = step_if_finite(optimizer)
        assert stepped
        loss = torch.stack([r.loss for r in results]).mean()
        dist.all_reduce(loss, group=ctx.dp_group)
        losses.append(float(loss) / ctx.dp)
        norms.append(float(grad_norm))
    return losses, norms


def reference_run(args: ModelArgs, collect) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The same training at TP=1, PP=1 in this process with plain ``torch.optim.AdamW`` (decay on matrices only) and
    torch's norm clipping over all :data:`MICROBATCHES`: ``(losses [STEPS], grad norms [STEPS], collect(model))``."""
    from vlr_runtime.parallel import forward_backward, setup_distributed, teardown

    setup_distributed(1)
    try:
        model = build(args)
        params = [p for p in model.parameters() if p.requires_grad]
        wd = ADAMW["weight_decay"]
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])
        losses, norms = [], []
        for step in range(STEPS):
            opt.zero_grad()
            results = forward_backward(model, global_batch(args, MICROBATCHES, step))
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
            opt.step()
            losses.append(float(torch.stack([r.loss for r in results]).mean()))
        return torch.tensor(losses), torch.tensor(norms), collect(model)
    finally:
        teardown()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` (0 when both are zero). Per tensor, not per element: entries whose gradient is a
    near-cancelling sum carry fp32 round-off of the reduction order into AdamW's normalised update."""
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _entry(rank: int, world: int, port: int, root: str, target, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    try:
        target(rank, Path(root), **kwargs)
    except BaseException:
        Path(root, f"error_{rank}.txt").write_text(traceback.format_exc())
        raise


def spawn(target, world: int, root: Path, timeout_s: float = 240, **kwargs) -> None:
    """Run ``target(rank, root, **kwargs)`` in ``world`` spawned processes (torchrun-style env, gloo). Fails with
    the first worker traceback as soon as any worker dies (the others are killed then: a peer blocked in a
    collective would otherwise wait out its timeout), or when the workers outlive one shared ``timeout_s``."""
    ctx = mp.get_context("spawn")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_entry, args=(r, world, port, str(root), target, kwargs)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    while (any(p.is_alive() for p in procs) and time.monotonic() < deadline
           and not any(p.exitcode not in (None, 0) for p in procs)):
        time.sleep(0.2)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    errors = sorted(root.glob("error_*.txt"))
    assert not errors, errors[0].read_text()
    died = {r: p.exitcode for r, p in enumerate(procs) if r not in hung and p.exitcode != 0}
    assert not died, f"workers exited with codes {died}"
    assert not hung, f"workers {hung} still running after {timeout_s} s"
