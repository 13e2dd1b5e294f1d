"""Shared pieces of the multi-process parallel tests: tiny packed pair batches built without transformers, and a
spawn-and-join runner that can never hang (every worker has a deadline; a worker's traceback fails the test)."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vlr_runtime.data.types import PackedBatch
from vlr_runtime.model import ModelArgs

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
    """``microbatches`` batches of 1-2 pairs with odd, differing lengths (a different set for every step)."""
    out = []
    for i in range(microbatches):
        lens = [(3 + i, 6 + 2 * i)] if i % 2 else [(5, 4 + i), (7, 2 + i)]
        out.append(tiny_pair_batch(args, 100 * step + i, lens))
    return out


def freeze_vision_encoder(model) -> None:
    """Freeze the patch embedding and blocks (the usual recipe; the merger stays trainable)."""
    for p in model.param_groups()["vision"]:
        p.requires_grad_(False)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """Run ``target(rank, root, **kwargs)`` in ``world`` spawned processes (torchrun-style env, gloo); fail with the
    first worker traceback, or when a worker exits non-zero or outlives ``timeout_s`` (it is then killed)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, str(root), target, kwargs)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = sorted(root.glob("error_*.txt"))
    assert not errors, errors[0].read_text()
    assert not hung, f"workers {hung} still running after {timeout_s} s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
