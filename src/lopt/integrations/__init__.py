"""Trainer integrations. `LoPTTrainerMixin` works with any transformers/TRL trainer; ready-made classes below."""

from transformers import Trainer
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from lopt.integrations.callbacks import MetricsLogCallback, RoundToBfloat16Callback, peak_memory_bytes
from lopt.integrations.trainer import LoPTTrainerMixin


class LoPTTrainer(LoPTTrainerMixin, Trainer):
    """transformers.Trainer with LoPT (pass `lopt_config=`, optionally `early_learning_rate=`)."""


class LoPTSFTTrainer(LoPTTrainerMixin, SFTTrainer):
    """TRL SFTTrainer with LoPT (pass `lopt_config=`, optionally `early_learning_rate=`)."""


class LoPTGRPOTrainer(LoPTTrainerMixin, GRPOTrainer):
    """TRL GRPOTrainer with LoPT. The reward, generation and reference forwards run without grad: no aux work."""

    lopt_batches_have_labels = False


class LoPTDPOTrainer(LoPTTrainerMixin, DPOTrainer):
    """TRL DPOTrainer with LoPT. With ref_model=None (and no PEFT), TRL loads the reference model as a separate object
    from the policy's checkpoint (`config._name_or_path`) inside its __init__, before the mixin wraps the policy: it
    is the frozen initial model and carries no LoPT hooks. Its forwards (and every other no-grad forward) do no aux
    work."""

    lopt_batches_have_labels = False


__all__ = [
    "LoPTDPOTrainer",
    "LoPTGRPOTrainer",
    "LoPTSFTTrainer",
    "LoPTTrainer",
    "LoPTTrainerMixin",
    "MetricsLogCallback",
    "RoundToBfloat16Callback",
    "peak_memory_bytes",
]
