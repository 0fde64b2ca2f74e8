"""lopt: LoPT (local-learning post-training) for Hugging Face causal language models."""

__version__ = "0.1.0"

from lopt.architectures import ARCHITECTURES, find_decoder_parts  # noqa: E402
from lopt.config import LoPTConfig  # noqa: E402
from lopt.heads import AuxHead, reconstruction_loss  # noqa: E402
from lopt.model import LoPTModel, get_lopt_model  # noqa: E402
from lopt.optim import param_groups  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "AuxHead",
    "LoPTConfig",
    "LoPTModel",
    "__version__",
    "find_decoder_parts",
    "get_lopt_model",
    "param_groups",
    "reconstruction_loss",
]
