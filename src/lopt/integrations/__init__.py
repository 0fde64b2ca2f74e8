"""Trainer integrations. `LoPTTrainerMixin` works with any transformers/TRL trainer; ready-made classes below."""

from transformers import Trainer
from trl import SFTTrainer

from lopt.integrations.callbacks import MetricsLogCallback, peak_memory_bytes
from lopt.integrations.trainer import LoPTTrainerMixin


class LoPTTrainer(LoPTTrainerMixin, Trainer):
    """transformers.Trainer with LoPT (pass `lopt_config=`, optionally `early_learning_rate=`)."""


class LoPTSFTTrainer(LoPTTrainerMixin, SFTTrainer):
    """TRL SFTTrainer with LoPT (pass `lopt_config=`, optionally `early_learning_rate=`)."""


__all__ = ["LoPTSFTTrainer", "LoPTTrainer", "LoPTTrainerMixin", "MetricsLogCallback", "peak_memory_bytes"]
