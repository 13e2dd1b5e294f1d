"""Reward head + pairwise loss, providers side by side (fwd / bwd / fwd+bwd, median ms, peak MiB, GB/s vs copy).

Workload (design.md peer table): packed hidden [T, H] before the final RMSNorm, P pairs = 2P scored sequences.
Providers:
  hf_eager       RMSNorm on all T tokens, head on all T tokens, gather the scored tokens, -logsigmoid (what the
                 transformers model + value head do)
  hf_compile     torch.compile of hf_eager
  gather_compile torch.compile of gather-first (norm + head on the 2P scored rows only)
  triton / cuda  vlr_kernels.fused_reward_loss (index checks off, as in a trusted training loop)
  triton_checked the same with the index checks left on (inside the forward kernels, + one torch._assert_async)
Liger-Kernel has no reward-head / pairwise-loss op, so it has no row here.
Bytes counted (the floor of the fused op): fwd reads the 2P rows; bwd reads them again and writes dL/dhidden [T, H]
(the zero fill dominates).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser, bench_device, compiled, copy_bandwidth_gbps
from vlr_kernels import fused_reward_loss, rms_norm_ref


def hf_style_loss(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps=1e-6):
    """The peers' path: every token normalised and projected, then the scored ones gathered."""
    normed = rms_norm_ref(hidden, norm_weight, eps) if norm_weight is not None else hidden
    rewards = F.linear(normed, head_weight[None], head_bias.reshape(1)).squeeze(-1).float()[scored_index]
    return -F.logsigmoid(rewards[pair_index[:, 0]] - rewards[pair_index[:, 1]]).mean()


def gather_first_loss(hidden, scored_index, pair_index, head_weight, head_bias, norm_weight, eps=1e-6):
    """Gather the scored rows first, then norm + head on those only."""
    rows = hidden[scored_index]
    rows = rms_norm_ref(rows, norm_weight, eps) if norm_weight is not None else rows
    rewards = (rows @ head_weight + head_bias.reshape(())).float()
    return -F.logsigmoid(rewards[pair_index[:, 0]] - rewards[pair_index[:, 1]]).mean()


def make_inputs(t_rows, h, pairs, dtype, device, with_norm=True):
    g = torch.Generator().manual_seed(0)
    # scored tokens = ends of 2P sequences of random length packed into T tokens
    cuts = torch.sort(torch.randperm(t_rows - 1, generator=g)[: 2 * pairs - 1] + 1).values
    scored = torch.cat([cuts - 1, torch.tensor([t_rows - 1])]).to(device)
    pair_index = torch.arange(2 * pairs, device=device).view(pairs, 2)
    hidden = torch.randn(t_rows, h, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    b = torch.zeros((), device=device, dtype=dtype).requires_grad_()
    nw = (torch.rand(h, generator=g) + 0.5).to(device, dtype).requires_grad_() if with_norm else None
    return hidden, scored, pair_index, w, b, nw


def main(argv: list[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--prenormed", action="store_true", help="hidden is already normalised: no norm_weight")
    args = p.parse_args(argv)
    device = bench_device()
    t_rows, h, pairs = (257, 80, 3) if args.quick else (args.tokens, args.hidden, args.pairs)
    dtype = getattr(torch, args.dtype)
    warmup, rep = (1, 3) if args.quick else (10, args.rep)
    hidden, scored, pair_index, w, b, nw = make_inputs(t_rows, h, pairs, dtype, device, not args.prenormed)
    x = f"T={t_rows},P={pairs},H={h}"
    elt = hidden.element_size()
    rows_bytes = 2 * pairs * h * elt
    bytes_moved = {"fwd": rows_bytes, "bwd": 2 * rows_bytes + t_rows * h * elt}
    bytes_moved["fwd+bwd"] = bytes_moved["fwd"] + bytes_moved["bwd"]
    ceiling = copy_bandwidth_gbps(device)
    rec = Recorder("reward_loss" + ("_prenormed" if args.prenormed else ""), device, args.csv)
    rec.add("copy", "ceiling", "GB/s", "1GiB" if device.type == "cuda" else "64MiB", ceiling)

    def run(fn):
        return lambda: fn(hidden, scored, pair_index, w, b, nw)

    providers = {
        "hf_eager": lambda: run(hf_style_loss),
        "hf_compile": lambda: run(compiled(hf_style_loss)),
        "gather_compile": lambda: run(compiled(gather_first_loss)),
    }
    for backend in ("triton", "cuda"):
        providers[backend] = lambda bk=backend: lambda: fused_reward_loss(
            hidden, scored, pair_index, w, b, nw, backend=bk, check_indices=False)[0]
    providers["triton_checked"] = lambda: lambda: fused_reward_loss(
        hidden, scored, pair_index, w, b, nw, backend="triton")[0]
    params = [t for t in (hidden, w, b, nw) if t is not None]
    rec.run_providers(providers, x, lambda loss: loss.backward(), params, bytes_moved, ceiling,
                      args.providers, warmup, rep)
    return rec.finish()


if __name__ == "__main__":
    main()
