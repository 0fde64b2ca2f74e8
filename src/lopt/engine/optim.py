"""Optimizer parameter groups: early (embedding, early blocks, aux heads) and late (last block, norm, head)."""

from __future__ import annotations

from lopt.engine.model import LoPTModel


def param_groups(
    model: LoPTModel, lr: float, early_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Two AdamW groups, as in the authors' code: "late" (last block, final norm, LM head: trained by the task
    loss) at `lr`, and "early" (embedding, early blocks, reconstruction heads: trained by the local objective) at
    `early_lr` (default `lr`); with the "synth" objective a third, "predictor" (the gradient predictors, at
    `LoPTConfig.synth_lr`, no weight decay). Frozen parameters and empty groups are left out.

    A tied embedding and LM head (one parameter, `LoPTConfig.untie_embeddings=False`) is in the late group, once:
    it is also the LM head, which the task loss trains at the main rate, and its last gradient (the task backward's)
    arrives after block 0's local one, so a step inside the backward may update it only when the task backward
    has ended (lopt.engine.in_backward)."""
    if not isinstance(model, LoPTModel):
        raise TypeError(
            f"param_groups expects a LoPTModel (from get_lopt_model), got {type(model).__name__}."
        )
    late_ids = {id(p) for module in model.late_modules() for p in module.parameters()}
    config = model.lopt_config
    # The gradient predictors start from nothing and must keep up with the later block as it changes: their own rate
    # (LoPTConfig.synth_lr), not the early blocks' (which a user lowers to keep them still).
    predictor_ids = {id(p) for p in model.aux_heads.parameters()} if config.uses_synthetic_gradient else set()
    early, late, predictors, seen = [], [], [], set()
    for param in model.parameters():  # the wrapped model's parameters, then the aux heads'
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in predictor_ids:
            predictors.append(param)
        else:
            (late if id(param) in late_ids else early).append(param)
    # The task-loss group comes first: trainers report param_groups[0]'s rate as "the" learning rate.
    groups = [
        {"params": late, "lr": lr, "weight_decay": weight_decay, "name": "late"},
        {
            "params": early,
            "lr": lr if early_lr is None else early_lr,
            "weight_decay": weight_decay,
            "name": "early",
        },
        {
            "params": predictors,
            "lr": lr if config.synth_lr is None else config.synth_lr,
            "weight_decay": 0.0,
            "name": "predictor",
        },
    ]
    return [g for g in groups if g["params"]]
