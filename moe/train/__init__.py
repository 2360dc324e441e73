"""The training job of one run (`train_run`), its schedule and its distributed setup."""

from moe.train.distributed import Dist
from moe.train.loop import TrainingFailed, build_result, train_run, validation_loss
from moe.train.schedule import build_optimizer, lr_at, total_steps

__all__ = ["Dist", "TrainingFailed", "build_optimizer", "build_result", "lr_at", "total_steps",
           "train_run", "validation_loss"]
