"""The one Trainer, its optimizer/schedule, checkpoints, metrics and plots."""

from minimodels.train.trainer import Trainer, TrainingError

__all__ = ["Trainer", "TrainingError"]
