"""``benchmarks/bench_vision_split.py --quick`` runs end to end on the CPU with 2 gloo ranks: the split and the
replicated tower give the same output, the patch shares are the balanced ones, and the table and CSV rows exist."""

import csv
import re

from tests.runtime.helpers import run_quick_benchmark

QUICK_PATCHES_PER_RANK = [96, 112]
"""Quick images of 64, 32, 96, 16 patches: their middle patches (32, 80, 144, 200 of 208) fall in halves 0, 0, 1, 1."""


def test_bench_vision_split_quick(tmp_path):
    out_csv = tmp_path / "rows.csv"
    stdout = run_quick_benchmark("bench_vision_split.py", out_csv, timeout_s=150)
    table = stdout[stdout.index("| rank | images | patches |"):]  # the markdown table comes last
    rows = [line.split("|")[1:-1] for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r[2]) for r in rows] == QUICK_PATCHES_PER_RANK
    assert all(re.fullmatch(r" \d+\.\d+x ", r[5]) for r in rows)
    assert "analytic: patches 208/112 = 1.86x" in table
    assert re.search(r"encode alone \(.*\): all images \d+\.\d ms / largest share = \d+\.\d\dx", table)
    assert all(re.fullmatch(r" \d+\.\d \[\d+\.\d-\d+\.\d\] ", r[6]) for r in rows)  # both ranks own images
    check = re.search(r"output check: max \|split - replicated\| / max \|replicated\| = (\S+) \(ok,", table)
    assert check and float(check.group(1)) <= 1e-6
    written = list(csv.DictReader(out_csv.open()))
    metrics = {(r["provider"], r["metric"]) for r in written}
    assert {("split", "ms"), ("replicated", "ms"), ("replicated/split", "ratio"), ("analytic patches", "ratio"),
            ("analytic FLOPs", "ratio"), ("encode alone all/largest share", "ratio"), ("share alone", "ms"),
            ("all alone", "ms"), ("split_vs_replicated", "max_rel_diff")} <= metrics
    assert sorted(float(r["p50"]) for r in written if r["metric"] == "patches") == QUICK_PATCHES_PER_RANK
    assert all(float(r["p50"]) > 0 for r in written if r["metric"] in ("ms", "ratio"))
