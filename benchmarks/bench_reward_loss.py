"""Reward head + pairwise loss, providers side by side (fwd / bwd / fwd+bwd, median ms, peak MiB, GB/s vs copy).

Workload (design.md peer table): packed hidden [T, H] before the final RMSNorm, P pairs = 2P scored sequences.
Providers:
  hf_eager       RMSNorm on all T tokens, head on all T tokens, gather the scored tokens, -logsigmoid (what the
                 transformers model + value head do)
  hf_compile     torch.compile of hf_eager
  gather_compile torch.compile of gather-first (norm + head on the 2P scored rows only)
  triton / cuda  vlr_kernels.fused_reward_loss (index checks off, as in a trusted training loop)
  triton_checked the same with the index checks left on (inside the forward kernels, + one torch._assert_async)
  triton_zero_fwd triton with VLR_REWARD_ZERO_IN_FORWARD=1: the forward allocates dL/dhidden and its row kernel's
                 launch zeroes it; the backward runs only the scored columns (its fwd rows include that write)
  triton_zero_stream  VLR_REWARD_ZERO_IN_FORWARD=stream: the unscored rows' zeros run on a side stream from the
                 forward, joined at the end of the backward; timed as fwd+bwd only (a forward alone leaves the side
                 stream running - its fwd/bwd split would be meaningless - and cannot be captured alone)
Our providers run with that variable set for the call (1 / stream for those two, 0 for the others, whatever the shell
has): setting it costs the host-launched rows a few microseconds, the graph rows nothing.
Liger-Kernel has no reward-head / pairwise-loss op, so it has no row here.
Before timing, each of our providers' loss and gradients are checked against float64 (relative error norm within a
dtype bound) and triton_zero_fwd / triton_zero_stream against triton bit for bit; a provider that fails is reported as skipped, not timed.
Bytes counted (the floor of the fused op): fwd reads the 2P rows; bwd reads them again and writes dL/dhidden [T, H]
(the zero fill dominates).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser, bench_device, compiled, copy_bandwidth_gbps, training_modes, want
from vlr_kernels import fused_reward_loss, fused_reward_loss_ref, rms_norm_ref
from vlr_kernels.reward_loss import ZERO_IN_FORWARD_ENV

OURS = ("triton", "cuda", "triton_checked", "triton_zero_fwd", "triton_zero_stream")
ZERO_MODES = {"triton_zero_fwd": "1", "triton_zero_stream": "stream"}  # VLR_REWARD_ZERO_IN_FORWARD; others "0"
FWD_BWD_ONLY = ("triton_zero_stream",)
# relative error norm of the loss and each gradient vs float64: a few units of the dtype's rounding
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


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


def zero_in_forward(fn: Callable[[], torch.Tensor], value: str) -> Callable[[], torch.Tensor]:
    """``fn`` run with ``VLR_REWARD_ZERO_IN_FORWARD`` set to ``value`` (fused_reward_loss reads it at each call),
    the previous value restored afterwards."""

    def run() -> torch.Tensor:
        old = os.environ.get(ZERO_IN_FORWARD_ENV)
        os.environ[ZERO_IN_FORWARD_ENV] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[ZERO_IN_FORWARD_ENV]
            else:
                os.environ[ZERO_IN_FORWARD_ENV] = old

    return run


def check_ours(rec: Recorder, providers: dict, selected: str, inputs: tuple, dtype: torch.dtype) -> None:
    """Run each selected provider of ours once (fwd+bwd) before timing: loss and every gradient against float64,
    and the zero-in-forward modes bit for bit against triton. A failure removes the provider (reported as skipped);
    a provider that raises is left to the timing loop, which reports it."""
    hidden, scored, pair_index, w, b, nw = inputs
    params = [t for t in (hidden, w, b, nw) if t is not None]
    ins64 = [t.detach().double().requires_grad_() for t in params]
    h64, w64, b64 = ins64[:3]
    loss64 = fused_reward_loss_ref(h64, scored, pair_index, w64, b64, ins64[3] if nw is not None else None)[0]
    expected = [loss64.detach(), *torch.autograd.grad(loss64, ins64)]
    names = ["loss", "dhidden", "dhead_weight", "dhead_bias", "dnorm_weight"][: len(expected)]
    got: dict[str, list[torch.Tensor]] = {}
    for name in OURS:
        if name not in providers or not want(name, selected):
            continue
        for t in params:
            t.grad = None
        try:
            loss = providers[name]()()
            loss.backward()
        except Exception as exc:  # noqa: BLE001 - unavailable here (e.g. no CUDA extension)
            print(f"[{rec.kernel}] check {name}: could not run ({type(exc).__name__}; the timing loop reports it)",
                  flush=True)
            continue
        got[name] = [loss.detach(), *(t.grad for t in params)]
        errs = [float((g.double() - e).norm() / e.norm().clamp_min(1e-30)) for g, e in zip(got[name], expected)]
        bad = [f"{n} rel err {err:.2e}" for n, err in zip(names, errs) if not err <= REL_TOL[dtype]]  # NaN fails
        print(f"[{rec.kernel}] check {name} vs float64: max rel err {max(errs):.2e}" + (" FAILED" if bad else ""),
              flush=True)
        if bad:
            rec.skip(name, "wrong result before timing: " + ", ".join(bad))
            del providers[name]
    for name in ZERO_MODES:
        if "triton" in got and name in got and name in providers:
            same = [torch.equal(a, c) for a, c in zip(got["triton"], got[name])]
            if not all(same):
                rec.skip(name, "differs from triton (mode off): " + ", ".join(
                    n for n, ok in zip(names, same) if not ok))
                del providers[name]
    for t in params:
        t.grad = None


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
    def ours(name: str) -> Callable[[], Callable[[], torch.Tensor]]:
        backend = "cuda" if name == "cuda" else "triton"
        return lambda: zero_in_forward(lambda: fused_reward_loss(
            hidden, scored, pair_index, w, b, nw, backend=backend, check_indices=name == "triton_checked")[0],
            ZERO_MODES.get(name, "0"))

    for name in OURS:
        providers[name] = ours(name)
    check_ours(rec, providers, args.providers, (hidden, scored, pair_index, w, b, nw), dtype)
    params = [t for t in (hidden, w, b, nw) if t is not None]

    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    rec.run_providers({k: v for k, v in providers.items() if k not in FWD_BWD_ONLY}, x, backward, params,
                      bytes_moved, ceiling, args.providers, warmup, rep)
    for name in FWD_BWD_ONLY:
        if name in providers and want(name, args.providers):
            modes = training_modes(providers[name](), backward, params)
            rec.measure(name, x, {"fwd+bwd": modes["fwd+bwd"]}, bytes_moved, ceiling, warmup, rep,
                        graph_modes=("fwd+bwd",))
    print(acceptance(rec, x), flush=True)
    return rec.finish()


def acceptance(rec: Recorder, x: str) -> str:
    """Issue 4's reward-loss targets for each of our providers, host-launched and as device time (graph): fwd+bwd
    <= 0.10 ms, and >= 10x torch.compile of the HF-style path in the same mode of the same run."""
    lines = []
    for mode in ("fwd+bwd", "fwd+bwd graph"):
        base = rec.p50("hf_compile", mode, x)
        for name in OURS:
            ms = rec.p50(name, mode, x)
            if ms is None:
                continue
            vs = f", {base / ms:.2f}x hf_compile ({base:.4g} ms; target >= 10)" if base else ", no hf_compile row"
            lines.append(f"[{mode}] {x} {name}: {ms:.4g} ms (target <= 0.10){vs}")
    return "\n".join(lines) or f"[{x}] no fwd+bwd rows of our providers"


if __name__ == "__main__":
    main()
