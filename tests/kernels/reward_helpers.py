"""Inputs for the reward-loss tests and the sequence-parallel worker. Kept free of heavy imports (no transformers):
the worker module is re-imported by every spawned process."""

from __future__ import annotations

import os

import torch
from vlr_kernels import fused_reward_loss, gather_scored_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reward_inputs(t_rows, h, s, pairs, dtype, norm, margin, bias_shape=(), seed=0, device: str = DEV):
    """``hidden [T, H]``, ``scored_index [S]`` (random distinct rows), ``pair_index [P, 2]``, head weight/bias,
    norm weight (or None) and margin (or None); floating tensors are leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t_rows, h, generator=g).to(device, dtype).requires_grad_()
    scored = torch.randperm(t_rows, generator=g)[:s].to(device)
    pair_index = torch.tensor(pairs, dtype=torch.int64, device=device)
    w = (torch.randn(h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    b = torch.randn(bias_shape, generator=g).to(device, dtype).requires_grad_()
    nw = (torch.rand(h, generator=g) + 0.5).to(device, dtype).requires_grad_() if norm else None
    m = torch.randn(len(pairs), generator=g).to(device) if margin else None
    return hidden, scored, pair_index, w, b, nw, m


def sp_worker(rank: int, world: int, port: int, result_path: str) -> None:
    """One rank of the sequence-parallel test: holds a slice of the tokens, gathers the scored rows, runs the loss
    and saves its loss and gradients for the parent to compare with a single-process run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    hidden, scored, pairs, w, b, nw, m = reward_inputs(
        23, 40, 6, [[0, 1], [2, 3], [4, 5], [0, 3]], torch.float64, True, True, device="cpu"
    )
    bounds = [0, 9, 23]  # an uneven split of the 23 tokens
    local = hidden.detach()[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()
    rows = gather_scored_rows(local, scored, bounds[rank])
    loss, _, _ = fused_reward_loss(rows, torch.arange(6), pairs, w, b, nw, 1e-6, m, 0.1, backend="torch")
    loss.backward()
    torch.save({"loss": loss.detach(), "dlocal": local.grad, "dw": w.grad, "dg": nw.grad}, f"{result_path}.{rank}")
    torch.distributed.destroy_process_group()
