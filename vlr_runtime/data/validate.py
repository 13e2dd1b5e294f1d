"""Validation report of a data file: every row's outcome, counts by reason, length histograms, estimated cost.

``python -m vlr_runtime.data.validate FILE [FILE ...] [--model DIR] [--json] [--max-length N]
[--length-policy drop|truncate_response] [--token-budget N]``

Without ``--model`` the rows are parsed and their images decoded (all image checks), but not tokenized. With
``--json`` one line per row (``id``, ``status`` = ``ok``/``rejected``, ``reason``, and ``tokens``/``patches`` when
known), then the summary as a last line with ``"summary": true``. Exit status 0 whenever the files could be read,
whatever was rejected; 2 when they could not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlr_runtime.data.collate import Preprocessor
from vlr_runtime.data.errors import REASONS, DataError
from vlr_runtime.data.formats import RowIndex, example_from_row, row_id
from vlr_runtime.data.images import DEFAULT_MAX_DECODE_PIXELS, decode_image
from vlr_runtime.data.packing import example_cost


@dataclass(kw_only=True)
class RowOutcome:
    id: str
    status: str
    reason: str = ""
    message: str = ""
    tokens: int | None = None
    patches: int | None = None


@dataclass(kw_only=True)
class ValidationReport:
    rows: int = 0
    ok: int = 0
    reasons: Counter = field(default_factory=Counter)
    token_hist: Counter = field(default_factory=Counter)
    patch_hist: Counter = field(default_factory=Counter)
    total_tokens: int = 0
    total_patches: int = 0
    truncated: int = 0

    def add(self, o: RowOutcome) -> None:
        self.rows += 1
        self.truncated += int(o.message == "truncated")
        if o.status == "ok":
            self.ok += 1
        else:
            self.reasons[o.reason] += 1
        if o.status == "ok" and o.tokens is not None:
            self.total_tokens += o.tokens
            self.token_hist[_bucket(o.tokens)] += 1
        if o.status == "ok" and o.patches is not None:
            self.total_patches += o.patches
            self.patch_hist[_bucket(o.patches)] += 1

    def as_dict(self) -> dict:
        return {
            "rows": self.rows, "ok": self.ok, "rejected": self.rows - self.ok, "reasons": dict(self.reasons),
            "token_hist": {f"<={k}": v for k, v in sorted(self.token_hist.items())},
            "patch_hist": {f"<={k}": v for k, v in sorted(self.patch_hist.items())},
            "total_tokens": self.total_tokens, "total_patches": self.total_patches, "truncated": self.truncated,
            "estimated_cost": example_cost(self.total_tokens, self.total_patches),
        }


def _bucket(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


def check_rows(
    data: str | Path | Sequence[str | Path], preprocessor: Preprocessor | None = None, *,
    token_budget: int | None = None, max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
) -> Iterator[RowOutcome]:
    """Outcome of every row in file order. With a preprocessor the row is fully processed (decode + tokens), so
    the outcome is exactly what the loader would do with it; ``token_budget`` adds the per-pair budget check."""
    index = RowIndex(data)
    for i in range(len(index)):
        rid = row_id(index, i)
        try:
            ex = example_from_row(index, i)
            if preprocessor is None:
                for p in ex.images:
                    decode_image(p, max_pixels=max_decode_pixels)
                yield RowOutcome(id=rid, status="ok")
                continue
            processed = preprocessor(ex)
            tokens = processed.num_tokens()
            if token_budget is not None and tokens > token_budget:
                raise DataError("over_length", f"{tokens} tokens > token budget {token_budget}")
            yield RowOutcome(id=rid, status="ok", tokens=tokens, patches=processed.num_patches,
                             message="truncated" if processed.truncated else "")
        except DataError as e:
            yield RowOutcome(id=rid, status="rejected", reason=e.reason, message=str(e))


def validate(
    data: str | Path | Sequence[str | Path], preprocessor: Preprocessor | None = None, *,
    token_budget: int | None = None,
) -> ValidationReport:
    """The summary the trainer prints before step 1 (see :func:`format_report`)."""
    report = ValidationReport()
    for o in check_rows(data, preprocessor, token_budget=token_budget):
        report.add(o)
    return report


def format_report(report: ValidationReport) -> str:
    """Human-readable summary: outcomes, reasons with their meaning, histograms, estimated cost."""
    lines = [f"rows: {report.rows}  ok: {report.ok}  rejected: {report.rows - report.ok}"]
    for reason, n in report.reasons.most_common():
        lines.append(f"  rejected {n:>6}  {reason:<20} {REASONS[reason]}")
    if report.truncated:
        lines.append(f"  truncated responses (kept): {report.truncated}")
    for name, hist in (("tokens/row", report.token_hist), ("patches/row", report.patch_hist)):
        if hist:
            lines.append(f"{name}: " + "  ".join(f"<={k}:{v}" for k, v in sorted(hist.items())))
    if report.total_tokens or report.total_patches:
        lines.append(
            f"total: {report.total_tokens} LLM tokens, {report.total_patches} vision patches, estimated cost "
            f"{example_cost(report.total_tokens, report.total_patches):.3g} token-equivalents"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlr_runtime.data.validate", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSONL/Parquet files, directories or globs")
    ap.add_argument("--model", help="model directory (tokenizer, chat template, preprocessor_config.json)")
    ap.add_argument("--json", action="store_true", help="one JSON line per row, then the summary")
    ap.add_argument("--max-length", type=int, default=None, help="per-sequence token limit")
    ap.add_argument("--length-policy", default="drop", choices=["drop", "truncate_response"])
    ap.add_argument("--token-budget", type=int, default=None, help="microbatch token budget (per pair)")
    args = ap.parse_args(argv)
    try:
        pre = Preprocessor(args.model, max_length=args.max_length, length_policy=args.length_policy) \
            if args.model else None
        report = ValidationReport()
        for o in check_rows(args.files, pre, token_budget=args.token_budget):
            report.add(o)
            if args.json:
                line = {"id": o.id, "status": o.status, "reason": o.reason}
                if o.tokens is not None:
                    line.update(tokens=o.tokens, patches=o.patches)
                print(json.dumps(line), flush=True)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"validate: cannot read the data: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"summary": True, **report.as_dict()}))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
