"""The value of ``VLR_ATTN_NEW`` after ``benchmarks/gpu_check.sh``'s new-candidate probe: the names
(:func:`vlr_kernels.attention.varlen_tiles.candidate_id`) of the launch candidates never run on a GPU before whose
every GPU test passed in the probe's log, so that one failing (or crashing, or not reached before the probe's time
limit) candidate keeps only itself from the benchmarks' tuner, not all of them.

    python -m tests.kernels.new_probe LOGDIR/new_probe.log     # prints 1 (all passed), 0 (none) or a name list

Reads ``pytest -v`` lines with or without pytest-xdist: ``...::test_every_candidate_bf16_rule[<id>] PASSED`` or
``[gw0] [ 4%] PASSED ...::test_every_candidate_bf16_rule[<id>]``. A test counts as passed only with a PASSED line
and no FAILED or ERROR line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from vlr_kernels.attention.varlen_tiles import candidate_id

from tests.kernels.test_attention_gpu import CASES, _candidate_cases, candidate_test_id

_TEST = r"::test_every_candidate_bf16_rule\[([^\]\s]+)\]"
_BEFORE = re.compile(r"\b(PASSED|FAILED|ERROR)\s+\S*" + _TEST)
_AFTER = re.compile(_TEST + r"\s+(PASSED|FAILED|ERROR)\b")


def outcomes(log: str) -> dict[str, set[str]]:
    """test id -> the outcomes the log reports for it."""
    seen: dict[str, set[str]] = {}
    for line in log.splitlines():
        for m in _BEFORE.finditer(line):
            seen.setdefault(m.group(2), set()).add(m.group(1))
        for m in _AFTER.finditer(line):
            seen.setdefault(m.group(1), set()).add(m.group(2))
    return seen


def allowed_new_candidates(log: str) -> str:
    """``1`` when every new candidate passed all its tests, ``0`` when none did, else the comma-separated names
    of those that did."""
    seen = outcomes(log)
    verdicts: dict[str, list[bool]] = {}
    for case, configs, new in _candidate_cases():
        if not new:
            continue
        (kernel, cfg), = configs.items()
        name = candidate_id(kernel, CASES[case][3], cfg)
        verdicts.setdefault(name, []).append(seen.get(candidate_test_id(case, configs, new)) == {"PASSED"})
    good = [name for name, oks in verdicts.items() if all(oks)]
    if len(good) == len(verdicts):
        return "1"
    return ",".join(good) if good else "0"


if __name__ == "__main__":
    print(allowed_new_candidates(Path(sys.argv[1]).read_text(errors="replace")))
