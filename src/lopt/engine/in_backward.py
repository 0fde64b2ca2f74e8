"""The optimizer step inside the backward: parameters are updated, and their gradients freed, as soon as their
gradients are final, so a step never holds every gradient at once.

    optimizer = torch.optim.AdamW(param_groups(lopt_model, lr, early_lr))
    in_backward = optimizer_in_backward(lopt_model, optimizer)      # or the plain model, for e2e
    for batch in batches:
        lopt_model(**batch).loss.backward()   # LoPT: early blocks already stepped inside the forward
        in_backward.step()                    # what the backward's end completes; then the scheduler, as usual
        scheduler.step()

What is stepped when:
- LoPT (a LoPTModel, local backward): an early block's gradient is final when its local backward ends (no later
  loss reaches it), so its parameters (the block's layers, its aux head, and with block 0 the embedding when it is
  not shared with the LM head) are stepped there, inside the forward, and their gradients freed. What the task
  loss trains (last block, final norm, LM head, and a tied embedding, whose last gradient arrives in the task
  backward) is stepped by `step()`, when the task backward has ended.
- any other model (e2e, freeze): each parameter is stepped from its post-accumulate-grad hook, the moment the
  backward has written its gradient, as torchtune's optimizer-in-backward does; `step()` finds nothing left.

One optimizer, stepped on part of its parameters at a time (its param groups narrowed to that part for the call):
each parameter gets exactly the update of the ordinary step (AdamW's state and step count are per parameter), the
optimizer's state_dict is the ordinary one (checkpoints save and resume as usual), and an LR scheduler built on it
drives every part, the early group's own rate included. The optimizer's update of a parameter must depend on that
parameter's gradient and state alone (AdamW, Adam, SGD, Adafactor: yes).

What changes against the ordinary step:
- gradient clipping (`max_grad_norm > 0`) is per part: each LoPT block (early blocks one by one, then the task
  loss's parameters together) or, for e2e, each parameter is scaled down to it by its own gradient norm, since the
  global norm is not known until the last gradient. With clipping the result differs from the ordinary global
  clip; with `max_grad_norm=0` the parameters are the ordinary step's exactly.
- gradient accumulation cannot hold (a step would run after every micro-batch): call backward once per step.
- nor can fp16's GradScaler, which unscales and checks every gradient before the step: use bf16 or fp32. Nor data
  parallelism: DDP/FSDP average a gradient after it is written, and the step would come first.
- `step()` returns the step's total gradient norm (before clipping, from each part's norm) when it is tracked.
"""

from __future__ import annotations

from collections.abc import Iterable

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
        group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._group_of = group_of
        if isinstance(model, LoPTModel):
            if model.lopt_config.backward != "local":
                raise ValueError(
                    f"the optimizer step in the backward needs LoPT's local backward, not backward="
                    f"{model.lopt_config.backward!r} (one joint backward at the end): use backward='local'."
                )
            self.mode = "block"
            self._blocks = [self._split(params) for params in _early_block_parameters(model)]
            self._handles.append(model.register_local_backward_hook(self._step_block))
        else:
            self.mode = "parameter"
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.requires_grad:
                        self._handles.append(param.register_post_accumulate_grad_hook(self._step_parameter))

    def _split(self, params: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
        """`params` as per-group lists of the optimizer (parameters it does not hold are left out)."""
        per_group: list[list[torch.Tensor]] = [[] for _ in self.optimizer.param_groups]
        for param in params:
            index = self._group_of.get(id(param))
            if index is not None:
                per_group[index].append(param)
        return per_group

    # --- the hooks -------------------------------------------------------------------------------------
    def _step_block(self, block_index: int) -> None:
        self._step(self._blocks[block_index])

    def _step_parameter(self, param: torch.Tensor) -> None:
        per_group: list[list[torch.Tensor]] = [[] for _ in self.optimizer.param_groups]
        per_group[self._group_of[id(param)]].append(param)
        self._step(per_group)

    def step(self) -> torch.Tensor | None:
        """Step every parameter that still holds a gradient (LoPT: what the task loss trains; e2e: nothing), free
        the gradients, and return the step's total gradient norm before clipping (None if not tracked)."""
        self._step(
            [[p for p in group["params"] if p.grad is not None] for group in self.optimizer.param_groups]
        )
        total, self._sum_of_squares = self._sum_of_squares, None
        return None if total is None else total.sqrt()

    def remove(self) -> None:
        """Detach the hooks: the optimizer steps as usual again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- one part's step -------------------------------------------------------------------------------
    def _step(self, per_group: list[list[torch.Tensor]]) -> None:
        per_group = [[p for p in params if p.grad is not None] for params in per_group]
        params = [p for params in per_group for p in params]
        if not params:
            return
        if self.track_grad_norm:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            square = norm.float().square()
            self._sum_of_squares = square if self._sum_of_squares is None else self._sum_of_squares + square
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        groups = self.optimizer.param_groups
        kept = [group["params"] for group in groups]
        try:
            for group, subset in zip(groups, per_group):
                group["params"] = subset
            # Inside the forward the model may run under autocast: the update is computed in the weights' dtypes.
            with torch.autocast(params[0].device.type, enabled=False):
                self.optimizer.step()
        finally:
            for group, full in zip(groups, kept):
                group["params"] = full
        for param in params:
            param.grad = None


def _early_block_parameters(model: LoPTModel) -> list[list[torch.Tensor]]:
    """Per early block, the parameters whose gradient is final when its local backward ends: the block's layers, its
    aux head, and with block 0 the embedding, minus anything the task loss also trains (a tied embedding)."""
    late = {id(p) for module in model.late_modules() for p in module.parameters()}
    blocks = []
    for index in range(model.num_boundaries):
        modules = model.early_block_modules(index)
        if index < len(model.aux_heads):
            modules.append(model.aux_heads[index])
        if index == 0:
            modules.append(model.embedding)
        blocks.append([p for m in modules for p in m.parameters() if id(p) not in late])
    return blocks


def optimizer_in_backward(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float = 0.0,
    track_grad_norm: bool = True,
) -> OptimizerInBackward:
    """Make `optimizer` step inside the backward of `model` (a LoPTModel in local mode: per block; any other model:
    per parameter). Keep calling `step()` (of the returned object) once after each backward, then the scheduler.

    `max_grad_norm > 0` clips each part by its own gradient norm (see the module docstring: not the ordinary global
    clip); 0 gives exactly the ordinary step's parameters. One backward per step: no gradient accumulation.
    """
    return OptimizerInBackward(model, optimizer, max_grad_norm=max_grad_norm, track_grad_norm=track_grad_norm)
