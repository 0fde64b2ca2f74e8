"""The optimizer step inside the backward: parameters are updated, and their gradients freed, as soon as their
gradients are final, so a step never holds every gradient at once.

    optimizer = torch.optim.AdamW(param_groups(lopt_model, lr, early_lr))
    in_backward = optimizer_in_backward(lopt_model, optimizer)      # or the plain model, for e2e
    for batch in batches:
        lopt_model(**batch).loss.backward()   # LoPT: early blocks already stepped inside the forward
        in_backward.step()                    # what the backward's end completes; then the scheduler, as usual
        scheduler.step()

What is stepped when: each parameter from its post-accumulate-grad hook, the moment its gradient is final, as
torchtune's optimizer-in-backward does, so at most the gradient being written is alive (plus the exception below):
- e2e (any plain model): during the one backward, layer by layer from the LM head down to the embedding.
- LoPT (a LoPTModel, local backward): an early block's gradients are final as its local backward writes them (no
  later loss reaches the block), so its layers, its aux head and, with block 0, an untied embedding are stepped
  there, inside the forward; the last block, final norm and LM head during the task backward.
- the exception: a parameter that gets gradients from two of LoPT's backwards in one step (a tied embedding and LM
  head: block 0's local backward through the embedding, the task backward through the head) is stepped by `step()`,
  when the task backward has ended; its gradient lives from block 0's backward to then. (In e2e autograd sums both
  uses before the hook, so it is stepped once, inside the backward.)

One optimizer, stepped on one parameter at a time (its param groups narrowed to it for the call): each parameter gets
exactly the update of the ordinary step (AdamW's state and step count are per parameter), the optimizer's state_dict
is the ordinary one (checkpoints save and resume as usual), and an LR scheduler built on it drives every parameter,
the early group's own rate included. The optimizer's update of a parameter must depend on that parameter's gradient
and state alone (AdamW, Adam, SGD, Adafactor: yes).

What changes against the ordinary step:
- gradient clipping (`max_grad_norm > 0`) is per parameter: each is scaled down to it by its own gradient norm,
  since the global norm is not known until the last gradient. With clipping the result differs from the ordinary
  global clip; with `max_grad_norm=0` the parameters are the ordinary step's exactly.
- gradient accumulation cannot hold (a step would run after every micro-batch): call backward once per step.
- nor can fp16's GradScaler, which unscales and checks every gradient before the step: use bf16 or fp32. Nor data
  parallelism: DDP/FSDP average a gradient after it is written, and the step would come first.
- `step()` returns the step's total gradient norm (before clipping, from each parameter's norm) when it is tracked.
"""

from __future__ import annotations

import torch
from torch import nn

from lopt.engine.model import LoPTModel


class OptimizerInBackward:
    """Steps `optimizer` inside the backward of `model`. Build it with `optimizer_in_backward`; `remove()` detaches it."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float = 0.0,
        track_grad_norm: bool = True,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}: pass the optimizer "
                "itself (not a wrapper)."
            )
        if max_grad_norm is None or max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be >= 0 (0: no clipping).")
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm)
        self.track_grad_norm = track_grad_norm or self.max_grad_norm > 0
        self._sum_of_squares: torch.Tensor | None = None
        self._handles = []
        self._group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        if isinstance(model, LoPTModel) and model.lopt_config.backward != "local":
            raise ValueError(
                f"the optimizer step in the backward needs LoPT's local backward, not backward="
                f"{model.lopt_config.backward!r} (one joint backward at the end): use backward='local'."
            )
        stepped_at_end = _trained_by_two_backwards(model) if isinstance(model, LoPTModel) else set()
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad and id(param) not in stepped_at_end:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._step_parameter))

    def step(self) -> torch.Tensor | None:
        """Step every parameter that still holds a gradient (a tied matrix under LoPT; otherwise nothing), free the
        gradients, and return the step's total gradient norm before clipping (None if not tracked)."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_parameter(param)
        total, self._sum_of_squares = self._sum_of_squares, None
        return None if total is None else total.sqrt()

    def remove(self) -> None:
        """Detach the hooks: the optimizer steps as usual again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- the hook: one parameter's step -------------------------------------------------------------------
    def _step_parameter(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        if self.track_grad_norm:
            norm = torch.nn.utils.get_total_norm([param.grad])
            square = norm.float().square()
            self._sum_of_squares = square if self._sum_of_squares is None else self._sum_of_squares + square
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_([param], self.max_grad_norm, norm)
        groups = self.optimizer.param_groups
        index = self._group_of[id(param)]
        kept = groups[index]["params"]
        others = [(group, group["params"]) for i, group in enumerate(groups) if i != index]
        try:
            groups[index]["params"] = [param]
            for group, _ in others:
                group["params"] = []
            # Inside the forward the model may run under autocast: the update is computed in the weight's dtype.
            with torch.autocast(param.device.type, enabled=False):
                self.optimizer.step()
        finally:
            groups[index]["params"] = kept
            for group, full in others:
                group["params"] = full
        param.grad = None


def _trained_by_two_backwards(model: LoPTModel) -> set[int]:
    """Ids of the parameters that both an early block's local backward and the task backward write to in one step:
    a tied embedding and LM head (block 0 reaches it through the embedding, the task loss through the head)."""
    late = {id(p) for module in model.late_modules() for p in module.parameters()}
    early = [model.embedding, *model.aux_heads]
    early += [m for index in range(model.num_boundaries) for m in model.early_block_modules(index)]
    return {id(p) for module in early for p in module.parameters() if id(p) in late}


def optimizer_in_backward(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float = 0.0,
    track_grad_norm: bool = True,
) -> OptimizerInBackward:
    """Make `optimizer` step inside the backward of `model` (a LoPTModel in local mode, or any plain model), one
    parameter at a time as its gradient is final. Keep calling `step()` (of the returned object) once after each
    backward, then the scheduler.

    `max_grad_norm > 0` clips each parameter by its own gradient norm (see the module docstring: not the ordinary
    global clip); 0 gives exactly the ordinary step's parameters. One backward per step: no gradient accumulation.
    """
    return OptimizerInBackward(model, optimizer, max_grad_norm=max_grad_norm, track_grad_norm=track_grad_norm)
