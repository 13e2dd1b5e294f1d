"""Run every kernel benchmark (the scripts in ``KERNEL_BENCHMARKS``, some in several configurations) each as its own
process, then print all their markdown tables together at the end. Data-path and end-to-end benchmarks have their
own entry points.

    python benchmarks/run_all.py            # full sizes on the GPU, rows appended to benchmarks/results/kernels.csv
    python benchmarks/run_all.py --quick    # tiny shapes: a CPU smoke run (Triton through TRITON_INTERPRET=1)

A benchmark that fails is reported with its exit status and the tail of its output; the others still run. Exit
status: the number of failed benchmarks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# script -> the extra arguments of each configuration it runs in; a script not present here yet is skipped
# (in the order they run: the open targets first, so a time limit cuts the measured ones). A configuration's label
# is the script name and its arguments joined by spaces (what --skip takes).
KERNEL_BENCHMARKS = {
    "bench_reward_loss.py": [[], ["--prenormed"]],
    "bench_rotary.py": [["--config", "llm"], ["--config", "vision"]],
    "bench_swiglu.py": [[]],
    "bench_rmsnorm.py": [[], ["--residual"]],  # met in run C
    "bench_adamw.py": [[]],
    "bench_attention.py": [[]],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--rep", default=None)
    p.add_argument("--providers", default=None, help="passed to every benchmark")
    p.add_argument("--only", default="", help="comma-separated script names (default: all kernel benchmarks)")
    p.add_argument("--skip", default="", help="comma-separated configuration labels to leave out, e.g. "
                   "'bench_reward_loss.py --prenormed'")
    p.add_argument("--timeout-s", type=int, default=1800)
    args = p.parse_args()
    common = ["--quick"] if args.quick else []
    for flag in ("dtype", "csv", "rep", "providers"):
        if getattr(args, flag) is not None:
            common += [f"--{flag}", str(getattr(args, flag))]
    env = dict(os.environ)
    if args.quick and env.get("TRITON_INTERPRET") is None:
        env["TRITON_INTERPRET"] = "1"  # harmless on a GPU box; needed for the triton provider on CPU
    names = [n for n in KERNEL_BENCHMARKS if not args.only or n in args.only.split(",")]
    skip = {label.strip() for label in args.skip.split(",") if label.strip()}
    tables, failures = [], []
    for name in names:
        script = HERE / name
        if not script.exists():
            print(f"=== {name}: not present, skipped", flush=True)
            continue
        for extra in KERNEL_BENCHMARKS[name]:
            cmd = [sys.executable, str(script), *extra, *common]
            label = " ".join([script.name, *extra])
            if label in skip:
                print(f"=== {label}: skipped (--skip)", flush=True)
                continue
            print(f"=== {label}", flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, env=env,
                                      check=False)
            except subprocess.TimeoutExpired as exc:
                # what it printed before the kill (its rows are printed as measured)
                partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
                print((partial or "")[-20000:], flush=True)
                failures.append(f"{label}: timed out after {args.timeout_s} s")
                continue
            print(proc.stdout[-20000:], proc.stderr[-4000:] if proc.returncode else "", sep="\n", flush=True)
            if proc.returncode:
                failures.append(f"{label}: exit {proc.returncode}")
            else:
                tables.append(_last_table(proc.stdout))
    print("\n\n## All kernel benchmarks\n")
    print("\n\n".join(tables))
    for f in failures:
        print(f"FAILED {f}")
    return len(failures)


def _last_table(stdout: str) -> str:
    """The markdown table each benchmark prints last (its header line starts with the card/CPU name)."""
    lines = stdout.rstrip().splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith("| kernel |")), default=len(lines))
    header = start - 2 if start >= 2 else start
    return "\n".join(lines[header:])


if __name__ == "__main__":
    sys.exit(main())
