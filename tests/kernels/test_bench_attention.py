"""``benchmarks/bench_attention.py`` on the CPU: the quick workloads run end to end through the Triton interpreter
(our kernels with the launch configurations the tuner picks, every candidate with ``--candidates``), and a provider
whose gradients disagree with the SDPA loop is reported and not timed."""

from __future__ import annotations

import csv

import torch

from tests.runtime.helpers import bench_module, run_quick_benchmark


def test_quick_run_checks_and_times_every_provider(tmp_path):
    out_csv = tmp_path / "rows.csv"
    stdout = run_quick_benchmark("bench_attention.py", out_csv, 300, "--dtype", "float32", "--workloads",
                                 "windows,pairs", "--candidates", interpret=True)
    # output and gradients checked against the SDPA loop before timing, every provider that runs here
    for line in ("[windows] ours: max |x - sdpa_loop|", "[pairs] ours_shared: max |x - sdpa_loop|",
                 "[pairs] ours_duplicated: max |x - sdpa_loop|", "[windows] sdpa_padded: max |x - sdpa_loop|"):
        assert line in stdout, stdout[-3000:]
    assert "disagrees with the SDPA loop" not in stdout
    # pairs: ours shared and ours duplicated (the target's pair) before the peers, which a time limit may cut
    order = [stdout.index(f"[pairs] {p}: max") for p in ("ours_shared", "ours_duplicated", "sdpa_loop_shared",
                                                         "sdpa_loop_duplicated")]
    assert order == sorted(order), order
    rows = list(csv.DictReader(out_csv.open()))
    timed = {(r["x"], r["provider"], r["mode"]) for r in rows if r["metric"] == "ms"}
    for x, provider in (("windows", "ours"), ("pairs", "ours_shared"), ("pairs", "ours_duplicated")):
        assert {(x, provider, m) for m in ("fwd", "bwd", "fwd+bwd")} <= timed
    # --candidates: the persistent window kernels among the forced-candidate rows
    assert any("persist" in p for _, p, _ in timed), sorted(timed)


def test_disagreeing_gradients_are_reported_not_timed(tmp_path):
    ba = bench_module("bench_attention")
    Recorder = bench_module("_common").Recorder

    class DoubleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    w = next(w for w in ba.workloads(quick=True) if w.name == "windows")
    device = torch.device("cpu")
    ref = ba.ours(w, device, "sdpa")
    rec = Recorder("varlen_attention", device, None)
    ba.bench(rec, w, "wrong_dq", lambda: lambda q, k, v: ref(DoubleGrad.apply(q), k, v), device, torch.float32, 0, 1)
    ba.bench(rec, w, "right", lambda: ref, device, torch.float32, 0, 1)
    assert any(s.startswith("wrong_dq: windows: disagrees with the SDPA loop") and "'dq'" in s for s in rec.skipped)
    assert {r.provider for r in rec.rows if r.metric == "ms"} == {"right"}


def test_progress_prints_every_timed_candidate_once(monkeypatch, capsys):
    """The tuner's own per-candidate times (recorded on the GPU while it picks) are printed once per key with each
    candidate described as in the --candidates rows."""
    ba = bench_module("bench_attention")
    Recorder = bench_module("_common").Recorder
    from vlr_kernels import _tune

    win = {"WINDOW": 1, "BLOCK": 64, "HEADS": 1, "STAGES": 3, "PERSIST": 1, "PROGS": 1, "RECOMPUTE": 1,
           "num_warps": 8, "num_stages": 2}
    tile = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "FLAT": False, "SPLIT": False,
            "ATOMIC_DQ": True}
    monkeypatch.setattr(_tune, "_TIMES", {("dkdv", 80, 64, 64): [(win, 0.25), (tile, float("inf"))]})
    monkeypatch.setattr(ba, "_PRINTED", set())
    rec = Recorder("varlen_attention", torch.device("cpu"), None)
    ba._progress(rec, "windows")
    ba._progress(rec, "windows")
    out = capsys.readouterr().out
    line = "[varlen_attention] tuner timings ('dkdv', 80, 64, 64): ours dkdv 64x64 persist1/SM pipe3 window w8 s2 " \
           "recompute 0.25 ms; ours dkdv 64x128 w8 s3 atomic_dq inf ms"
    assert out.count("tuner timings") == 1 and line in out, out
