"""The one Trainer, its optimizer/schedule, checkpoints, metrics and plots."""

from minimodels.train.checkpoint import RunFolderError
from minimodels.train.trainer import Trainer, TrainingError

__all__ = ["RunFolderError", "Trainer", "TrainingError"]
