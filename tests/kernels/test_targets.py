"""benchmarks/targets.py: issue 4/5 verdicts from benchmark rows (made up here, on a made-up card)."""

from __future__ import annotations

from tests.runtime.helpers import bench_module

ENV = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "sha": "abc1234", "time": "t"}
X = "T=32768,P=32,H=3584"


def _rows(common, specs):
    return [common.Row(kernel, provider, mode, metric, x, p50, p50, p50, **ENV)
            for kernel, provider, mode, metric, x, p50 in specs]


def _verdicts(tmp_path, specs, *args):
    common, targets = bench_module("_common"), bench_module("targets")
    path = tmp_path / "rows.csv"
    common.append_csv(path, _rows(common, specs))
    out = targets.main([str(path), *args])
    return {(line.split(" | ")[1], line.split(" | ")[2]): line.split(" | ")[-1].rstrip(" |")
            for line in out.splitlines() if line.startswith(("| 4 |", "| 5 |"))}


def test_verdicts(tmp_path):
    g = "fwd+bwd graph"
    specs = [
        ("reward_loss", "hf_compile", g, "ms", X, 0.85),
        ("reward_loss", "triton", g, "ms", X, 0.0863),        # 9.85x: not met
        ("reward_loss", "triton_zero_stream", g, "ms", X, 0.078),  # 10.9x and <= 0.10: met
        ("rmsnorm", "triton", g, "ms", "16384x3584", 0.225),
        ("rmsnorm", "triton", g, "pct_copy_bw", "16384x3584", 87.0),
        ("rmsnorm", "hf_compile", g, "ms", "16384x3584", 0.243),  # no Liger row: not measured
        ("swiglu", "triton", g, "ms", "16384x18944", 0.317),
        ("swiglu", "triton", g, "pct_copy_bw", "16384x18944", 99.0),
        ("swiglu", "hf_compile", g, "ms", "16384x18944", 0.316),  # faster than ours: not met
        ("swiglu", "liger", g, "ms", "16384x18944", 0.319),
        ("rotary_llm", "triton", g, "ms", "T=16384", 0.1),
        ("rotary_llm", "triton", g, "pct_copy_bw", "T=16384", 71.0),
        ("varlen_attention", "ours", g, "ms", "windows", 0.30),
        ("varlen_attention", "flex", g, "ms", "windows", 1.71),
        ("varlen_attention", "ours_shared", g, "ms", "pairs", 1.0),
        ("varlen_attention", "ours_duplicated", g, "ms", "pairs", 1.2),
    ]
    v = _verdicts(tmp_path, specs)
    assert v[("reward loss triton: <= 0.10 ms and >= 10x hf_compile", g)] == "NOT met"
    assert v[("reward loss triton_zero_stream: <= 0.10 ms and >= 10x hf_compile", g)] == "met"
    assert v[("RMSNorm: >= 80% of copy, faster than torch.compile and Liger", g)] == "not measured"
    assert v[("SwiGLU: >= 80% of copy, faster than torch.compile and Liger", g)] == "NOT met"
    assert v[("rotary LLM (M-RoPE, hd 128): >= 70% of copy", g)] == "met"
    assert v[("rotary vision (hd 80): >= 70% of copy", g)] == "not measured"
    assert v[("vision windows: <= 0.35 ms and >= 5x FlexAttention", g)] == "met"
    assert v[("shared-prompt pairs: >= 1.3x the tokens/s of duplicated prompts", g)] == "NOT met"
    assert v[("vision full: at least as fast as the SDPA loop, faster than FlexAttention", g)] == "not measured"
    assert v[("reward loss: <= 0.10 ms and >= 10x hf_compile", "fwd+bwd")] == "not measured"


def test_latest_row_wins_and_filters(tmp_path):
    g = "fwd+bwd graph"
    base = [("varlen_attention", "ours", g, "ms", "windows", 0.51), ("varlen_attention", "flex", g, "ms", "windows",
                                                                     1.71)]
    later = [("varlen_attention", "ours", g, "ms", "windows", 0.33)]
    key = ("vision windows: <= 0.35 ms and >= 5x FlexAttention", g)
    assert _verdicts(tmp_path, base)[key] == "NOT met"
    assert _verdicts(tmp_path, later)[key] == "met"  # the same file, the newer row appended
    assert _verdicts(tmp_path, [], "--sha", "fffffff")[key] == "not measured"


def test_cpu_rows_only_on_request(tmp_path):
    common, targets = bench_module("_common"), bench_module("targets")
    path = tmp_path / "rows.csv"
    g = "fwd+bwd graph"
    common.append_csv(path, [common.Row("rotary_vision", "triton", g, metric, "T=16384", p50, p50, p50,
                                        **{**ENV, "gpu": "cpu:x86_64"}) for metric, p50 in (("ms", 1.0),
                                                                                            ("pct_copy_bw", 75.0))])
    key = "| 4 | rotary vision (hd 80): >= 70% of copy | fwd+bwd graph |"
    assert f"{key} - | not measured |" in targets.main([str(path)])
    assert f"{key} 1 ms, 75% of copy | met |" in targets.main([str(path), "--include-cpu"])
