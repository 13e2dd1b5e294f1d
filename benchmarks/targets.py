"""Issues 4 and 5's GPU targets evaluated on benchmark rows: one line per target and mode (host-launched, graph)
with what was measured, the threshold and a verdict (met / NOT met / not measured), so that curating a GPU run
into RESULTS.md starts from the rows themselves, not from reading tables.

    python benchmarks/targets.py LOGDIR/kernels.csv          # rows of a gpu_check.sh run (VLR_BENCH_CSV)
    python benchmarks/targets.py kernels.csv --sha b99c228   # only that commit's rows

Rows: the CSV that every benchmark appends to (``_common.Recorder``); GPU rows only unless ``--include-cpu``; the
latest row wins where a (kernel, provider, mode, metric, x) was measured more than once. A target whose rows are
missing is "not measured", never met.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_CSV
from bench_reward_loss import OURS as REWARD_OURS  # our reward-loss providers: one list for both

MODES = ("fwd+bwd", "fwd+bwd graph")


@dataclass
class Verdict:
    issue: int
    target: str
    mode: str
    measured: str
    ok: bool | None  # None: not measured

    def line(self) -> str:
        word = {True: "met", False: "NOT met", None: "not measured"}[self.ok]
        return f"| {self.issue} | {self.target} | {self.mode} | {self.measured} | {word} |"


class Rows:
    """The latest p50 of each (kernel, provider, mode, metric, x)."""

    def __init__(self, rows: list[dict[str, str]]):
        self.p50: dict[tuple[str, str, str, str, str], float] = {}
        self.xs: dict[str, list[str]] = {}
        for r in rows:
            self.p50[(r["kernel"], r["provider"], r["mode"], r["metric"], r["x"])] = float(r["p50"])
            if r["provider"] != "copy" and r["x"] not in self.xs.setdefault(r["kernel"], []):
                self.xs[r["kernel"]].append(r["x"])

    def get(self, kernel: str, provider: str, mode: str, metric: str = "ms", x: str | None = None) -> float | None:
        """``x`` None: the kernel's latest workload (the benchmarks of issue 4 run one shape per kernel)."""
        if x is None:
            xs = self.xs.get(kernel)
            if not xs:
                return None
            x = xs[-1]
        return self.p50.get((kernel, provider, mode, metric, x))


def _reward_loss(rows: Rows, mode: str) -> list[Verdict]:
    base = rows.get("reward_loss", "hf_compile", mode)
    out = []
    for name in REWARD_OURS:
        ms = rows.get("reward_loss", name, mode)
        if ms is None:
            continue
        if base is None:
            out.append(Verdict(4, f"reward loss {name}: <= 0.10 ms and >= 10x hf_compile", mode,
                               f"{ms:.4g} ms, no hf_compile row", None))
            continue
        ratio = base / ms
        out.append(Verdict(4, f"reward loss {name}: <= 0.10 ms and >= 10x hf_compile", mode,
                           f"{ms:.4g} ms, {ratio:.2f}x ({base:.4g} ms)", ms <= 0.10 and ratio >= 10))
    return out or [Verdict(4, "reward loss: <= 0.10 ms and >= 10x hf_compile", mode, "-", None)]


def _bandwidth_and_peers(kernel: str, label: str, floor: float) -> Callable[[Rows, str], list[Verdict]]:
    def check(rows: Rows, mode: str) -> list[Verdict]:
        ours, pct = rows.get(kernel, "triton", mode), rows.get(kernel, "triton", mode, "pct_copy_bw")
        if ours is None or pct is None:
            return [Verdict(4, f"{label}: >= {floor:.0f}% of copy, faster than torch.compile and Liger", mode, "-",
                            None)]
        peers = {p: rows.get(kernel, p, mode) for p in ("hf_compile", "liger")}
        text = f"{ours:.4g} ms, {pct:.0f}% of copy; " + ", ".join(
            f"{p} {ms:.4g}" if ms is not None else f"{p} -" for p, ms in peers.items())
        ok: bool | None = pct >= floor and all(ms is None or ours < ms for ms in peers.values())
        if ok and any(ms is None for ms in peers.values()):
            ok = None  # a peer was not measured: "faster than" is unknown
        return [Verdict(4, f"{label}: >= {floor:.0f}% of copy, faster than torch.compile and Liger", mode, text,
                        ok)]
    return check


def _bandwidth(kernel: str, label: str, floor: float) -> Callable[[Rows, str], list[Verdict]]:
    def check(rows: Rows, mode: str) -> list[Verdict]:
        pct = rows.get(kernel, "triton", mode, "pct_copy_bw")
        ms = rows.get(kernel, "triton", mode)
        return [Verdict(4, f"{label}: >= {floor:.0f}% of copy", mode,
                        "-" if pct is None else f"{ms:.4g} ms, {pct:.0f}% of copy",
                        None if pct is None else pct >= floor)]
    return check


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _attention(rows: Rows, mode: str) -> list[Verdict]:
    def ms(provider: str, x: str) -> float | None:
        return rows.get("varlen_attention", provider, mode, x=x)

    out = []
    win, flex = ms("ours", "windows"), ms("flex", "windows")
    out.append(Verdict(5, "vision windows: <= 0.35 ms and >= 5x FlexAttention", mode,
                       "-" if win is None else f"{win:.4g} ms" + (f", {flex / win:.2f}x flex" if flex else ", no flex"),
                       None if win is None or flex is None else win <= 0.35 and flex / win >= 5))
    for x, label in (("full", "vision full"), ("llm", "LLM causal")):
        ours, loop, fl = ms("ours", x), ms("sdpa_loop", x), ms("flex", x)
        text = "-" if ours is None else f"{ours:.4g} ms; sdpa_loop {_ms(loop)}, flex {_ms(fl)}"
        ok = None if ours is None or loop is None or fl is None else ours <= loop and ours < fl
        out.append(Verdict(5, f"{label}: at least as fast as the SDPA loop, faster than FlexAttention", mode, text,
                           ok))
    shared, dup = ms("ours_shared", "pairs"), ms("ours_duplicated", "pairs")
    out.append(Verdict(5, "shared-prompt pairs: >= 1.3x the tokens/s of duplicated prompts", mode,
                       "-" if shared is None or dup is None else f"{dup / shared:.2f}x ({shared:.4g} vs {dup:.4g} ms)",
                       None if shared is None or dup is None else dup / shared >= 1.3))
    return out


CHECKS: list[Callable[[Rows, str], list[Verdict]]] = [
    _reward_loss,
    _bandwidth_and_peers("rmsnorm", "RMSNorm", 80),
    _bandwidth_and_peers("rmsnorm+residual", "RMSNorm + residual", 80),
    _bandwidth_and_peers("swiglu", "SwiGLU", 80),
    _bandwidth("rotary_llm", "rotary LLM (M-RoPE, hd 128)", 70),
    _bandwidth("rotary_vision", "rotary vision (hd 80)", 70),
    _attention,
]


def evaluate(rows: list[dict[str, str]]) -> list[Verdict]:
    table = Rows(rows)
    return [v for mode in MODES for check in CHECKS for v in check(table, mode)]


def load(paths: list[Path], sha: str | None, include_cpu: bool) -> list[dict[str, str]]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f)
                     if (include_cpu or not r["gpu"].startswith("cpu")) and (sha is None or r["sha"].startswith(sha))]
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="*", type=Path, default=[DEFAULT_CSV])
    p.add_argument("--sha", default=None, help="only rows of commits starting with this")
    p.add_argument("--include-cpu", action="store_true", help="also rows measured on a CPU (smoke runs)")
    args = p.parse_args(argv)
    rows = load(args.csv, args.sha, args.include_cpu)
    cards = sorted({r["gpu"] for r in rows}) or ["no rows"]
    out = "\n".join([f"cards: {'; '.join(cards)}", "", "| issue | target | mode | measured | verdict |",
                     "| --- | --- | --- | --- | --- |", *(v.line() for v in evaluate(rows))])
    print(out)
    return out


if __name__ == "__main__":
    main()
