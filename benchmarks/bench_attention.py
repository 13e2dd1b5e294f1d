"""Varlen attention over packed sequences, providers side by side (fwd / bwd / fwd+bwd, median ms, peak MiB,
TFLOP/s of valid work).

Workloads (issue 5):
  windows  8 images (grids 64x64, 48x80, 100x60, 32x32, 74x56, 20x30, 90x90, 40x120) -> 32,604 patches in
           545 Qwen2.5-VL windows (vlr_runtime.data.windows, identical to transformers), 16 heads, hd 80
  full     the same images as 8 segments (full-attention blocks of the ViT)
  llm      28 q / 4 kv heads, hd 128, causal, sequences 4096, 3000, 2500, 1800, 1200, 900, 600, 300
  pairs    16 preference pairs, prompt 1,100 tokens, responses 150-400 tokens, LLM heads: one shared-prompt
           segment per pair (ours, sdpa loop) vs the duplicated layout [prompt|chosen], [prompt|rejected]
Providers: sdpa_loop (one SDPA call per segment, as transformers' vision tower), sdpa_padded (padded batch +
bool mask), flex (FlexAttention with a document block mask; compiled on CUDA), flash_attn (when installed),
torch_varlen (torch.nn.attention.varlen.varlen_attn: the FlashAttention-2 varlen kernels built into CUDA torch
>= 2.10, no shared-prompt mask; kv heads repeated for GQA where its signature has no enable_gqa, inside the timed
call as a user would have to), ours (vlr_kernels.varlen_attention, backend triton). TFLOP/s counts only
unmasked (q, k) pairs: 4*Hq*D per pair forward, 2.5x that backward. For ``pairs`` the ``Mtok/s`` rows count the tokens of the duplicated layout,
so shared and duplicated providers are compared on the same work delivered.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: CPU smoke run
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, base_parser, bench_device, compiled, markdown_table, time_ms, want  # noqa: E402

from vlr_kernels._backend import has_module  # noqa: E402
from vlr_kernels.varlen_attention import segment_mask, varlen_attention  # noqa: E402
from vlr_runtime.data.windows import vision_windows  # noqa: E402

GRIDS = [(64, 64), (48, 80), (100, 60), (32, 32), (74, 56), (20, 30), (90, 90), (40, 120)]
LLM_SEQS = [4096, 3000, 2500, 1800, 1200, 900, 600, 300]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Workload:
    """One packed attention problem (self-attention: the q and k segments coincide)."""

    name: str
    lens: list[int]
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    prefix: list[int] | None = None
    split: list[int] | None = None

    @property
    def tokens(self) -> int:
        return sum(self.lens)

    def valid_pairs(self) -> int:
        """Number of (q, k) pairs that attend (the work a mask-aware kernel must do)."""
        if self.prefix is not None:
            total = 0
            for n, p, s in zip(self.lens, self.prefix, self.split):
                c, r = s - p, n - s
                total += p * (p + 1) // 2 + c * p + c * (c + 1) // 2 + r * p + r * (r + 1) // 2
            return total
        return sum(n * (n + 1) // 2 if self.causal else n * n for n in self.lens)


def vision_lens(grids: list[tuple[int, int]], windows: bool, expect: tuple[int, int] | None) -> list[int]:
    """Segment lengths of the ViT's window (or full) attention for images with these (h, w) patch grids."""
    meta = vision_windows(torch.tensor([[1, h, w] for h, w in grids]))
    cu = meta.cu_window_seqlens if windows else meta.cu_seqlens
    lens = (cu[1:] - cu[:-1]).tolist()
    if expect is not None:
        got = (sum(lens), len(lens))
        assert got == expect, f"expected (tokens, segments) {expect}, got {got}"
    return lens


def pair_lens(n_pairs: int, prompt: int, lo: int, hi: int) -> tuple[list[int], list[int], list[int]]:
    """Deterministic response lengths in [lo, hi]; returns the shared layout's (lens, prefix, split)."""
    chosen = [lo + (i * 97) % (hi - lo + 1) for i in range(n_pairs)]
    rejected = [lo + (i * 61 + 40) % (hi - lo + 1) for i in range(n_pairs)]
    lens = [prompt + c + r for c, r in zip(chosen, rejected)]
    return lens, [prompt] * n_pairs, [prompt + c for c in chosen]


def workloads(quick: bool) -> list[Workload]:
    if quick:
        grids, seqs, (n_pairs, prompt, lo, hi) = [(8, 8), (4, 6)], [40, 5], (2, 24, 5, 9)
        heads_v, heads_llm, hd_llm = 1, (2, 1), 32
        expect_windows = expect_full = None
    else:
        grids, seqs, (n_pairs, prompt, lo, hi) = GRIDS, LLM_SEQS, (16, 1100, 150, 400)
        heads_v, heads_llm, hd_llm = 16, (28, 4), 128
        expect_windows, expect_full = (32604, 545), (32604, 8)
    lens, prefix, split = pair_lens(n_pairs, prompt, lo, hi)
    return [
        Workload("windows", vision_lens(grids, True, expect_windows), heads_v, heads_v, 80, False),
        Workload("full", vision_lens(grids, False, expect_full), heads_v, heads_v, 80, False),
        Workload("llm", seqs, *heads_llm, hd_llm, True),
        Workload("pairs", lens, *heads_llm, hd_llm, True, prefix, split),
    ]


def duplicated(w: Workload) -> tuple[Workload, torch.Tensor]:
    """The two-sequence layout of a shared-prompt workload and, for each of its rows, the source row."""
    rows, lens, start = [], [], 0
    for n, p, s in zip(w.lens, w.prefix, w.split):
        prompt = list(range(start, start + p))
        rows += prompt + list(range(start + p, start + s)) + prompt + list(range(start + s, start + n))
        lens += [s, p + n - s]
        start += n
    return Workload("pairs", lens, w.heads_q, w.heads_kv, w.head_dim, True), torch.tensor(rows)


def cu_seqlens(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def segment_tensors(w: Workload, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-token segment id and local position, per-segment start/length/prefix/split, all on ``device``."""
    cu = cu_seqlens(w.lens, device).long()
    tok = torch.arange(w.tokens, device=device)
    seg = torch.searchsorted(cu[1:], tok, right=True)
    n = len(w.lens)
    prefix = torch.tensor(w.prefix if w.prefix else [0] * n, device=device)
    split = torch.tensor(w.split if w.split else w.lens, device=device)
    return dict(cu=cu, seg=seg, local=tok - cu[seg], lens=cu[1:] - cu[:-1], prefix=prefix, split=split)


def ours(w: Workload, device: torch.device, backend: str = "triton") -> Attention:
    cu, m = cu_seqlens(w.lens, device), max(w.lens)
    pre = None if w.prefix is None else torch.tensor(w.prefix, dtype=torch.int32, device=device)
    spl = None if w.split is None else torch.tensor(w.split, dtype=torch.int32, device=device)
    return lambda q, k, v: varlen_attention(q, k, v, cu, cu, m, m, w.causal, prefix_lens=pre, split_lens=spl,
                                            backend=backend)


def torch_varlen(w: Workload, device: torch.device) -> Attention:
    """torch's built-in varlen FlashAttention (CUDA torch >= 2.10); raises where it does not exist (a skip row)."""
    import inspect

    if device.type != "cuda":
        raise RuntimeError("torch.nn.attention.varlen runs on CUDA only")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen") from exc
    params = inspect.signature(varlen_attn).parameters
    cu, m = cu_seqlens(w.lens, device), max(w.lens)
    kwargs: dict = {}
    if w.causal:  # the first releases took is_causal, later ones a (left, right) window
        kwargs.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
    group = w.heads_q // w.heads_kv
    native_gqa = "enable_gqa" in params
    if group > 1 and native_gqa:
        kwargs["enable_gqa"] = True

    def run(q, k, v):
        if group > 1 and not native_gqa:
            k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
        return varlen_attn(q, k, v, cu, cu, m, m, **kwargs)

    return run


def sdpa_padded(w: Workload, device: torch.device) -> Attention:
    """Gather into ``[N, H, max_len, D]``, one SDPA call with a bool mask, gather back (all of it timed)."""
    t = segment_tensors(w, device)
    n, m = len(w.lens), max(w.lens)
    pos = torch.arange(m, device=device)
    idx = (t["cu"][:-1, None] + pos).clamp(max=w.tokens - 1)
    seg = (slice(None), None, None)
    shared = w.prefix is not None
    mask = segment_mask(pos[None, :, None], pos[None, None, :], t["lens"][seg], t["lens"][seg], w.causal,
                        t["prefix"][seg] if shared else None, t["split"][seg] if shared else None)
    mask = mask | (pos[None, :, None] >= t["lens"][seg])  # padded q rows attend anywhere: no NaN rows
    mask = mask[:, None]
    row = t["seg"] * m + t["local"]
    gqa = w.heads_q != w.heads_kv

    def run(q, k, v):
        qp, kp, vp = (x[idx].transpose(1, 2) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(n * m, w.heads_q, w.head_dim)[row]

    return run


def flex(w: Workload, device: torch.device) -> Attention:
    """FlexAttention over the whole packed axis with a document (+ causal, + shared-prompt) block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = segment_tensors(w, device)
    seg, local, prefix, split = t["seg"], t["local"], t["prefix"], t["split"]

    def mask_mod(b, h, qi, ki):
        ok = seg[qi] == seg[ki]
        if w.causal:
            ok = ok & (ki <= qi)
        if w.prefix is not None:
            s = seg[qi]
            ok = ok & ~((local[qi] >= split[s]) & (local[ki] >= prefix[s]) & (local[ki] < split[s]))
        return ok

    block_mask = create_block_mask(mask_mod, None, None, w.tokens, w.tokens, device=device)
    attn = compiled(flex_attention) if device.type == "cuda" else flex_attention
    gqa = w.heads_q != w.heads_kv

    def run(q, k, v):
        qb, kb, vb = (x.transpose(0, 1)[None] for x in (q, k, v))
        out = attn(qb, kb, vb, block_mask=block_mask, enable_gqa=gqa)
        return out[0].transpose(0, 1)

    return run


def providers(w: Workload, device: torch.device, selected: str) -> dict[str, Callable[[], Attention]]:
    """Provider name -> factory (built lazily so that one failing factory is recorded as a skip)."""
    out: dict[str, Callable[[], Attention]] = {
        "sdpa_loop": lambda: ours(w, device, "sdpa"),
        "sdpa_padded": lambda: sdpa_padded(w, device),
        "flex": lambda: flex(w, device),
    }
    if w.prefix is None:
        out["flash_attn"] = lambda: ours(w, device, "flash_attn")
        out["torch_varlen"] = lambda: torch_varlen(w, device)
    out["ours"] = lambda: ours(w, device)
    return {name: f for name, f in out.items() if want(name, selected)}


def inputs(w: Workload, device: torch.device, dtype: torch.dtype, rows: torch.Tensor | None = None):
    """q, k, v (leaves requiring grad) and dout; ``rows`` re-gathers them for a duplicated layout."""
    g = torch.Generator().manual_seed(0)
    n = w.tokens if rows is None else int(rows.max()) + 1
    shapes = [(n, w.heads_q, w.head_dim), (n, w.heads_kv, w.head_dim), (n, w.heads_kv, w.head_dim)]
    qkv = [torch.randn(*s, generator=g) for s in shapes]
    if rows is not None:
        qkv = [x[rows] for x in qkv]
    q, k, v = (x.to(device, dtype).requires_grad_() for x in qkv)
    return q, k, v, torch.randn(q.shape, generator=g).to(device, dtype)


def modes(fn: Attention, q, k, v, dout) -> dict:
    """fwd, bwd (its forward re-run outside the timed region) and fwd+bwd."""
    saved: dict[str, torch.Tensor] = {}

    def forward_only():
        saved["out"] = fn(q, k, v)

    return {
        "fwd": (lambda: fn(q, k, v), None),
        # pop: an output kept alive keeps its autograd graph, whose leaves' AccumulateGrad nodes (made on the
        # default stream) then break the later fwd+bwd graph capture (H200 run F lost ours_shared's that way:
        # "operation failed due to a previous error during capture")
        "bwd": (lambda: torch.autograd.grad(saved.pop("out"), (q, k, v), dout), forward_only),
        "fwd+bwd": (lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout), None),
    }


# A relative max error that no correct kernel reaches in bf16 (tuned kernels vs the SDPA loop stay ~1e-2) and
# every wrong one exceeds (a wrong row or tile is off by O(1) of the tensor's scale)
DISAGREE = 0.1


def agreement(fn: Attention, ref: Attention, q, k, v, dout) -> dict[str, float]:
    """max |x - ref| / max |ref| of the output and of dq, dk, dv."""
    got = fn(q, k, v)
    exp = ref(q, k, v)
    pairs = zip((got, *torch.autograd.grad(got, (q, k, v), dout)), (exp, *torch.autograd.grad(exp, (q, k, v), dout)))
    return {name: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            for name, (a, b) in zip(("out", "dq", "dk", "dv"), pairs)}


def bench(rec: Recorder, w: Workload, provider: str, factory: Callable[[], Attention], device, dtype, warmup,
          rep, rows: torch.Tensor | None = None, delivered_tokens: int | None = None) -> None:
    """Check the provider's output and gradients against the SDPA loop on this workload (for ours: with the
    launch configurations the tuner picks on these first calls, the ones then timed), time it, add TFLOP/s
    (and Mtok/s) rows. A provider whose output or gradients disagree is reported and not timed."""
    try:
        fn = factory()
        q, k, v, dout = inputs(w, device, dtype, rows)
        errs = agreement(fn, ours(w, device, "sdpa"), q, k, v, dout)
        print(f"[{w.name}] {provider}: max |x - sdpa_loop| / max |sdpa_loop| "
              + ", ".join(f"{name} {e:.2e}" for name, e in errs.items()), flush=True)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run here is a skip, never a zero
        rec.skip(provider, f"{w.name}: {type(exc).__name__}: {exc}".splitlines()[0][:200])
        return
    bad = {name: e for name, e in errs.items() if not e <= DISAGREE}
    if bad:
        rec.skip(provider, f"{w.name}: disagrees with the SDPA loop ({bad}, limit {DISAGREE}): not timed")
        return
    rec.measure(provider, w.name, modes(fn, q, k, v, dout), warmup=warmup, rep=rep)
    fwd_flop = 4 * w.heads_q * w.head_dim * w.valid_pairs()
    for mode, flop in (("fwd", fwd_flop), ("bwd", 2.5 * fwd_flop), ("fwd+bwd", 3.5 * fwd_flop),
                       ("fwd graph", fwd_flop), ("fwd+bwd graph", 3.5 * fwd_flop)):
        ms = rec.p50(provider, mode, w.name)
        if ms is not None:
            rec.add(provider, mode, "TFLOP/s", w.name, flop / (ms * 1e-3) / 1e12)
            if delivered_tokens is not None:
                rec.add(provider, mode, "Mtok/s", w.name, delivered_tokens / (ms * 1e-3) / 1e6)


def summary(rec: Recorder) -> str:
    """Markdown table of the derived rows (TFLOP/s, Mtok/s) that the shared table does not show."""
    lines = ["| x | provider | mode | TFLOP/s (valid work) | Mtok/s (pairs: duplicated-layout tokens) |",
             "| --- | --- | --- | --- | --- |"]
    keys = dict.fromkeys((r.x, r.provider, r.mode) for r in rec.rows if r.metric == "TFLOP/s")
    for x, prov, mode in keys:
        vals = {r.metric: r.p50 for r in rec.rows if (r.x, r.provider, r.mode) == (x, prov, mode)}
        mtok = f"{vals['Mtok/s']:.4g}" if "Mtok/s" in vals else ""
        lines.append(f"| {x} | {prov} | {mode} | {vals['TFLOP/s']:.4g} | {mtok} |")
    return "\n".join(lines)


def acceptance(rec: Recorder) -> str:
    """Issue 5's fwd+bwd targets, evaluated on this run's medians (a missing provider leaves its line out),
    for host-launched calls and for CUDA-graph replays (device time) where those were measured."""
    lines = []
    for mode in ("fwd+bwd", "fwd+bwd graph"):
        def ms(provider, x, mode=mode):
            return rec.p50(provider, mode, x)

        win, win_flex = ms("ours", "windows"), ms("flex", "windows")
        if win:
            lines.append(f"[{mode}] windows: ours {win:.3f} ms (target <= 0.35)"
                         + (f", {win_flex / win:.1f}x flex (target >= 5)" if win_flex else ""))
        for x in ("full", "llm"):
            ours_ms, loop_ms, flex_ms = ms("ours", x), ms("sdpa_loop", x), ms("flex", x)
            if ours_ms and loop_ms:
                vs_flex = f", {flex_ms / ours_ms:.2f}x flex (target > 1)" if flex_ms else ""
                lines.append(f"[{mode}] {x}: ours {ours_ms:.3f} ms, {loop_ms / ours_ms:.2f}x sdpa_loop "
                             f"(target >= 1){vs_flex}")
        shared_ms, dup_ms = ms("ours_shared", "pairs"), ms("ours_duplicated", "pairs")
        if shared_ms and dup_ms:
            lines.append(f"[{mode}] pairs: shared {dup_ms / shared_ms:.2f}x the tokens/s of duplicated "
                         "(target >= 1.3)")
    return "\n".join(lines)


def _describe(kernel: str, cfg: dict[str, int]) -> str:
    """``ours dkdv 32x128 w8 s3 flat`` for a launch configuration of :mod:`vlr_kernels.attention`."""
    if cfg.get("WINDOW"):
        spread = f"persist{cfg['PROGS']}/SM" if cfg.get("PERSIST") else f"heads{cfg['HEADS']}"
        tile = f"{cfg['BLOCK']}x{cfg['BLOCK']} {spread} pipe{cfg['STAGES']} window"
    else:
        tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}"
    flags = [name.lower() for name in ("FLAT", "SPLIT", "ATOMIC_DQ", "KV_MAJOR") if cfg.get(name)]
    flags += {1: ["recompute"], 2: ["lse_delta"]}.get(cfg.get("RECOMPUTE", 0), [])
    return " ".join([f"ours {kernel} {tile} w{cfg['num_warps']} s{cfg['num_stages']}", *flags])


def candidate_times(rec: Recorder, w: Workload, device: torch.device, dtype: torch.dtype, warmup: int,
                    rep: int) -> None:
    """``--candidates``: every launch candidate of our kernels on this workload, forced one at a time (the
    tuner keeps only the fastest; these rows check each variant's prediction in benchmarks/NOTES.md). dkdv
    and dq rows time the whole backward launcher (delta, dK/dV, dQ: the other kernel at the tuner's pick)."""
    from vlr_kernels.attention.varlen_tiles import launch_candidates
    from vlr_kernels.attention.varlen_triton import varlen_attention_bwd, varlen_attention_fwd
    from vlr_kernels.attention.varlen_windows import window_candidates

    q, k, v, dout = (x.detach() for x in inputs(w, device, dtype))
    cu, m, scale = cu_seqlens(w.lens, device), max(w.lens), w.head_dim**-0.5
    meta = [None if x is None else torch.tensor(x, dtype=torch.int32, device=device)
            for x in (w.prefix, w.split)]
    args = (cu, cu, m, m, w.causal, scale, *meta)
    out, lse = varlen_attention_fwd(q, k, v, *args)
    group = w.heads_q // w.heads_kv
    for kernel in ("fwd", "dkdv", "dq"):
        cands = launch_candidates(w.head_dim, m, m, kernel, shared=w.prefix is not None)
        if w.prefix is None and kernel != "dq":
            heads = w.heads_q if kernel == "fwd" else w.heads_kv
            cands += window_candidates(w.head_dim, m, m, heads, group, kernel)
        for cfg in cands:
            name = _describe(kernel, cfg)
            if kernel == "fwd":
                fn = lambda cfg=cfg: varlen_attention_fwd(q, k, v, *args, configs={"fwd": cfg})
            else:
                fn = lambda cfg=cfg, kernel=kernel: varlen_attention_bwd(
                    dout, q, k, v, out, lse, *args, configs={kernel: cfg})
            try:
                p50, p20, p80 = time_ms(fn, device, warmup, rep)
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot launch here is a skip
                rec.skip(name, f"{w.name}: {type(exc).__name__}: {exc}".splitlines()[0][:200])
                continue
            rec.add(name, "fwd" if kernel == "fwd" else "bwd", "ms", w.name, p50, p20, p80)
            print(f"[{w.name}] {name}: {p50:.3f} ms", flush=True)


def _progress(rec: Recorder, workload: str) -> None:
    """This workload's rows and the targets so far, printed as soon as it is done (a run stopped by a time
    limit keeps what it measured)."""
    print(markdown_table([r for r in rec.rows if r.x == workload]), flush=True)
    print(acceptance(rec), flush=True)
    _print_tuner()


def _print_tuner() -> None:
    """The tuner's picks so far and every candidate time not printed yet."""
    from vlr_kernels._tune import choices, timings

    print(f"[varlen_attention] tuner choices so far: {choices()}", flush=True)
    for key, timed in timings().items():
        if key not in _PRINTED:  # every candidate's time from the tuner's own loop: no extra device time
            _PRINTED.add(key)
            print(f"[varlen_attention] tuner timings {key}: "
                  + "; ".join(f"{_describe(str(key[0]), c) if isinstance(c, dict) else c} {ms:.4g} ms"
                              for c, ms in timed), flush=True)


_PRINTED: set = set()


def main(argv: list[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--workloads", default="windows,full,llm,pairs",
                   help="comma-separated subset, run in this order")
    p.add_argument("--candidates", action="store_true",
                   help="also time every launch candidate of our kernels on its own (one row each)")
    args = p.parse_args(argv)
    device = bench_device()
    # bf16 is broken in the Triton interpreter: the CPU smoke run is fp32
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, args.dtype)
    warmup, rep = (1, 2) if args.quick else (10, args.rep)
    rec = Recorder("varlen_attention", device, args.csv)
    if not has_module("flash_attn"):
        rec.skip("flash_attn", "package not installed")
    by_name = {w.name: w for w in workloads(args.quick)}
    chosen = args.workloads.split(",")
    if set(chosen) - set(by_name):
        p.error(f"unknown workload(s) {sorted(set(chosen) - set(by_name))}; choose from {list(by_name)}")
    for w in (by_name[name] for name in chosen):
        print(f"=== {w.name}: {w.tokens} tokens, {len(w.lens)} segments, max {max(w.lens)}", flush=True)
        if w.prefix is None:
            for name, factory in providers(w, device, args.providers).items():
                if name != "flash_attn" or has_module("flash_attn"):
                    bench(rec, w, name, factory, device, dtype, warmup, rep)
        else:
            dup, rows = duplicated(w)
            shared_p, dup_p = providers(w, device, args.providers), providers(dup, device, args.providers)
            # ours shared and ours duplicated first: they are the target's pair, and a stage stopped by its time
            # limit (H200 run E lost ours_duplicated behind the slow SDPA loops) keeps them
            runs = [(True, "ours"), (False, "ours")] + [(True, n) for n in shared_p if n != "ours"] \
                + [(False, n) for n in dup_p if n != "ours"]
            for i, (shared, name) in enumerate(runs):
                if i == 2:  # the pairs stage of H200 run G hit its time limit in the slow peers: tuner first
                    _print_tuner()
                if shared and name in shared_p:
                    bench(rec, w, name + "_shared", shared_p[name], device, dtype, warmup, rep,
                          delivered_tokens=dup.tokens)
                elif not shared and name in dup_p and (name != "flash_attn" or has_module("flash_attn")):
                    bench(rec, dup, name + "_duplicated", dup_p[name], device, dtype, warmup, rep, rows,
                          dup.tokens)
        if args.candidates:
            candidate_times(rec, w, device, dtype, warmup, rep)
        _progress(rec, w.name)
    print(summary(rec), flush=True)
    print(acceptance(rec), flush=True)
    return rec.finish()


if __name__ == "__main__":
    main()
