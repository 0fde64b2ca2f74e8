"""lopt: LoPT (local-learning post-training) for Hugging Face causal language models."""

from lopt._version import __version__
from lopt.engine.architectures import ARCHITECTURES, find_decoder_parts
from lopt.engine.config import LoPTConfig
from lopt.engine.heads import AuxHead, reconstruction_loss
from lopt.engine.in_backward import OptimizerInBackward, optimizer_in_backward
from lopt.engine.model import LoPTModel, get_lopt_model
from lopt.engine.optim import param_groups

__all__ = [
    "ARCHITECTURES",
    "AuxHead",
    "LoPTConfig",
    "LoPTModel",
    "OptimizerInBackward",
    "__version__",
    "find_decoder_parts",
    "get_lopt_model",
    "optimizer_in_backward",
    "param_groups",
    "reconstruction_loss",
]
