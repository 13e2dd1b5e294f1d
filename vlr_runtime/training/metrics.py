"""Per-step metrics: one JSON object per line in ``<run.dir>/metrics.jsonl`` and a progress bar, on rank 0 only.

Training lines carry the design.md keys ``step``, ``loss``, ``accuracy``, ``margin``, ``lr``, ``grad_norm``,
``tokens_per_s`` plus ``chosen_reward``, ``rejected_reward``, ``images_per_s``, ``pairs``, ``step_time_s``;
evaluation lines carry ``"split": "eval"``. Scale metrics (:mod:`vlr_runtime.training.trainer`): ``data_wait_s``,
``peak_mem_gb``, ``pipeline_bubble`` (pp > 1), ``mfu_llm`` / ``mfu_vision`` (CUDA devices with a known peak).
Every numeric value also goes to TensorBoard (``<run.dir>/tensorboard``) and, when enabled, to Weights & Biases.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

TRAIN_KEYS = ("step", "loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "grad_norm", "lr",
              "tokens_per_s", "images_per_s", "pairs", "step_time_s")


def _clean(value: object) -> object:
    """JSON has no NaN/Inf: write them as strings so a diverged step is still a readable line."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends metric lines to ``path`` and drives a tqdm bar of ``total_steps``; a no-op when ``enabled`` is False
    (ranks other than 0)."""

    def __init__(self, path: Path, *, enabled: bool, total_steps: int, first_step: int, progress: bool,
                 wandb_config: dict | None = None) -> None:
        """``wandb_config``: the run's config; given, every line is also logged to Weights & Biases (raises
        ImportError when ``wandb`` is not installed rather than silently logging less)."""
        self.enabled = enabled
        self._file = path.open("a", encoding="utf-8") if enabled else None
        self._tb = None
        self._wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tensorboard"))
            if wandb_config is not None:
                import wandb

                self._wandb = wandb.init(dir=str(path.parent), name=path.parent.name, config=wandb_config)
        self._bar = (tqdm(total=total_steps, initial=first_step, desc="train", unit="step", file=sys.stderr,
                          mininterval=1.0, dynamic_ncols=True)
                     if enabled and progress else None)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._file.flush()
        prefix = "eval/" if row.get("split") == "eval" else "train/"
        scalars = {prefix + k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, row["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])
        if self._bar is not None and row.get("split") != "eval":
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", refresh=False)

    def message(self, text: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
