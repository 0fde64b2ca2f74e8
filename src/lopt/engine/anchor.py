"""The pretrained reference for the "anchor" objective: the hidden states the *pretrained* model produces at
each block boundary for the current input.

Design (memory first): keep a frozen copy of only the trainable parameters that run before the last boundary
(embeddings and early blocks; parameters that do not train, e.g. a LoRA base, are read in place since they
never change), optionally in a smaller dtype. Before each training forward, run the unchanged model on that
copy with `torch.func.functional_call`, without grad and with dropout off, and stop right at the last boundary:
the cost is one no-grad forward of the early blocks, and no activation is kept. Because it reuses the model's
own forward, whatever the architecture does between embedding and layers (position embeddings, scaling,
per-layer attention masks) is reproduced exactly.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lopt.engine.architectures import DecoderParts, hidden_states_arg

ANCHOR_REFERENCE_NAME = "lopt_anchor_reference.safetensors"


class _StopForward(Exception):
    """Raised by a hook once the last boundary state is captured: the rest of the model need not run."""


class PretrainedAnchor:
    """Frozen pre-boundary parameters and the forward that turns them into boundary states.

    Args:
        model: the model LoPT wraps (transformers or PEFT), used for its forward.
        parts: its decoder parts.
        block_ranges: (start, end) layer indices of each block.
        late_parameters: the parameters trained by the task loss (not copied: the reference stops before them).
        dtype: storage dtype of the copy (None: keep each parameter's dtype). When it differs from the
            model's, the reference forward runs under autocast in that dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        parts: DecoderParts,
        block_ranges: list[tuple[int, int]],
        late_parameters: set[int],
        dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.dtype = dtype
        self.boundary_layers = [parts.layers[start] for start, _ in block_ranges[1:]]
        self.params = {
            name: param.detach().clone().to(dtype or param.dtype)
            for name, param in model.named_parameters()
            if param.requires_grad and id(param) not in late_parameters
        }

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.contiguous().cpu() for name, t in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.params):
            missing, unexpected = sorted(set(self.params) - set(state)), sorted(set(state) - set(self.params))
            raise ValueError(
                f"The saved anchor reference does not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}): resume with the model, method and num_blocks of that run."
            )
        self.params = {name: state[name].to(t.device, t.dtype) for name, t in self.params.items()}

    def boundary_states(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The pretrained hidden state entering the first layer of blocks 1..k-1, for these model inputs."""
        device = _input_device(args, kwargs)
        if device is not None and any(t.device != device for t in self.params.values()):
            self.params = {name: t.to(device) for name, t in self.params.items()}
        states: list[torch.Tensor] = []

        def capture(module, hook_args, hook_kwargs):
            states.append(hidden_states_arg(hook_args, hook_kwargs))
            if len(states) == len(self.boundary_layers):
                raise _StopForward

        handles = [
            layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in self.boundary_layers
        ]
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        try:
            with torch.no_grad(), _eval_mode(self.model), self._autocast(device):
                functional_call(self.model, self.params, args, kwargs, strict=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(states) != len(self.boundary_layers):
            raise RuntimeError("The anchor reference forward did not reach every block boundary.")
        return states

    def _autocast(self, device: torch.device | None):
        """Autocast to the copy's dtype when it is smaller than the model's (mixed-dtype ops would fail)."""
        if self.dtype is None or device is None:
            return contextlib.nullcontext()
        model_dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        if model_dtype == self.dtype:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def anchor_loss(block_output: torch.Tensor, pretrained_state: torch.Tensor) -> torch.Tensor:
    """anchor_i = MSE(block i output, the pretrained model's state at the same boundary), float32, mean."""
    return F.mse_loss(block_output.float(), pretrained_state.detach().float())


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in eval mode (no dropout; LoPT hooks idle) for the duration, each one's own mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _input_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None
