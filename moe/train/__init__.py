"""The training job of one run (`train_run`), its step math, schedule and distributed setup."""

from moe.train.distributed import Dist
from moe.train.loop import TrainingFailed, train_run
from moe.train.schedule import build_optimizer, lr_at, total_steps
from moe.train.step import optimizer_step, train_step, training_loss, validation_loss

__all__ = ["Dist", "TrainingFailed", "build_optimizer", "lr_at", "optimizer_step",
           "total_steps", "train_run", "train_step", "training_loss", "validation_loss"]
