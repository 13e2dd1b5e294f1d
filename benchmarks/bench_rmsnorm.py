"""RMSNorm (+ fused residual add), providers side by side (fwd / bwd / fwd+bwd, median ms, peak MiB, GB/s vs copy).

Providers: hf_eager (Qwen2RMSNorm math; with --residual the add is a separate op, as in the HF decoder layer),
hf_compile (torch.compile of it), liger (LigerRMSNorm, llama casting, when importable), triton (vlr_kernels.rms_norm).
Bytes counted (M x N elements of e bytes): plain fwd reads x, writes y (2MNe); bwd reads dy, x, writes dx (3MNe).
With residual: fwd reads x, r, writes y, x+r (4MNe); bwd reads dy, d(x+r), x+r, writes dx (4MNe).
The backward runs as ``torch.autograd.grad`` (gradients returned, not accumulated into ``.grad``): x and the residual
receive the same gradient tensor, and accumulating one tensor into two leaves makes the engine clone it - an extra
M x N copy (2MNe) that a model step, where both are intermediate activations, never pays (nor any provider here).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser, bench_device, compiled, copy_bandwidth_gbps, time_forced_candidates
from vlr_kernels import _tune, rms_norm, rms_norm_ref
from vlr_kernels import rmsnorm as rmsnorm_module


def _liger(n_cols, weight):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    norm = LigerRMSNorm(n_cols, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False).to(weight.device, weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def main(argv: list[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--cols", type=int, default=3584)
    p.add_argument("--residual", action="store_true", help="fused residual add (y, x + r)")
    p.add_argument("--candidates", action="store_true",
                   help="also time the backward with every launch candidate forced (one row each)")
    args = p.parse_args(argv)
    device = bench_device()
    m, n = (37, 96) if args.quick else (args.rows, args.cols)
    dtype = getattr(torch, args.dtype)
    warmup, rep = (1, 3) if args.quick else (10, args.rep)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g).to(device, dtype).requires_grad_()
    r = torch.randn(m, n, generator=g).to(device, dtype).requires_grad_() if args.residual else None
    w = (torch.rand(n, generator=g) + 0.5).to(device, dtype).requires_grad_()
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    e = x.element_size()
    k_fwd, k_bwd = (4, 4) if args.residual else (2, 3)
    bytes_moved = {"fwd": k_fwd * m * n * e, "bwd": k_bwd * m * n * e, "fwd+bwd": (k_fwd + k_bwd) * m * n * e}
    ceiling = copy_bandwidth_gbps(device)
    rec = Recorder("rmsnorm" + ("+residual" if args.residual else ""), device, args.csv)
    rec.add("copy", "ceiling", "GB/s", "1GiB" if device.type == "cuda" else "64MiB", ceiling)

    def hf(xx, ww, rr):
        s = xx if rr is None else xx + rr
        return rms_norm_ref(s, ww) if rr is None else (rms_norm_ref(s, ww), s)

    inputs = [x, w] + ([r] if r is not None else [])

    def liger():
        norm = _liger(n, w.detach())
        inputs.append(norm.weight)  # Liger's module owns its weight; its gradient is part of the work
        if r is None:
            return lambda: norm(x)
        return lambda: (norm(x + r), x + r)

    providers = {
        "hf_eager": lambda: lambda: hf(x, w, r),
        "hf_compile": lambda: functools.partial(compiled(hf), x, w, r),
        "liger": liger,
        "triton": lambda: lambda: rms_norm(x, w, 1e-6, r, backend="triton"),
    }

    def backward(out):
        outs = out if isinstance(out, tuple) else (out,)
        # each provider uses only its own weight (w, or Liger's copy): allow_unused for the other
        torch.autograd.grad(outs, inputs, [dy] * len(outs), allow_unused=True)

    rec.run_providers(providers, f"{m}x{n}", backward, inputs, bytes_moved,
                      ceiling, args.providers, warmup, rep)
    if args.candidates:  # the backward launcher (kernel + dweight partial sum) with each candidate forced
        _, s, rstd = rmsnorm_module.rms_norm_fwd(x.detach(), w.detach(), 1e-6, None if r is None else r.detach())
        ds = dy if r is not None else None
        time_forced_candidates(rec, rmsnorm_module, "_BWD_CONFIGS", lambda cfg: f"triton bwd {cfg}",
                               {"bwd": lambda: rmsnorm_module.rms_norm_bwd(dy, ds, s, w.detach(), rstd)},
                               f"{m}x{n}", {"bwd": bytes_moved["bwd"]}, ceiling, warmup, rep)
    print(f"[rmsnorm] launches picked by the tuner (warps, programs/SM, prefetch, stages): {_tune.choices()}",
          flush=True)
    return rec.finish()


if __name__ == "__main__":
    main()
