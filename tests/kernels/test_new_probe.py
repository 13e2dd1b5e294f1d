"""gpu_check.sh's new-candidate probe verdict (tests/kernels/new_probe.py) from pytest -v logs."""

from __future__ import annotations

import pytest
from vlr_kernels.attention.varlen_tiles import candidate_id, launch_candidates
from vlr_kernels.attention.varlen_windows import window_candidates

from tests.kernels.helpers import pretend_new_tiles
from tests.kernels.new_probe import allowed_new_candidates
from tests.kernels.test_attention_gpu import CASES, _candidate_cases, candidate_test_id

NODE = "tests/kernels/test_attention_gpu.py::test_every_candidate_bf16_rule"


@pytest.fixture(autouse=True)
def _past_candidates_new(monkeypatch):
    """No candidate is new since run G: the ones runs E and G ran are marked new again, so that the verdict is
    tested over many candidates, kernels and cases (the ones those runs' probes had)."""
    pretend_new_tiles(monkeypatch)


def _new_tests():
    return [(case, configs, candidate_test_id(case, configs, True)) for case, configs, new in _candidate_cases() if new]


def _log(outcome_of, xdist: bool) -> str:
    lines = ["============================= test session starts =============================="]
    for i, (_, _, tid) in enumerate(_new_tests()):
        outcome = outcome_of(tid)
        if outcome is None:
            continue  # not reached (time limit)
        lines.append(f"[gw{i % 4}] [ {i}%] {outcome} {NODE}[{tid}]" if xdist else f"{NODE}[{tid}] {outcome} [ {i}%]")
    return "\n".join(lines)


def test_all_none_and_some():
    tests = _new_tests()
    assert len(tests) > 10 and all(tid.endswith("-new") for _, _, tid in tests)
    # the first window test fails, the last test is not reached: every other candidate is listed, by name
    fail, missing = next(t for t in tests if t[0] == "windows"), tests[-1]

    def some(tid):
        return "FAILED" if tid == fail[2] else (None if tid == missing[2] else "PASSED")

    for xdist in (False, True):
        assert allowed_new_candidates(_log(lambda tid: "PASSED", xdist)) == "1"
        assert allowed_new_candidates(_log(lambda tid: "FAILED", xdist)) == "0"
        assert allowed_new_candidates(_log(lambda tid: None, xdist)) == "0"
        verdict = allowed_new_candidates(_log(some, xdist))
        names = verdict.split(",")
        expected = []
        for case, configs, tid in tests:
            (kernel, cfg), = configs.items()
            name = candidate_id(kernel, CASES[case][3], cfg)
            if tid not in (fail[2], missing[2]) and name not in expected:
                expected.append(name)
        assert names == expected and len(set(names)) == len(names)


def test_a_candidate_tested_twice_needs_both():
    """The flat dK/dV candidates run under the LLM and the shared-prompt case: one failure keeps the candidate
    out; a FAILED line after a PASSED one (a rerun, a summary) counts."""
    tests = _new_tests()
    by_name: dict[str, list[str]] = {}
    for case, configs, tid in tests:
        (kernel, cfg), = configs.items()
        by_name.setdefault(candidate_id(kernel, CASES[case][3], cfg), []).append(tid)
    name, tids = next((n, t) for n, t in by_name.items() if len(t) > 1)
    verdict = allowed_new_candidates(_log(lambda tid: "FAILED" if tid == tids[1] else "PASSED", False))
    assert name not in verdict.split(",") and verdict not in ("0", "1")
    log = _log(lambda tid: "PASSED", True) + f"\nFAILED {NODE}[{tids[0]}] - AssertionError"
    assert name not in allowed_new_candidates(log).split(",")


def test_names_are_what_the_tuner_filters_by(monkeypatch):
    """The verdict, set as VLR_ATTN_NEW, admits exactly the passing candidates to the tuner's lists."""
    tests = _new_tests()
    fail = next(t for t in tests if t[0] == "vision_full" and "dq" in t[1])
    verdict = allowed_new_candidates(_log(lambda tid: "FAILED" if tid == fail[2] else "PASSED", False))
    monkeypatch.setenv("VLR_ATTN_NEW", verdict)
    (kernel, cfg), = fail[1].items()
    lens, _, _, d, _, _ = CASES["vision_full"]
    assert cfg not in launch_candidates(d, max(lens), max(lens), kernel)
    assert len(launch_candidates(d, max(lens), max(lens), kernel)) == len(launch_candidates(
        d, max(lens), max(lens), kernel, new=True)) - 1
    wl, hq, _, wd, _, _ = CASES["windows"]
    assert window_candidates(wd, max(wl), max(wl), hq, 1, "fwd") == window_candidates(wd, max(wl), max(wl), hq, 1,
                                                                                        "fwd", new=True)
