"""The local "task" objective: each early block learns the task itself, through a logit lens.

Why: with the paper's objective only the last block ever sees the task, so LoPT learns it slowly, and the
reconstruction target pulls the early blocks away from what the late blocks were pretrained on. Here the output
h_i of early block i is read through the model's own final norm and LM head (a "logit lens") and scored with
next-token cross-entropy on the batch's labels:

    task_i = CE(lm_head(final_norm(h_i))[:, :-1], labels[:, 1:])      mean over labelled tokens, float32

The final norm and the LM head are held fixed here (they are trained by the real task loss only), so the only
thing this term trains is block i (and, for i = 0, the embedding): it asks the block to write, into the residual
stream, what the pretrained read-out already understands.

Memory: the lens logits (tokens x vocab) would cost as much as the model's own. They are computed a chunk of
labelled tokens at a time, and each chunk's gradient with respect to h_i is taken at once; only that gradient
(the size of h_i) is kept for the backward, so no logits outlive their chunk in either backward mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Logits per chunk are capped at this many floats (64 MiB in float32) whatever the vocabulary.
CHUNK_LOGIT_ELEMENTS = 1 << 24


def lens_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, final_norm: nn.Module, lm_head: nn.Module
) -> torch.Tensor:
    """task_i for a block output `hidden` (batch, seq, d) and unshifted `labels` (batch, seq; -100 = ignored).

    Returns a float32 scalar whose gradient reaches `hidden` only (never the norm's or the head's weights). A batch
    without labelled tokens gives 0.
    """
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the hidden states {tuple(hidden.shape[:2])}: "
            "the task objective needs one label per input token (the causal-LM layout)."
        )
    return _LensCrossEntropy.apply(hidden, labels.to(hidden.device), final_norm, lm_head)


class _LensCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and its gradient with respect to `hidden` chunk by chunk (logits freed as it goes);
    backward only scales that stored gradient."""

    @staticmethod
    def forward(ctx, hidden, labels, final_norm, lm_head):
        # Position t predicts token t+1: the last position has no target.
        targets = labels[:, 1:]
        positions = (targets != -100).nonzero(as_tuple=True)
        grad_hidden = torch.zeros_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        count = positions[0].numel()
        if count:
            rows = hidden[:, :-1][positions]  # (n, d)
            wanted = targets[positions]
            vocab = lm_head.weight.shape[0]
            chunk = max(1, CHUNK_LOGIT_ELEMENTS // vocab)
            row_grads = []
            for start in range(0, count, chunk):
                with torch.enable_grad():
                    x = rows[start : start + chunk].detach().requires_grad_(True)
                    logits = lm_head(final_norm(x)).float()
                    loss = F.cross_entropy(logits, wanted[start : start + chunk], reduction="sum") / count
                    (grad,) = torch.autograd.grad(loss, x)  # w.r.t. x only: norm/head weights get nothing
                total += loss.detach()
                row_grads.append(grad)
            grad_hidden[:, :-1][positions] = torch.cat(row_grads).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_output.to(grad_hidden.dtype) * grad_hidden, None, None, None
