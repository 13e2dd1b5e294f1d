"""The varlen attention kernels compile for a real GPU (sm_90a, bf16) without one: the Triton interpreter that
runs the CPU tests skips the MLIR/LLVM/ptxas pipeline, where scalar control flow, loop-carried types and
constexpr globals can still fail. Also checks that the default launch configurations do not spill
registers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tests.kernels.triton_sm90 import _resource_usage
from vlr_kernels.attention import varlen_triton as vt
from vlr_kernels.attention.varlen_tiles import head_dim_chunks

POINTER = {"LSE": "*fp32", "DELTA": "*fp32", "cu_q": "*i32", "cu_k": "*i32", "cu_tiles": "*i32",
           "tile_seg": "*i32", "prefix_lens": "*i32", "split_lens": "*i32"}

def compile_kernel(kernel, constexprs, num_warps, num_stages, pointers=None):
    signature, attrs = {}, {}
    pointers = {**POINTER, **(pointers or {})}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in ("qk_scale", "sm_scale"):
            signature[p.name] = "fp32"
        elif p.name[0].isupper() or p.name in pointers:
            signature[p.name] = pointers.get(p.name, "*bf16")
        else:
            signature[p.name] = "i32"
        # what the launcher specialises at run time: 16-byte aligned pointers, strides multiple of 16
        if not p.is_constexpr and (signature[p.name].startswith("*") or p.name.startswith("stride")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    regs, spill_bytes = _resource_usage(compiled.asm["cubin"])
    # a software-pipelined loop waits for all but its newest copies (num > 0); num = 0 everywhere: no overlap
    waits = [int(n) for n in re.findall(r"async_wait[^\n]*num = (\d+)", compiled.asm["ttgir"])]
    # Hopper's warpgroup MMA (wgmma) needs >= 64 rows per warpgroup; thinner dots fall back to mma.sync
    return {"regs": regs, "spill_bytes": spill_bytes, "wgmma": "wgmma.mma_async" in compiled.asm["ptx"],
            "in_flight": max(waits, default=0)}

def variant(name, kernel, head_dim, cfg, causal=True, shared=True, **constexprs):
    d0, d1 = head_dim_chunks(head_dim)
    cfg = dict(cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    # the atomic dQ candidates add to an fp32 buffer
    pointers = {"DQ": "*fp32"} if constexprs.get("FUSE_DQ") == 2 else None
    consts = dict(CAUSAL=causal, SHARED=shared, D0=d0, D1=d1, HEAD_DIM=head_dim, PREC=None, **cfg, **constexprs)
    print(json.dumps({"name": name, **compile_kernel(kernel, consts, warps, stages, pointers)}), flush=True)

# every launch candidate the tuner may pick: vision full (hd 80, non-causal), vision windows (fused dQ), LLM GQA
# (hd 128; causal shared-prompt pairs, the costliest specialisation)
for hd, seq, group, mask, label in ((80, 8100, 1, False, "hd80"), (128, 4096, 7, True, "hd128_gqa")):
    for i, cfg in enumerate(vt.launch_candidates(hd, seq, seq, "fwd")):
        variant(f"fwd_{label}_{i}", vt._varlen_attn_fwd_kernel, hd, cfg, mask, mask, GROUP=group)
    shared_ok = vt.launch_candidates(hd, seq, seq, "dkdv", shared=True, flat=True)
    for i, cfg in enumerate(vt.launch_candidates(hd, seq, seq, "dkdv", flat=True)):
        flat = ("_flat" if cfg["FLAT"] else "") + ("_atomic" if cfg.get("ATOMIC_DQ") else "")
        heads = 1 if cfg["SPLIT"] else group
        consts = {k: v for k, v in cfg.items() if k not in ("SPLIT", "ATOMIC_DQ")}
        variant(f"dkdv_{label}_{i}{flat}", vt._varlen_attn_dkdv_kernel, hd, consts, mask,
                mask and cfg in shared_ok, GROUP=group, HEADS=heads, FUSE_DQ=2 if cfg.get("ATOMIC_DQ") else 0)
    shared_dq = vt.launch_candidates(hd, seq, seq, "dq", shared=True)
    for i, cfg in enumerate(vt.launch_candidates(hd, seq, seq, "dq")):
        variant(f"dq_{label}_{i}", vt._varlen_attn_dq_kernel, hd, cfg, mask, mask and cfg in shared_dq, GROUP=group)
for i, cfg in enumerate(vt.launch_candidates(80, 64, 64, "dkdv")):
    consts = {k: v for k, v in cfg.items() if k not in ("SPLIT", "ATOMIC_DQ")}
    variant(f"dkdv_hd80_fused_dq_{i}", vt._varlen_attn_dkdv_kernel, 80, consts, False, False, GROUP=1,
            HEADS=1, FUSE_DQ=1)
# the one-tile window kernels the tuner may pick for the ViT windows (hd 80, 16 heads, <= 64 tokens)
from vlr_kernels.attention import varlen_windows as vw
for kernel, fn in (("fwd", vw._window_fwd_kernel), ("dkdv", vw._window_bwd_kernel)):
    for i, cfg in enumerate(vw.window_candidates(80, 64, 64, 16, 1, kernel)):
        consts = {k: v for k, v in cfg.items() if k not in ("WINDOW", "PROGS", "num_warps", "num_stages")}
        d0, d1 = head_dim_chunks(80)
        out = compile_kernel(fn, dict(GROUP=1, CAUSAL=False, D0=d0, D1=d1, HEAD_DIM=80, PREC=None, **consts),
                             cfg["num_warps"], cfg["num_stages"])
        print(json.dumps({"name": f"window_{kernel}_{i}", "stages": cfg["STAGES"], **out}), flush=True)
delta = compile_kernel(vt._delta_kernel, dict(BLOCK_T=32, BLOCK_D=128, HEAD_DIM=80), 4, 2)
print(json.dumps({"name": "delta", **delta}), flush=True)
"""


def test_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    names = [r["name"] for r in results]
    for kernel in ("fwd_hd80", "dkdv_hd80", "dq_hd80", "fwd_hd128_gqa", "dkdv_hd128_gqa", "dq_hd128_gqa",
                   "dkdv_hd80_fused_dq"):
        assert f"{kernel}_0" in names, f"{kernel}: no default configuration compiled ({names})"
    assert names[-1] == "delta" and len(names) > 8
    for r in results:
        assert 0 < r["regs"] <= 255 and r["spill_bytes"] == 0, f"register spills in {r}"
        if "_flat" in r["name"]:  # the wider dK/dV tiles exist for the tensor cores' wide MMA
            assert r["wgmma"], f"{r['name']} does not use wgmma"
    assert sum("_flat" in r["name"] for r in results) >= 4, names
    assert sum(r["name"].endswith("_atomic") for r in results) >= 4, names
    assert {"window_fwd_0", "window_dkdv_0"} <= set(names), names
    # the window kernels' head/item loops at >= 3 stages keep the next item's copies in flight: the persistent
    # loop's first version (segment bounds loaded inside each item) compiled to a loop that waited for every
    # copy at once
    windows = [r for r in results if r["name"].startswith("window_") and r["stages"] >= 3]
    assert len(windows) >= 5 and all(r["in_flight"] > 0 for r in windows), windows
