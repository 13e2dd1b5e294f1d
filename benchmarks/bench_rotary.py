"""Rotary on q and k (LLM M-RoPE: 28/4 heads x 128; vision 2D rope: 16/16 heads x 80), providers side by side
(fwd / bwd / fwd+bwd, median ms, peak MiB, GB/s vs copy).

Providers: hf_eager (transformers' apply_rotary_pos_emb / apply_rotary_pos_emb_vision on [T, heads, D]),
hf_compile, liger (LigerRopeFunction in its [1, heads, T, D] layout, prepared outside the timing; LLM config only),
triton (vlr_kernels.apply_rotary_qk: q and k in one launch). Bytes counted: q and k read and written once per
pass plus the fp32 cos/sin rows: 2 (Hq + Hk) T D e + 2 T D 4 per direction.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser, bench_device, compiled, copy_bandwidth_gbps, time_forced_candidates
from vlr_kernels import _tune, apply_rotary_qk, mrope_cos_sin, rope_inv_freq, vision_rope_cos_sin

rotary_module = importlib.import_module("vlr_kernels.rotary")  # the package exports names that shadow modules
CONFIGS = {"llm": (28, 4, 128), "vision": (16, 16, 80)}


def _cos_sin(config, t_rows, head_dim, device):
    pos = torch.arange(t_rows, device=device)
    if config == "llm":
        return mrope_cos_sin(torch.stack([pos, pos // 7, pos % 13]), rope_inv_freq(head_dim, 1e6), [16, 24, 24])
    return vision_rope_cos_sin(torch.stack([pos // 64, pos % 64], dim=1), rope_inv_freq(head_dim // 2, 1e4))


def main(argv: list[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--config", choices=list(CONFIGS), default="llm")
    p.add_argument("--candidates", action="store_true",
                   help="also time the kernel with every launch candidate forced (one row each)")
    args = p.parse_args(argv)
    device = bench_device()
    hq, hk, d = CONFIGS[args.config]
    t_rows = 37 if args.quick else args.tokens
    dtype = getattr(torch, args.dtype)
    warmup, rep = (1, 3) if args.quick else (10, args.rep)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(t_rows, hq, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(t_rows, hk, d, generator=g).to(device, dtype).requires_grad_()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = (t.to(device) for t in _cos_sin(args.config, t_rows, d, device))
    one_pass = 2 * (hq + hk) * t_rows * d * q.element_size() + 2 * t_rows * d * 4
    bytes_moved = {"fwd": one_pass, "bwd": one_pass, "fwd+bwd": 2 * one_pass}
    ceiling = copy_bandwidth_gbps(device)
    rec = Recorder(f"rotary_{args.config}", device, args.csv)
    rec.add("copy", "ceiling", "GB/s", "1GiB" if device.type == "cuda" else "64MiB", ceiling)

    if args.config == "llm":
        # transformers casts cos/sin to the activation dtype for the LLM
        cos_a, sin_a = cos.to(dtype), sin.to(dtype)

        def hf_rope(qq, kk):
            return hf.apply_rotary_pos_emb(qq, kk, cos_a, sin_a, unsqueeze_dim=1)
    else:

        def hf_rope(qq, kk):
            return hf.apply_rotary_pos_emb_vision(qq, kk, cos, sin)

    params = [q, k]
    liger_grads = {}

    def liger():
        if args.config != "llm":
            raise RuntimeError("Liger's rope takes one cos/sin per sequence position in its LLM layout only")
        from liger_kernel.ops.rope import LigerRopeFunction

        ql = q.detach().transpose(0, 1)[None].contiguous().requires_grad_()
        kl = k.detach().transpose(0, 1)[None].contiguous().requires_grad_()
        params.extend([ql, kl])  # so their grads are cleared between runs like everyone else's
        liger_grads["q"] = dq.transpose(0, 1)[None].contiguous()
        liger_grads["k"] = dk.transpose(0, 1)[None].contiguous()
        cl, sl = cos_a[None], sin_a[None]
        return lambda: LigerRopeFunction.apply(ql, kl, cl, sl)

    providers = {
        "hf_eager": lambda: lambda: hf_rope(q, k),
        "hf_compile": lambda: functools.partial(compiled(hf_rope), q, k),
        "liger": liger,
        "triton": lambda: functools.partial(apply_rotary_qk, q, k, cos, sin, backend="triton"),
    }

    def backward(out):
        oq, ok = out
        # Liger's layout differs; its gradients are the same numbers transposed, and only the timing matters here
        gq, gk = (dq, dk) if oq.shape == q.shape else (liger_grads["q"], liger_grads["k"])
        torch.autograd.backward((oq, ok), (gq, gk))

    x = f"T={t_rows},{hq}/{hk}x{d}"
    rec.run_providers(providers, x, backward, params, bytes_moved, ceiling, args.providers, warmup, rep)
    if args.candidates:  # the kernel's forward and backward (transposed rotation) with each candidate forced
        qd, kd = q.detach(), k.detach()
        time_forced_candidates(
            rec, rotary_module, "_CONFIGS", lambda cfg: f"triton {cfg}",
            {mode: functools.partial(rotary_module.rotary_fwd, qd, kd, cos, sin, backward=mode == "bwd")
             for mode in ("fwd", "bwd")}, x, {"fwd": one_pass, "bwd": one_pass}, ceiling, warmup, rep)
    print(f"[rotary] launches picked by the tuner (tokens per program, warps): {_tune.choices()}", flush=True)
    return rec.finish()


if __name__ == "__main__":
    main()
