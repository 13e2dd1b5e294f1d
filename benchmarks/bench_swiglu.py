"""SwiGLU silu(gate) * up, providers side by side (fwd / bwd / fwd+bwd, median ms, peak MiB, GB/s vs copy).

Providers: hf_eager (F.silu(gate) * up as in Qwen2MLP), hf_compile, liger (LigerSiLUMulFunction when importable),
triton (vlr_kernels.swiglu). Bytes counted (M x N elements of e bytes each tensor): fwd reads gate, up, writes y
(3MNe); bwd reads dy, gate, up, writes dgate, dup (5MNe).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser, bench_device, compiled, copy_bandwidth_gbps
from vlr_kernels import swiglu


def hf_swiglu(gate, up):
    return F.silu(gate) * up


def _liger():
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply


def main(argv: list[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--cols", type=int, default=3584)
    args = p.parse_args(argv)
    device = bench_device()
    m, n = (37, 96) if args.quick else (args.rows, args.cols)
    dtype = getattr(torch, args.dtype)
    warmup, rep = (1, 3) if args.quick else (10, args.rep)
    g = torch.Generator().manual_seed(0)
    gate, up = ((3 * torch.randn(m, n, generator=g)).to(device, dtype).requires_grad_() for _ in range(2))
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    e = gate.element_size()
    bytes_moved = {"fwd": 3 * m * n * e, "bwd": 5 * m * n * e, "fwd+bwd": 8 * m * n * e}
    ceiling = copy_bandwidth_gbps(device)
    rec = Recorder("swiglu", device, args.csv)
    rec.add("copy", "ceiling", "GB/s", "1GiB" if device.type == "cuda" else "64MiB", ceiling)
    providers = {
        "hf_eager": lambda: lambda: hf_swiglu(gate, up),
        "hf_compile": lambda: functools.partial(compiled(hf_swiglu), gate, up),
        "liger": lambda: functools.partial(_liger(), gate, up),
        "triton": lambda: lambda: swiglu(gate, up, backend="triton"),
    }
    rec.run_providers(providers, f"{m}x{n}", lambda y: y.backward(dy), [gate, up], bytes_moved, ceiling,
                      args.providers, warmup, rep)
    return rec.finish()


if __name__ == "__main__":
    main()
