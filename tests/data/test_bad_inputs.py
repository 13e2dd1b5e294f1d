"""Every kind of bad row gets its counted, named outcome; the good rows all arrive; nothing crashes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.helpers import make_model_dir, pair_row, write_bad_inputs, write_jsonl
from vlr_runtime.data.collate import Preprocessor
from vlr_runtime.data.loader import LoaderConfig, PairLoader
from vlr_runtime.data.validate import format_report, validate
from vlr_runtime.data.validate import main as validate_main

BUDGET = 600


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad")
    data, expected = write_bad_inputs(root)
    return make_model_dir(root / "model"), data, expected


def test_loader_counts_each_bad_row_and_delivers_the_rest(setup) -> None:
    model, data, expected = setup
    cfg = LoaderConfig(pairs_per_step=5, token_budget=BUDGET, seed=3)
    loader = PairLoader(data, Preprocessor(model), cfg)
    n_rows = loader.num_rows
    seen, rejected = [], {}
    for sb in loader:
        for mb in sb.microbatches:
            if mb is not None:
                seen += mb.sample_ids
                assert mb.num_tokens <= BUDGET
        for rid, reason in sb.rejected_global + sb.rejected_local:
            rejected[rid] = reason
        if sb.step * cfg.pairs_per_step + cfg.pairs_per_step >= n_rows:
            break
    assert rejected == expected
    assert sorted(seen) == ["good-1", "good-2", "good-3", "good-4"]
    assert sum(loader.rejected_counts.values()) == len(expected)


def test_validate_function_and_cli(setup, capsys) -> None:
    model, data, expected = setup
    report = validate(data, Preprocessor(model), token_budget=BUDGET)
    assert report.ok == 4 and report.rows == 4 + len(expected)
    assert sum(report.reasons.values()) == len(expected)
    text = format_report(report)
    assert "image_bomb" in text and "tokens/row" in text

    out = subprocess.run(
        [sys.executable, "-m", "vlr_runtime.data.validate", str(data), "--model", str(model), "--json",
         "--token-budget", str(BUDGET)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert {r["id"]: r["reason"] for r in rows if r["status"] == "rejected"} == expected
    assert sorted(r["id"] for r in rows if r["status"] == "ok") == ["good-1", "good-2", "good-3", "good-4"]
    assert summary["summary"] and summary["ok"] == 4

    assert validate_main([str(data.parent / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_training_loader_refuses_ranking_rows(setup, tmp_path) -> None:
    model, _, _ = setup
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        pair_row("pair", []), {"id": "rank", "query": "Q?", "response": ["a", "b"], "human_ranking": [0, 1]}])
    sb = next(iter(PairLoader(data, Preprocessor(model), LoaderConfig(pairs_per_step=2, token_budget=BUDGET))))
    assert sb.rejected_global == [("rank", "bad_field")]
    assert [mb.sample_ids for mb in sb.microbatches] == [["pair"]]
