"""The "synth" local objective: each early block learns from a *predicted* task gradient at its output (synthetic
gradients, Jaderberg et al., arXiv 1608.05343).

Why: the other local objectives ask an early block for something other than what the later block needs
(reconstruction, a pull toward the pretrained state, the task read through a logit lens). The later block's own
backward computes exactly what it needs: the gradient of its loss with respect to the boundary state. That gradient
arrives after the early block's activations are freed (by design), so it cannot be used as it is; a small predictor
learns to map the boundary state to it, and the block is trained with the prediction in its local backward.

For the boundary after early block i, with h_i its output and n = batch x sequence positions of the micro-batch:

    block i's end:   p_i = P_i(h_i.detach())                 P_i: LayerNorm -> Linear -> GELU -> Linear (last one
                                                             zero-initialised: the block starts as if frozen)
                     local backward of synth_weight * <h_i, p_i.detach()> / n
    later backward:  g_i = d loss / d h_i arrives at the boundary (the task backward for the last boundary; with
                     k > 2, block i+1's local backward: bootstrapped, as in the paper)
                     P_i learns 0.5 * mean over positions of |p_i - n g_i|^2

The predictor works in per-position units (n g_i), so its target does not shrink with the batch. With a perfect
predictor (p_i = n g_i) and synth_weight 1, block i gets exactly e2e's gradient (tested).

Memory: nothing of block i is kept. Until the later backward each boundary holds its predictor's small graph and
the prediction: about three boundary-sized float32 tensors (batch x sequence x hidden), next to the boundary state
the later block keeps anyway; the target embeddings are one more, for the whole forward. Without labels (GRPO, DPO)
the predictor sees the boundary state alone.
"""

from __future__ import annotations

import torch
from torch import nn

from lopt.engine.heads import AuxHead


class GradientPredictor(AuxHead):
    """The aux head's shape (LayerNorm -> down -> GELU -> up) plus the position's target token, when the batch has
    labels: the task gradient at a position depends on the token it must predict (the LM head's gradient is the
    softmax minus the target's one-hot), which the boundary state does not know. The target's input embedding
    (held fixed; zero where the position has no target) joins the bottleneck through its own norm and projection.
    The output layer starts at zero: no gradient is predicted until one is learned, so the early block is held still
    rather than pushed by noise."""

    def __init__(self, hidden_size: int, ratio: int = 4):
        super().__init__(hidden_size, ratio)
        self.target_norm = nn.LayerNorm(hidden_size)
        self.target_down = nn.Linear(hidden_size, self.down.out_features, bias=False)
        nn.init.xavier_uniform_(self.target_down.weight, gain=0.1)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor, target_embedding: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.up.weight.dtype
        bottleneck = self.down(self.norm(hidden.to(dtype)))
        if target_embedding is not None:
            bottleneck = bottleneck + self.target_down(self.target_norm(target_embedding.to(dtype)))
        return self.up(self.act(bottleneck))


def target_embeddings(labels: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """Per position, the input embedding of the token it must predict (labels shifted by one; zero where there is
    none: masked, or the last position), without gradient."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    has_target = (targets != -100).unsqueeze(-1)
    weight = embedding_weight.detach()
    return torch.nn.functional.embedding(targets.clamp(min=0).to(weight.device), weight) * has_target.to(
        weight.device
    )


class SyntheticGradientStats:
    """Running means of the predictor's quality per boundary, for the training log (filled during backward)."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: float) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def take(self) -> dict[str, float]:
        """The means since the last call, then cleared."""
        means = {name: total / self._counts[name] for name, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        return means


def synthetic_gradient_term(block_output: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """A float32 scalar of value 0 whose gradient with respect to `block_output` is prediction / n (n = batch x
    sequence positions), the predicted gradient of the task loss. Value 0, so the reported objective is not changed
    by a quantity that means nothing on its own."""
    positions = block_output.shape[0] * block_output.shape[1]
    term = (block_output.float() * prediction.detach().float()).sum() / positions
    return term - term.detach()


def tap_boundary(
    boundary: torch.Tensor,
    prediction: torch.Tensor,
    loss_scale: float,
    stats: SyntheticGradientStats | None = None,
    name: str = "",
) -> torch.Tensor:
    """The boundary state as the later block receives it (same values): the gradient that reaches it in the later
    backward becomes the predictor's training signal, and goes no further (the boundary stays detached).

    `loss_scale` is what that backward's loss was multiplied by (1/gradient accumulation, a grad scaler's scale): the
    target is taken back to the unscaled loss's gradient, and the predictor's own gradient is scaled like the rest.
    """
    if boundary.requires_grad:
        raise ValueError("tap_boundary takes the detached boundary state: the stop-gradient must hold.")
    return _BoundaryGradientTap.apply(boundary, prediction, float(loss_scale), stats, name)


class _BoundaryGradientTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, boundary, prediction, loss_scale, stats, name):
        ctx.save_for_backward(prediction)
        ctx.loss_scale, ctx.stats, ctx.name = loss_scale, stats, name
        return boundary.view_as(boundary)

    @staticmethod
    def backward(ctx, grad_boundary):
        (prediction,) = ctx.saved_tensors
        positions = grad_boundary.shape[0] * grad_boundary.shape[1]
        target = grad_boundary.float() * (positions / ctx.loss_scale)  # n g: per-position units, unscaled
        error = prediction.float() - target
        if ctx.stats is not None:
            cosine = torch.nn.functional.cosine_similarity(
                prediction.flatten().float(), target.flatten(), dim=0
            )
            ctx.stats.add(f"synth_cosine_{ctx.name}", float(cosine))
            ctx.stats.add(f"synth_loss_{ctx.name}", float(0.5 * error.square().sum() / positions))
        # d/dp of 0.5 * sum |p - n g|^2 / n, times the backward's loss scale.
        grad_prediction = (error * (ctx.loss_scale / positions)).to(prediction.dtype)
        return None, grad_prediction, None, None, None
