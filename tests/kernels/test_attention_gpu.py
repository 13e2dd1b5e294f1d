"""varlen_attention on a GPU: bf16/fp16 outputs and gradients under the design.md rule (kernel error <= 2x
the error of the eager reference run in the same dtype, both against float64), at shapes of the real workloads
(windows of <= 64 tokens, long vision segments with hd 80, LLM causal GQA 28/4 with hd 128, shared-prompt
pairs), no host synchronisation, and parity with flash_attn when it is installed."""

from __future__ import annotations

import pytest
import torch
from vlr_kernels import varlen_attention, varlen_attention_ref
from vlr_kernels._backend import has_module

from tests.kernels.helpers import assert_bf16_rule

pytestmark = pytest.mark.gpu

CASES = {
    # name: (segment lengths, q heads, kv heads, head_dim, causal, (prefix_lens, split_lens) or None)
    "windows": ([64] * 40 + [16, 4, 36, 64, 1], 16, 16, 80, False, None),
    "vision_full": ([1024, 600, 37], 16, 16, 80, False, None),
    "llm_gqa": ([1500, 300, 17, 1], 28, 4, 128, True, None),
    "pairs": ([700 + 150 + 230, 500 + 260 + 90], 28, 4, 128, True, ([700, 500], [850, 760])),
    "hd64_mqa": ([333, 129], 8, 1, 64, True, None),
    "hd256": ([200, 77], 4, 2, 256, False, None),
}


def _inputs(lens, hq, hkv, d, shared, dtype):
    g = torch.Generator().manual_seed(0)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, generator=g)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    meta = {}
    if shared is not None:
        meta = {name: torch.tensor(x, dtype=torch.int32, device="cuda")
                for name, x in zip(("prefix_lens", "split_lens"), shared)}
    return [x.cuda().to(dtype) for x in (q, k, v, dout)], cu, meta


def _run(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_low_precision_rule(case, dtype):
    lens, hq, hkv, d, causal, shared = CASES[case]
    (q, k, v, dout), cu, meta = _inputs(lens, hq, hkv, d, shared, dtype)
    m = max(lens)

    def kernel(q, k, v):
        return varlen_attention(q, k, v, cu, cu, m, m, causal, backend="triton", **meta)

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, cu, cu, m, m, causal, **meta)

    got = _run(kernel, q, k, v, dout)
    eager = _run(ref, q, k, v, dout)
    exact = _run(ref, q.double(), k.double(), v.double(), dout.double())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, eager, exact):
        assert torch.isfinite(a).all(), f"{case} {name}: non-finite values"
        assert_bf16_rule(a, b, c, f"{case} {name}", floor=2e-3)


def test_no_host_sync_fwd_bwd():
    (q, k, v, dout), cu, meta = _inputs(*CASES["pairs"][:4], CASES["pairs"][5], torch.bfloat16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    # the first call compiles (and may synchronise); the second must not
    varlen_attention(q, k, v, cu, cu, 1080, 1080, True, backend="triton", **meta).backward(dout)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = varlen_attention(q, k, v, cu, cu, 1080, 1080, True, backend="triton", **meta)
        out.backward(dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not has_module("flash_attn"), reason="flash_attn is not installed")
@pytest.mark.parametrize("case", ["windows", "llm_gqa"])
def test_matches_flash_attn(case):
    lens, hq, hkv, d, causal, _ = CASES[case]
    (q, k, v, dout), cu, _ = _inputs(lens, hq, hkv, d, None, torch.bfloat16)
    m = max(lens)
    def with_backend(name):
        return lambda q, k, v: varlen_attention(q, k, v, cu, cu, m, m, causal, backend=name)

    ours = _run(with_backend("triton"), q, k, v, dout)
    fa = _run(with_backend("flash_attn"), q, k, v, dout)
    exact = _run(lambda q, k, v: varlen_attention_ref(q, k, v, cu, cu, m, m, causal), q.double(), k.double(),
                 v.double(), dout.double())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, fa, exact):
        assert_bf16_rule(a, b, c, f"{case} {name} vs flash_attn", floor=2e-3)


def test_flash_attn_backend_errors():
    """Absent package: a clear error naming it; present: no shared-prompt mask, said so, never ignored."""
    from vlr_kernels import BackendUnavailable

    lens, hq, hkv, d, causal, shared = CASES["pairs"]
    (q, k, v, _), cu, meta = _inputs(lens, hq, hkv, d, shared, torch.bfloat16)
    m = max(lens)
    if not has_module("flash_attn"):
        with pytest.raises(BackendUnavailable, match="flash_attn.*not installed"):
            varlen_attention(q, k, v, cu, cu, m, m, causal, backend="flash_attn")
    with pytest.raises(BackendUnavailable, match="flash_attn"):
        varlen_attention(q, k, v, cu, cu, m, m, causal, backend="flash_attn", **meta)


@pytest.mark.parametrize("case", ["vision_full", "llm_gqa"])
def test_sdpa_backend_runs_fused_kernels(case):
    """The sdpa backend (and the benchmark's SDPA-loop baseline) must reach SDPA's fused kernels: with the math
    kernel disallowed, a call that would fall back to it (e.g. 3-d inputs) raises instead of running slowly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lens, hq, hkv, d, causal, _ = CASES[case]
    (q, k, v, dout), cu, _ = _inputs(lens, hq, hkv, d, None, torch.bfloat16)
    m = max(lens)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        fused = _run(lambda q, k, v: varlen_attention(q, k, v, cu, cu, m, m, causal, backend="sdpa"), q, k, v, dout)

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, cu, cu, m, m, causal)

    eager = _run(ref, q, k, v, dout)
    exact = _run(ref, q.double(), k.double(), v.double(), dout.double())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), fused, eager, exact):
        assert_bf16_rule(a, b, c, f"{case} sdpa {name}", floor=2e-3)


def _candidate_cases() -> list[tuple[str, dict, bool]]:
    """Every launch candidate the tuner may pick for the LLM backward (hd 128, GQA 7; the shared-prompt
    specialisation gets its own lists), the vision full-attention backward (hd 80, dK/dV and dQ) and the one-tile
    window kernels, each forced on its own, and whether it is one never run on a GPU before (its test id ends in
    ``-new``: benchmarks/gpu_check.sh runs those first, in a process of their own)."""
    from vlr_kernels.attention.varlen_tiles import launch_candidates
    from vlr_kernels.attention.varlen_windows import window_candidates

    out = []
    for case, kernel in (("llm_gqa", "dkdv"), ("pairs", "dkdv"), ("vision_full", "dkdv"), ("vision_full", "dq"),
                         ("llm_gqa", "dq"), ("pairs", "dq")):
        lens, _, _, d, _, shared = CASES[case]
        args = (d, max(lens), max(lens), kernel)
        extra = {"flat": True} if kernel == "dkdv" else {}
        old = launch_candidates(*args, shared=shared is not None, new=False, **extra)
        for cfg in launch_candidates(*args, shared=shared is not None, new=True, **extra):
            if kernel == "dq" and old and cfg == old[0]:
                continue  # the dQ pass of every dK/dV case above already ran the default dQ tile
            out.append((case, {kernel: cfg}, cfg not in old))
    lens, hq, hkv, d, _, _ = CASES["windows"]
    for kernel in ("fwd", "dkdv"):
        heads = hq if kernel == "fwd" else hkv
        old = window_candidates(d, max(lens), max(lens), heads, hq // hkv, kernel, new=False)
        out += [("windows", {kernel: cfg}, cfg not in old)
                for cfg in window_candidates(d, max(lens), max(lens), heads, hq // hkv, kernel, new=True)]
    return out


def candidate_test_id(case: str, configs: dict[str, dict[str, int]], new: bool) -> str:
    """The test id of one forced candidate (``tests.kernels.new_probe`` maps ids back to candidates)."""
    (kernel, cfg), = configs.items()
    return (f"{case}-{kernel}-{'-'.join(str(int(x)) for x in cfg.values())}" + ("-flat" if cfg.get("FLAT") else "")
            + ("-new" if new else ""))


@pytest.mark.parametrize("case,configs", [c[:2] for c in _candidate_cases()],
                         ids=[candidate_test_id(*c) for c in _candidate_cases()])
def test_every_candidate_bf16_rule(case, configs):
    from vlr_kernels.attention.varlen_triton import varlen_attention_bwd, varlen_attention_fwd

    lens, hq, hkv, d, causal, shared = CASES[case]
    (q, k, v, dout), cu, meta = _inputs(lens, hq, hkv, d, shared, torch.bfloat16)
    m, scale = max(lens), d**-0.5
    pre, spl = meta.get("prefix_lens"), meta.get("split_lens")
    out, lse = varlen_attention_fwd(q, k, v, cu, cu, m, m, causal, scale, pre, spl, configs=configs)
    got = [out, *varlen_attention_bwd(dout, q, k, v, out, lse, cu, cu, m, m, causal, scale, pre, spl,
                                      configs=configs)]

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, cu, cu, m, m, causal, **meta)

    eager = _run(ref, q, k, v, dout)
    exact = _run(ref, q.double(), k.double(), v.double(), dout.double())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, eager, exact):
        assert torch.isfinite(a).all(), f"{case} {configs} {name}: non-finite values (a row left unwritten?)"
        assert_bf16_rule(a, b, c, f"{case} {configs} {name}", floor=2e-3)
