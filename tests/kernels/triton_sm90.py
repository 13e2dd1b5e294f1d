"""Compile every Triton kernel of vlr_kernels ahead of time for sm_90 (H100/H200) with bf16 pointers - no GPU needed -
and report registers and spills from the cubin. Run in a process *without* TRITON_INTERPRET (the interpreter replaces
the kernels at decoration time):

    TRITON_INTERPRET=0 python -m tests.kernels.triton_sm90

This catches what the interpreter cannot: type errors of the real compiler, bf16 lowering, register spills.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# import_module: the package exports functions named like some of these modules (vlr_kernels.swiglu)
adamw, reward_loss, reward_loss_triton, rmsnorm, rotary, swiglu = (
    importlib.import_module(f"vlr_kernels.{m}")
    for m in ("adamw", "reward_loss", "reward_loss_triton", "rmsnorm", "rotary", "swiglu")
)

BF, F32, I32, I64 = "*bf16", "*fp32", "*i32", "*i64"

RMS_BWD_TYPES = {"dy_ptr": BF, "ds_ptr": BF, "s_ptr": BF, "w_ptr": BF, "rstd_ptr": F32, "dx_ptr": BF,
                 "dw_part_ptr": F32, "n_rows": "i32", "n_cols": "i32"}

ROTARY_TYPES = {"q_ptr": BF, "k_ptr": BF, "cos_ptr": F32, "sin_ptr": F32, "yq_ptr": BF, "yk_ptr": BF,
                "n_tokens": "i32", "heads_q": "i32", "heads_k": "i32", "n_q_blocks": "i32", "stride_qt": "i32",
                "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32"}

# (name, kernel, {arg: type}, constexprs, num_warps) - the launch configurations the Python launchers use
CASES = [
    *[(f"rms_norm_fwd{'+res' if res else ''}_w{warps}_rows{rows}", rmsnorm._rms_norm_fwd_kernel,
       {"x_ptr": BF, "r_ptr": BF, "w_ptr": BF, "y_ptr": BF, "s_ptr": BF, "rstd_ptr": F32, "n_rows": "i32",
        "n_cols": "i32", "eps": "fp32"}, {"HAS_RESIDUAL": res, "BLOCK_N": 4096, "ROWS": rows}, warps)
      for res in (False, True) for warps, rows in rmsnorm._FWD_CONFIGS],
    *[(f"rms_norm_bwd+ds{'+prefetch' if prefetch else ''}{f'+stages{stages}' if stages > 1 else ''}",
       rmsnorm._rms_norm_bwd_kernel, RMS_BWD_TYPES,
       {"HAS_DS": True, "PREFETCH": prefetch, "STAGES": stages, "BLOCK_N": 4096}, warps)
      for warps, _, prefetch, stages in rmsnorm._BWD_CONFIGS],
    *[(f"swiglu_fwd_{block}_w{warps}{'_stream' if stream else ''}", swiglu._swiglu_fwd_kernel,
       {"g_ptr": BF, "u_ptr": BF, "y_ptr": BF, "n": "i64"}, {"BLOCK": block, "STREAM": stream}, warps)
      for block, warps, stream in swiglu._CONFIGS],
    *[(f"swiglu_bwd_{block}_w{warps}{'_stream' if stream else ''}", swiglu._swiglu_bwd_kernel,
       {"dy_ptr": BF, "g_ptr": BF, "u_ptr": BF, "dg_ptr": BF, "du_ptr": BF, "n": "i64"},
       {"BLOCK": block, "STREAM": stream}, warps) for block, warps, stream in swiglu._CONFIGS],
    *[(f"rotary_{'bwd' if bwd else 'fwd'}_hd{d}", rotary._rotary_kernel,
       ROTARY_TYPES, {"HALF": d // 2, "BACKWARD": bwd, "BLOCK_T": 1, "BLOCK_H": 16,
                      "BLOCK_D": triton.next_power_of_2(d // 2)}, 4)
      for bwd in (False, True) for d in (128, 80)],
    *[(f"reward_fwd{'+norm+check' if on else ''}", reward_loss._reward_fwd_kernel,
       {"h_ptr": BF, "idx_ptr": I64, "w_ptr": BF, "b_ptr": BF, "g_ptr": BF, "rewards_ptr": F32, "rstd_ptr": F32,
        "row_ok_ptr": I32, "n_rows": "i32", "n_cols": "i32", "n_scored": "i32", "stride_t": "i32", "eps": "fp32"},
       {"HAS_NORM": on, "CHECK": on, "BLOCK_H": 2048, "BLOCK_I": 64}, 8) for on in (False, True)],
    ("reward_fwd_zero+norm", reward_loss_triton._reward_fwd_zero_kernel,
     {"h_ptr": BF, "idx_ptr": I64, "w_ptr": BF, "b_ptr": BF, "g_ptr": BF, "rewards_ptr": F32, "rstd_ptr": F32,
      "row_ok_ptr": I32, "dh_ptr": BF, "n_rows": "i32", "n_cols": "i32", "n_scored": "i32", "stride_t": "i32",
      "eps": "fp32"},
     {"HAS_NORM": True, "CHECK": False, "BLOCK_H": 2048, "BLOCK_I": 64, "ZERO_ROWS": 8, "ZERO_COLS": 512}, 8),
    ("zero_unscored", reward_loss_triton._zero_unscored_kernel,
     {"idx_ptr": I64, "dh_ptr": BF, "n_rows": "i32", "n_cols": "i32", "n_scored": "i32"},
     {"ZERO_ROWS": 8, "ZERO_COLS": 512, "BLOCK_I": 64}, 4),
    ("pair_loss+margin+check", reward_loss._pair_loss_kernel,
     {"rewards_ptr": F32, "pair_ptr": I64, "margin_ptr": F32, "row_ok_ptr": I32, "loss_ptr": F32, "acc_ptr": F32,
      "ok_ptr": I32, "coef_ptr": F32, "n_scored": "i32", "n_pairs": "i32", "center_coef": "fp32"},
     {"HAS_MARGIN": True, "CHECK": True, "BLOCK_S": 64, "BLOCK_P": 64}, 4),
    *[(f"reward_bwd{'+norm' if norm else ''}", reward_loss._reward_bwd_kernel,
       {"h_ptr": BF, "idx_ptr": I64, "w_ptr": BF, "b_ptr": BF, "g_ptr": BF, "rewards_ptr": F32, "rstd_ptr": F32,
        "coef_ptr": F32, "dloss_ptr": F32, "drewards_ptr": F32, "dh_ptr": BF, "dw_ptr": BF, "dg_ptr": BF,
        "db_ptr": BF, "n_rows": "i32", "n_cols": "i32", "n_scored": "i32", "stride_t": "i32", "n_col_tiles": "i32"},
       {"HAS_NORM": norm, "HAS_DREWARDS": norm, "BLOCK_S": 32, "BLOCK_C": 64, "ZERO_ROWS": 8, "ZERO_COLS": 512,
        "BLOCK_I": 64}, 4)
      for norm in (False, True)],
    ("adamw+param", adamw._adamw_kernel,
     {"master_ptr": F32, "grad_ptr": BF, "exp_avg_ptr": F32, "exp_avg_sq_ptr": F32, "param_ptr": BF, "step_ptr": F32,
      "grad_scale": F32, "lr": "fp32", "decay": "fp32", "eps": "fp32", "n": "i64"},
     {"BETA1": 0.9, "BETA2": 0.98, "SCALE_IS_PTR": True, "HAS_PARAM": True, "BLOCK": 1024}, 4),
]


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack + local bytes per thread - where spilled registers go) of the cubin's kernel,
    from the cuobjdump that ships with triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out.split("Function")[-1]))
    return int(usage["REG"]), int(usage["STACK"]) + int(usage["LOCAL"])


def _compile_as_launched(kernel, types: dict[str, str], values: dict[str, int], consts: dict, num_warps: int):
    """Compile ``kernel`` for sm_90 with the specialisation the launcher gets at run time: 16-byte aligned pointers,
    and the integer arguments whose ``values`` are multiples of 16 marked as such, as triton does."""
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        sig[p.name] = types[p.name]
        if p.name.endswith("_ptr") or values.get(p.name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _global_accesses(ptx: str) -> set[str]:
    """The distinct global load/store instructions of ``ptx``, and its asynchronous global-to-shared copies as
    ``cp.async.<cache>.<bytes>B``."""
    copies = {f"cp.async.{kind}.{int(size, 0)}B"
              for kind, size in re.findall(r"cp\.async\.(\w+)\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)", ptx)}
    return set(re.findall(r"(?:ld|st)\.global[.\w:]*", ptx)) | copies


def _rotary_as_launched() -> int:
    """Every rotary launch candidate, forward and backward, on the benchmark's q/k (LLM 28/4 x 128, vision 16/16 x
    80, T=16384, bf16) as launched: registers, spills and accesses. Returns the number of failed claims: a spill;
    a store narrower than 16 bytes; a load narrower than 16 bytes other than the 4 cos/sin loads (c1, c2, s1, s2),
    which may be narrower for several tokens per program; and in the one-token default, any narrow access at all
    (a run-time half of 40 once made the head_dim-80 kernel use 2-byte accesses)."""
    failed = 0
    for (hq, hk, d), (block_t, warps), bwd in itertools.product(
            ((28, 4, 128), (16, 16, 80)), rotary._CONFIGS, (False, True)):
        values = {"n_tokens": 16384, "heads_q": hq, "heads_k": hk, "n_q_blocks": triton.cdiv(hq, 16),
                  "stride_qt": hq * d, "stride_qh": d, "stride_kt": hk * d, "stride_kh": d}
        consts = {"HALF": d // 2, "BACKWARD": bwd, "BLOCK_T": block_t, "BLOCK_H": 16,
                  "BLOCK_D": triton.next_power_of_2(d // 2)}
        compiled = _compile_as_launched(rotary._rotary_kernel, ROTARY_TYPES, values, consts, warps)
        regs, spill = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        narrow_loads = len(re.findall(r"ld\.global(?!\.v4\.)[.\w]*", ptx))
        narrow_stores = len(re.findall(r"st\.global(?!\.v4\.)[.\w]*", ptx))
        allowed = 4 if block_t > 1 else 0
        bad = spill > 0 or narrow_stores > 0 or narrow_loads > allowed
        failed += bad
        print(f"rotary {'bwd' if bwd else 'fwd'} {hq}/{hk}x{d} as launched {(block_t, warps)}: regs={regs} "
              f"spill_bytes={spill} accesses={sorted(_global_accesses(ptx))} narrow loads={narrow_loads}"
              f"{' FAILED' if bad else ''}")
    return failed


def _rms_norm_bwd_as_launched() -> int:
    """Every RMSNorm backward candidate at 16384 x 3584 bf16 with a residual gradient, as launched: registers,
    spills, shared memory and the row accesses. Returns the number of failed claims: a spill; a row access
    narrower than 16 bytes below 32 warps (at 32 warps a thread holds 4 of the 4096 columns: 8 bytes); a
    pipelined candidate (stages > 1) whose row loads are not 16-byte cp.async copies into shared memory."""
    failed = 0
    for warps, per_sm, prefetch, stages in rmsnorm._BWD_CONFIGS:
        consts = {"HAS_DS": True, "PREFETCH": prefetch, "STAGES": stages, "BLOCK_N": 4096}
        compiled = _compile_as_launched(rmsnorm._rms_norm_bwd_kernel, RMS_BWD_TYPES,
                                        {"n_rows": 16384, "n_cols": 3584}, consts, warps)
        regs, spill = _resource_usage(compiled.asm["cubin"])
        # the scalar accesses are rstd's (4 bytes, also as a cp.async); the rest are rows (dy, ds, s, dx, w and
        # the dweight partial)
        rows = {a for a in _global_accesses(compiled.asm["ptx"]) if a not in ("ld.global.b32", "cp.async.ca.4B")}
        wide = (".v4.", ".v2.") if warps == 32 else (".v4.",)
        narrow = {a for a in rows if not a.startswith("cp.async") and not any(v in a for v in wide)}
        copies = {a for a in rows if a.startswith("cp.async")}
        bad = spill > 0 or bool(narrow) or (stages > 1 and copies != {"cp.async.cg.16B"})
        failed += bad
        print(f"rms_norm_bwd as launched {(warps, per_sm, prefetch, stages)}: regs={regs} spill_bytes={spill} "
              f"shared={compiled.metadata.shared} accesses={sorted(rows)}{' FAILED' if bad else ''}")
    return failed


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", 90, 32)
    worst_spill = 0
    for name, fn, sig, consts, warps in CASES:
        src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
        regs, spill = _resource_usage(compiled.asm["cubin"])
        worst_spill = max(worst_spill, spill)
        print(f"{name:24s} warps={warps:2d} regs={regs:3d} spill_bytes={spill}")
    failed = _rotary_as_launched() + _rms_norm_bwd_as_launched()
    return 0 if worst_spill == 0 and failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
