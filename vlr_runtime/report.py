"""``python -m vlr_runtime.report RUN_DIR``: PNG plots of a run's ``metrics.jsonl``.

Writes ``RUN_DIR/report/{loss,accuracy,margin,throughput}.png`` (train lines, and eval lines where present) and prints
the paths. Lines that are not JSON objects are reported with their line number and skipped; a file with no training
step at all is an error (exit status 1), so an empty run never produces empty-looking plots silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the backend must be chosen before pyplot is imported
import matplotlib.pyplot as plt

PLOTS = {
    "loss": ("loss", "Bradley–Terry loss"),
    "accuracy": ("accuracy", "pairwise accuracy"),
    "margin": ("margin", "mean reward margin (chosen − rejected)"),
    "throughput": ("tokens_per_s", "tokens / s"),
}


def read_metrics(path: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Split ``metrics.jsonl`` into (train lines, eval lines, problems)."""
    train, evals, problems = [], [], []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {lineno}: not JSON ({exc.msg})")
                continue
            if not isinstance(row, dict) or "step" not in row:
                problems.append(f"line {lineno}: no 'step' field")
                continue
            (evals if row.get("split") == "eval" else train).append(row)
    return train, evals, problems


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run_dir: Path) -> list[Path]:
    """Write the PNG plots for ``run_dir`` and return their paths."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist: is {run_dir} a run directory?")
    train, evals, problems = read_metrics(metrics)
    for p in problems:
        print(f"report: skipped {p}", file=sys.stderr)
    if not train:
        raise ValueError(f"{metrics} holds no training step")
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (key, label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
        x, y = _series(train, key)
        ax.plot(x, y, label="train", linewidth=1.2)
        ex, ey = _series(evals, key)
        if ex:
            ax.plot(ex, ey, "o-", label="eval", linewidth=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(f"{run_dir.name}: {label}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlr_runtime.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
