"""Shared benchmark plumbing: timing (CUDA events, or a CPU wall clock), peak memory, environment facts, one CSV
schema, a markdown table, and a measured copy-bandwidth ceiling.

CSV schema (one row per measured number)::

    kernel, provider, mode, metric, x, p50, p20, p80, gpu, torch, triton, sha, time

``metric`` is ``ms`` (p50/p20/p80 of the timed runs), ``peak_MiB`` (allocated above the inputs), ``GB/s`` or
``TFLOP/s`` (from the p50 time) and ``pct_copy_bw`` (GB/s over the measured copy ceiling). A provider that cannot
run here is reported as skipped with its reason and writes no row: never zeros as data.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# git-ignored; RESULTS.md holds curated numbers. VLR_BENCH_CSV overrides it (gpu_check.sh: straight into its LOGDIR,
# so rows survive a run that is killed before it could copy them)
DEFAULT_CSV = Path(os.environ.get("VLR_BENCH_CSV") or REPO / "benchmarks" / "results" / "kernels.csv")
_L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any L2 (H100 50 MB, H200 60 MB)


@dataclass
class Row:
    kernel: str
    provider: str
    mode: str
    metric: str
    x: str
    p50: float
    p20: float
    p80: float
    gpu: str
    torch: str
    triton: str
    sha: str
    time: str


def env_info(device: torch.device) -> dict[str, str]:
    """GPU name (or CPU model), torch/triton versions, git sha (``+dirty`` with local changes), UTC time."""
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = "cpu:" + (platform.processor() or platform.machine())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    # a copy of the tree without .git (the lent GPU machine) is told its sha
    sha = os.environ.get("VLR_GIT_SHA") or _git_sha()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "sha": sha, "time": now}


def _git_sha() -> str:
    """Short HEAD sha, ``+dirty`` with local changes to tracked files, ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


# A call slower than this (timed on the second warm-up call: the first may compile) is a slow baseline, e.g. the
# SDPA loop over 545 windows (~260 ms fwd+bwd): it gets no further warm-up and SLOW_REP timed calls, so it does not
# eat a GPU run's time limit (run D's attention stage ended inside the pairs workload's SDPA loops). Its p20-p80
# spread is still reported. Fast calls are untouched.
SLOW_CALL_MS = 20.0
SLOW_REP = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 10,
    rep: int = 50,
    before_each: Callable[[], None] | None = None,
) -> tuple[float, float, float]:
    """``(p50, p20, p80)`` milliseconds of ``fn()``. On CUDA: CUDA events around each call, L2 flushed before each
    call (so small kernels are not timed hot), ``before_each`` (e.g. clearing ``.grad``) outside the timed region.
    On CPU: wall clock. A call slower than ``SLOW_CALL_MS`` gets ``min(rep, SLOW_REP)`` timed calls."""
    for i in range(warmup):
        if before_each:
            before_each()
        if i != 1:
            fn()
            continue
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if (time.perf_counter() - t0) * 1e3 > SLOW_CALL_MS:
            rep = min(rep, SLOW_REP)
            break
    times: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            if before_each:
                before_each()
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(rep):
            if before_each:
                before_each()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def graph_time_ms(
    fn: Callable[[], object],
    device: torch.device,
    rep: int = 50,
    before_each: Callable[[], None] | None = None,
) -> tuple[float, float, float]:
    """``(p50, p20, p80)`` milliseconds of ONE CUDA-graph replay of ``fn()`` (L2 flushed before each replay): the
    device time of the work with the host's launch and autograd overhead taken out, i.e. what the kernels cost when
    the host runs ahead (a training step's big matrix products hide it) or under whole-step graph capture.
    ``before_each`` runs once before the capture (e.g. clearing ``.grad``, so backward allocates its gradients in
    the graph's pool). Raises when ``fn`` cannot be captured (a host synchronisation inside it)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture needs warmed-up kernels/allocations made on a side stream first
        for _ in range(3):
            if before_each:
                before_each()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    if before_each:
        before_each()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return time_ms(graph.replay, device, warmup=3, rep=rep)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB allocated at peak by ``fn()`` above what was allocated before it; None on CPU (not measurable)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, rep: int = 20) -> float:
    """Measured device copy bandwidth (GB/s, bytes read + bytes written) of ``dst.copy_(src)`` on ``nbytes``."""
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)  # never time on zeros/garbage
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src), device, warmup=3, rep=rep)
    return 2 * nbytes / (p50 * 1e-3) / 1e9


class Recorder:
    """Collects rows for one benchmark run, appends each to the CSV as it comes and prints the markdown table."""

    def __init__(self, kernel: str, device: torch.device, csv_path: Path | None = DEFAULT_CSV):
        self.kernel = kernel
        self.device = device
        self.env = env_info(device)
        self.csv_path = csv_path
        self.rows: list[Row] = []
        self.skipped: list[str] = []

    def add(self, provider: str, mode: str, metric: str, x: str, p50: float, p20: float | None = None,
            p80: float | None = None) -> None:
        p20 = p50 if p20 is None else p20
        p80 = p50 if p80 is None else p80
        row = Row(self.kernel, provider, mode, metric, x, p50, p20, p80, **self.env)
        self.rows.append(row)
        if self.csv_path is not None:  # at once: a run killed by its time limit keeps the rows it measured
            append_csv(self.csv_path, [row])
        if metric == "ms":  # as measured: a run killed by its time limit still shows what it timed
            print(f"[{self.kernel}] {x} {provider} {mode}: {p50:.4g} ms [{p20:.4g}-{p80:.4g}]", flush=True)

    def p50(self, provider: str, mode: str, x: str, metric: str = "ms") -> float | None:
        """The latest recorded median of ``provider``'s ``mode`` on ``x`` (None when it was not measured)."""
        hits = [r.p50 for r in self.rows if (r.provider, r.mode, r.metric, r.x) == (provider, mode, metric, x)]
        return hits[-1] if hits else None

    def skip(self, provider: str, reason: str) -> None:
        self.skipped.append(f"{provider}: {reason}")
        print(f"[{self.kernel}] skipped {provider}: {reason}", flush=True)

    def measure(
        self,
        provider: str,
        x: str,
        modes: dict[str, tuple[Callable[[], object], Callable[[], None] | None]],
        bytes_moved: dict[str, int] | None = None,
        ceiling_gbps: float | None = None,
        warmup: int = 10,
        rep: int = 50,
        graph_modes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    ) -> None:
        """Time each ``mode -> (fn, before_each)`` and record ms, peak MiB and (with ``bytes_moved[mode]``)
        GB/s and the fraction of ``ceiling_gbps``; on CUDA the ``graph_modes`` again as graph replays (see
        :meth:`measure_graphed`). A failure in one provider is recorded as a skip."""
        try:
            for mode, (fn, before_each) in modes.items():
                p50, p20, p80 = time_ms(fn, self.device, warmup, rep, before_each)
                self.add(provider, mode, "ms", x, p50, p20, p80)
                if before_each:
                    before_each()
                mem = peak_mib(fn, self.device)
                if mem is not None:
                    self.add(provider, mode, "peak_MiB", x, mem)
                self._add_bandwidth(provider, mode, x, p50, (bytes_moved or {}).get(mode), ceiling_gbps)
        except Exception as exc:  # noqa: BLE001 - one broken provider must not hide the others' numbers
            self.skip(provider, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            return
        if self.device.type == "cuda":
            self.measure_graphed(provider, x, modes, bytes_moved, ceiling_gbps, rep, graph_modes)

    def measure_graphed(
        self,
        provider: str,
        x: str,
        modes: dict[str, tuple[Callable[[], object], Callable[[], None] | None]],
        bytes_moved: dict[str, int] | None,
        ceiling_gbps: float | None,
        rep: int,
        graph_modes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    ) -> None:
        """The ``graph_modes`` among ``modes`` again as CUDA-graph replays (mode ``<mode> graph``): device time
        without host overhead. By default ``fwd`` and ``fwd+bwd``: an autograd ``bwd`` mode cannot be replayed
        (its graph is freed); modes that are plain launches (a kernel's backward launcher, an optimizer step) can
        be. A provider that cannot be captured gets a skip line for its graph modes only."""
        for mode in graph_modes:
            if mode not in modes:
                continue
            fn, before_each = modes[mode]
            try:
                p50, p20, p80 = graph_time_ms(fn, self.device, rep, before_each)
            except Exception as exc:  # noqa: BLE001 - e.g. a provider that synchronises with the host
                torch.cuda.synchronize(self.device)
                self.skip(f"{provider} ({mode} graph)", f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                continue
            self.add(provider, f"{mode} graph", "ms", x, p50, p20, p80)
            self._add_bandwidth(provider, f"{mode} graph", x, p50, (bytes_moved or {}).get(mode), ceiling_gbps)

    def _add_bandwidth(self, provider: str, mode: str, x: str, p50_ms: float, nbytes: int | None,
                       ceiling_gbps: float | None) -> None:
        """GB/s of moving ``nbytes`` in ``p50_ms`` and its share of the copy ceiling (nothing without a byte
        count)."""
        if nbytes is None:
            return
        gbps = nbytes / (p50_ms * 1e-3) / 1e9
        self.add(provider, mode, "GB/s", x, gbps)
        if ceiling_gbps:
            self.add(provider, mode, "pct_copy_bw", x, 100.0 * gbps / ceiling_gbps)

    def run_providers(
        self,
        providers: dict[str, Callable[[], Callable[[], object]]],
        x: str,
        backward: Callable[[object], None],
        params: Sequence[torch.Tensor],
        bytes_moved: dict[str, int] | None,
        ceiling_gbps: float | None,
        selected: str = "",
        warmup: int = 10,
        rep: int = 50,
    ) -> None:
        """For each ``name -> make`` (``make()`` builds the forward callable; raising there = provider
        unavailable), time fwd / bwd / fwd+bwd via :func:`training_modes`."""
        for name, make in providers.items():
            if not want(name, selected):
                continue
            try:
                forward = make()
            except Exception as exc:  # noqa: BLE001 - a missing optional provider is reported, not fatal
                self.skip(name, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                continue
            self.measure(name, x, training_modes(forward, backward, params), bytes_moved, ceiling_gbps, warmup, rep)

    def finish(self) -> str:
        """The markdown table of the run's rows (also printed; the CSV got each row as it was added)."""
        table = markdown_table(self.rows, self.env)
        print(table, flush=True)
        return table


def time_forced_candidates(rec: Recorder, module: object, attr: str, name_of: Callable[[object], str],
                           launches: dict[str, Callable[[], object]], x: str, bytes_moved: dict[str, int],
                           ceiling_gbps: float, warmup: int, rep: int) -> None:
    """``--candidates``: each launch candidate in ``module.<attr>`` forced alone in turn (a single candidate is
    launched without timing or caching by ``vlr_kernels._tune``), its ``launches`` (mode -> plain re-runnable
    call) timed host-launched and, on CUDA, as graph replays; one provider ``name_of(candidate)`` each. The tuner
    keeps only the fastest; these rows check each candidate's prediction in benchmarks/NOTES.md. The candidate
    table and the tuner's picks are restored afterwards."""
    from vlr_kernels import _tune

    configs, picked = getattr(module, attr), dict(_tune._PICKED)
    try:
        for cfg in configs:
            setattr(module, attr, (cfg,))
            _tune._PICKED.clear()
            name, first = name_of(cfg), len(rec.rows)
            rec.measure(name, x, {mode: (fn, None) for mode, fn in launches.items()}, bytes_moved, ceiling_gbps,
                        warmup, rep, graph_modes=tuple(launches))
            print(f"[{rec.kernel}] {name}: " + ", ".join(f"{r.mode} {r.p50:.4f} ms" for r in rec.rows[first:]
                                                         if r.metric == "ms"), flush=True)
    finally:
        setattr(module, attr, configs)
        _tune._PICKED.clear()
        _tune._PICKED.update(picked)


def append_csv(path: Path, rows: Sequence[Row]) -> None:
    """Append ``rows`` to ``path`` in the one schema; writes the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def markdown_table(rows: Sequence[Row], env: dict[str, str] | None = None) -> str:
    """One line per (kernel, x, provider, mode): p50 ms [p20-p80], peak MiB, GB/s, % of copy bandwidth."""
    by_key: dict[tuple[str, str, str, str], dict[str, Row]] = {}
    for r in rows:
        by_key.setdefault((r.kernel, r.x, r.provider, r.mode), {})[r.metric] = r
    lines = []
    if env:
        lines.append(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['sha']} | {env['time']}")
        lines.append("")
    lines.append("| kernel | x | provider | mode | ms p50 [p20-p80] | peak MiB | GB/s | % copy bw |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (kernel, x, provider, mode), m in by_key.items():
        ms = m.get("ms")
        ms_s = f"{ms.p50:.4f} [{ms.p20:.4f}-{ms.p80:.4f}]" if ms else ""
        mem = f"{m['peak_MiB'].p50:.1f}" if "peak_MiB" in m else ""
        gbps = f"{m['GB/s'].p50:.3g}" if "GB/s" in m else ""
        pct = f"{m['pct_copy_bw'].p50:.0f}%" if "pct_copy_bw" in m else ""
        lines.append(f"| {kernel} | {x} | {provider} | {mode} | {ms_s} | {mem} | {gbps} | {pct} |")
    return "\n".join(lines)


def training_modes(
    forward: Callable[[], object], backward: Callable[[object], None], params: Sequence[torch.Tensor]
) -> dict[str, tuple[Callable[[], object], Callable[[], None] | None]]:
    """``fwd`` / ``bwd`` / ``fwd+bwd`` callables for :meth:`Recorder.measure`. Gradients are cleared before every
    call so each backward allocates its gradients (as a training step does); ``bwd`` times only the backward of a
    forward run just before it, outside the timed region."""
    state: dict[str, object] = {}

    def clear() -> None:
        for p in params:
            p.grad = None

    def fresh_forward() -> None:
        clear()
        state["out"] = forward()

    return {
        "fwd": (forward, clear),
        "bwd": (lambda: backward(state.pop("out")), fresh_forward),
        "fwd+bwd": (lambda: backward(forward()), clear),
    }


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --quick (tiny CPU-sized shapes), --dtype, --csv, --rep."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few reps (CPU smoke run)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="CSV to append rows to")
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--providers", default="", help="comma-separated subset of providers (default: all)")
    return p


def bench_device() -> torch.device:
    """CUDA when present, else CPU (where triton runs only under TRITON_INTERPRET=1)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def want(provider: str, selected: str) -> bool:
    """True when ``provider`` is in the comma-separated ``selected`` list (empty = all)."""
    return not selected or provider in selected.split(",")


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` with static shapes; failures surface at the first call (recorded as a skip)."""
    return torch.compile(fn, dynamic=False)
