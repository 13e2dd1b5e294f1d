"""Mixed-precision AdamW step over the trained parameters of bench_train's model, providers side by side (median ms,
host-launched and CUDA-graph replay, GB/s vs copy bandwidth).

Parameters: the 7B-width LLM reduced to ``--layers`` layers (embedding 152064 x 3584; per layer q/k/v with biases,
o, gate/up/down, two norms), the merger (LayerNorm 1280, 5120 x 5120 and 3584 x 5120 with biases) and the reward
head: 1.52 B elements at 4 layers, in ``--dtype`` (bf16) with fp32 masters and moments.

Providers (both through :class:`vlr_runtime.training.optim.MasterAdamW`, same state layout):
  torch  today's path: clip_gradients (every 16-bit gradient scaled in place), an fp32 copy of each gradient,
         torch's fused AdamW on the fp32 masters, copy back to the parameters (``fused=False``).
  ours   the fused kernel (vlr_kernels.adamw_step): the clip factor passed as a 0-d device tensor, gradients only
         read (``fused=True``).
Bytes counted for both: 28 per bf16 element (read grad 2, master/m/v 12; write master/m/v 12, param 2) - the
minimum; the torch path moves ~44, so its GB/s reads as "useful" bandwidth.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser, bench_device, copy_bandwidth_gbps, want

from vlr_runtime.config import OptimConfig
from vlr_runtime.training.optim import MasterAdamW, clip_gradients

CLIP_FACTOR = 0.97  # close to 1: the torch provider shrinks its gradients by it at every timed call


def param_shapes(hidden: int, inter: int, kv: int, vocab: int, layers: int, vision: int, merge: int
                 ) -> list[tuple[int, ...]]:
    """Shapes of the trained parameters: embedding, ``layers`` decoder layers, final norm, merger, reward head."""
    layer = [(hidden, hidden), (hidden,), (kv, hidden), (kv,), (kv, hidden), (kv,), (hidden, hidden),
             (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    merger = [(vision,), (merge, merge), (merge,), (hidden, merge), (hidden,)]
    return [(vocab, hidden), *layer * layers, (hidden,), *merger, (1, hidden), (1,)]


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[nn.Parameter]:
    """Random parameters with random gradients (never timed on zeros)."""
    gen = torch.Generator(device).manual_seed(0)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, device=device).mul_(0.02).to(dtype))
        p.grad = torch.randn(shape, generator=gen, device=device).mul_(1e-3).to(dtype)
        params.append(p)
    return params


def main(argv: list[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="LLM layers (4: 1.52 B elements as in bench_train)")
    p.add_argument("--vocab", type=int, default=152064)
    args = p.parse_args(argv)
    device = bench_device()
    if args.quick:
        shapes = param_shapes(hidden=64, inter=160, kv=16, vocab=1000, layers=1, vision=32, merge=128)
    else:
        shapes = param_shapes(hidden=3584, inter=18944, kv=512, vocab=args.vocab, layers=args.layers, vision=1280,
                              merge=5120)
    dtype = getattr(torch, args.dtype)
    warmup, rep = (1, 3) if args.quick else (5, args.rep)
    params = make_params(shapes, dtype, device)
    n = sum(q.numel() for q in params)
    # 16-bit parameters: grad + param in their dtype, master/m/v fp32 read and written; fp32: no copy-back
    per_elem = 24 + 2 * params[0].element_size() if dtype != torch.float32 else 28
    bytes_moved = {"step": per_elem * n}
    ceiling = copy_bandwidth_gbps(device)
    rec = Recorder("adamw", device, args.csv)
    rec.add("copy", "ceiling", "GB/s", "1GiB" if device.type == "cuda" else "64MiB", ceiling)
    x = f"{n / 1e9:.3g}B {args.dtype}"
    cfg = OptimConfig(lr=1e-5, weight_decay=0.1, beta1=0.9, beta2=0.98, eps=1e-8)
    max_norm = 1.0
    scale = torch.tensor(CLIP_FACTOR, device=device)

    def torch_provider():
        opt = MasterAdamW(params, cfg, fused=False)
        return opt, lambda: (clip_gradients(params, max_norm / CLIP_FACTOR, max_norm), opt.step())

    def ours_provider():
        opt = MasterAdamW(params, cfg, fused=True)
        return opt, lambda: opt.step(grad_scale=scale)

    for name, make in (("torch", torch_provider), ("ours", ours_provider)):
        if not want(name, args.providers):
            continue
        try:
            opt, step = make()
        except Exception as exc:  # noqa: BLE001 - e.g. the kernel on CPU without TRITON_INTERPRET=1
            rec.skip(name, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            continue
        # "step graph": the step as one CUDA-graph replay, device time without the per-tensor launches
        rec.measure(name, x, {"step": (step, None)}, bytes_moved, ceiling, warmup, rep, graph_modes=("step",))
        del opt, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec.finish()


if __name__ == "__main__":
    main()
