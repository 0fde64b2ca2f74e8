"""Auxiliary heads and the local reconstruction objective (training only; never saved with the model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AuxHead(nn.Module):
    """LayerNorm(d) -> Linear(d, d/ratio) -> GELU -> Linear(d/ratio, d), small init so it starts near zero."""

    def __init__(self, hidden_size: int, ratio: int = 4):
        super().__init__()
        bottleneck = max(1, hidden_size // ratio)
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, hidden_size)
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight, gain=0.1)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.norm(hidden))))


def reconstruction_loss(
    head: nn.Module, block_output: torch.Tensor, block_input: torch.Tensor
) -> torch.Tensor:
    """aux_i = MSE(head_i(block i output), block i input), in float32 with mean reduction.

    The target is detached: the block learns to keep what it was given recoverable, the input is not pulled
    toward the output.
    """
    head_param = next(head.parameters())
    prediction = head(block_output.to(head_param.dtype))
    return F.mse_loss(prediction.float(), block_input.detach().float())
