"""The training loop and its parts: data order (data.py), optimizer/schedule/gradient reductions (optim.py),
metrics (metrics.py), held-out evaluation (evaluate.py), and the :class:`Trainer` that ties them together."""

from vlr_runtime.training.trainer import Trainer, TrainingDiverged

__all__ = ["Trainer", "TrainingDiverged"]
