"""The reward-loss Triton kernels compiled for sm_90 (bf16) the way they launch on the benchmark workload (T=32768,
S=64, P=32, H=3584): 16-byte aligned pointers and the integer arguments that are multiples of 16 marked as such, which
triton's run-time specialisation does and tests/kernels/triton_sm90.py does not. No spills, and the backward's zero
fill of dL/dhidden - nearly all of the op's bytes - uses 16-byte stores, in the backward (default) and in the forward
launch of the opt-in zero-in-forward mode (``_reward_fwd_zero_kernel``) alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tests.kernels.triton_sm90 import _resource_usage
import vlr_kernels.reward_loss_triton as rl

VALUES = {"n_rows": 32768, "n_cols": 3584, "n_scored": 64, "stride_t": 3584, "n_pairs": 32,
          "n_col_tiles": triton.cdiv(3584, rl._BWD_BLOCK_C)}
POINTERS = {"idx_ptr": "*i64", "pair_ptr": "*i64", "row_ok_ptr": "*i32", "ok_ptr": "*i32", "h_ptr": "*bf16",
            "w_ptr": "*bf16", "b_ptr": "*bf16", "g_ptr": "*bf16", "dh_ptr": "*bf16", "dw_ptr": "*bf16",
            "dg_ptr": "*bf16", "db_ptr": "*bf16"}

def compile_kernel(name, kernel, constexprs, num_warps):
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = POINTERS.get(p.name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in VALUES:
            sig[p.name] = "i32"
            if VALUES[p.name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "fp32"
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    regs, spill = _resource_usage(compiled.asm["cubin"])
    stores = re.findall(r"st\.global[.\w]*", compiled.asm["ptx"])
    print(json.dumps({"name": name, "regs": regs, "spill": spill, "wide_stores": sum(".v4." in s for s in stores),
                      "narrow_stores": sum(".v4." not in s for s in stores)}), flush=True)

for norm in (False, True):
    fwd_consts = {"HAS_NORM": norm, "CHECK": True, "BLOCK_H": rl._block_h(3584), "BLOCK_I": rl._BLOCK_I}
    compile_kernel(f"fwd{'+norm' if norm else ''}+check", rl._reward_fwd_kernel, fwd_consts, 8)
    compile_kernel(f"fwd_zero{'+norm' if norm else ''}+check", rl._reward_fwd_zero_kernel,
                   {**fwd_consts, "ZERO_ROWS": rl._ZERO_ROWS, "ZERO_COLS": rl._ZERO_COLS}, 8)
    compile_kernel(f"bwd{'+norm' if norm else ''}", rl._reward_bwd_kernel,
                   {"HAS_NORM": norm, "HAS_DREWARDS": norm, "BLOCK_S": rl._BWD_BLOCK_S, "BLOCK_C": rl._BWD_BLOCK_C,
                    "ZERO_ROWS": rl._ZERO_ROWS, "ZERO_COLS": rl._ZERO_COLS, "BLOCK_I": rl._BLOCK_I}, 4)
compile_kernel("pair+margin+check", rl._pair_loss_kernel,
               {"HAS_MARGIN": True, "CHECK": True, "BLOCK_S": rl._PAIR_BLOCK_S, "BLOCK_P": rl._PAIR_BLOCK_P}, 4)
"""


@pytest.mark.timeout(300)
def test_reward_kernels_as_launched_on_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=280, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert len(rows) == 7, rows
    assert all(r["spill"] == 0 for r in rows.values()), rows
    for name in ("bwd", "bwd+norm"):
        # the zero fill and the scored-row stores are 16 bytes wide; only dw, dg and db are element stores
        assert rows[name]["wide_stores"] >= 4 and rows[name]["narrow_stores"] <= 3, rows[name]
    for name in ("fwd_zero+check", "fwd_zero+norm+check"):
        # the zero fill of every row is 16 bytes wide; reward, rstd and row_ok are the element stores of the rows
        assert rows[name]["wide_stores"] >= 1 and rows[name]["narrow_stores"] <= 3, rows[name]
