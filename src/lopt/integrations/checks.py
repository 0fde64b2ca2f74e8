"""The rules the trainer mixin enforces that the training commands also check from their flags, before any model is
built or loaded (lopt.training.checks): each rule is written once, here, in the words of the flags (the trainer's
arguments carry the same names), and called from both places. One-line errors naming the value and the fix."""

from __future__ import annotations

from lopt.errors import UserError


def check_optimizer_in_backward(
    *, joint_backward: bool, gradient_accumulation_steps: int, fp16: bool, processes: int, fsdp: bool, optim
) -> None:
    """--optimizer_in_backward steps inside the backward of one process, once per backward (lopt.engine.in_backward)."""
    if joint_backward:
        raise UserError(
            "--optimizer_in_backward needs LoPT's local backward: use --method lopt, not lopt_joint (its one joint "
            "backward completes every gradient at the end)."
        )
    if gradient_accumulation_steps > 1:
        raise UserError(
            f"--optimizer_in_backward steps after every backward: --gradient_accumulation_steps must be 1, not "
            f"{gradient_accumulation_steps} (raise --per_device_train_batch_size instead)."
        )
    if fp16:
        raise UserError(
            "--optimizer_in_backward cannot use --fp16's grad scaler (it checks every gradient before the step): use "
            "--bf16 or fp32."
        )
    if fsdp or processes > 1:
        raise UserError(
            "--optimizer_in_backward runs in one process (it would step before the gradients are averaged over "
            "processes): drop torchrun/--fsdp, or drop --optimizer_in_backward."
        )
    optim = str(getattr(optim, "value", optim))
    if optim in ("lomo", "adalomo"):
        raise UserError(
            f"--optimizer_in_backward does not combine with --optim {optim}, which fuses its own update into the "
            "backward: use one of them."
        )


def check_clip_per_block(
    *, lopt: bool, fsdp: bool, optimizer_in_backward: bool, method: str | None = None
) -> None:
    """--clip_per_block clips each LoPT block by its own norm in the ordinary optimizer step."""
    if not lopt:
        raise UserError(
            "--clip_per_block only applies to LoPT methods" + (f", not --method {method}." if method else ".")
        )
    if fsdp:
        raise UserError(
            "--clip_per_block does not combine with --fsdp yet: clip with one global norm (drop it)."
        )
    if optimizer_in_backward:
        raise UserError(
            "--clip_per_block does not combine with --optimizer_in_backward, which clips each parameter by its own "
            "norm."
        )


def check_fsdp(*, launched: bool, anchor_objective: str | None) -> None:
    """--fsdp (lopt's FSDP2 sharding): a torchrun launch, and an objective whose parts are sharded."""
    if not launched:
        raise UserError(
            "--fsdp shards the model over the processes of a torchrun launch: start it with `torchrun "
            "--nproc_per_node N -m lopt sft --fsdp ...`."
        )
    if anchor_objective is not None:
        raise UserError(
            f"--aux_objective {anchor_objective} is not supported with --fsdp (its frozen pretrained reference is not "
            "sharded): use --aux_objective recon, or train without --fsdp (DDP)."
        )


def check_checkpoint_layers(checkpoint_layers, activation_checkpointing: bool) -> None:
    """--checkpoint_layers keeps checkpointing on some layers: it needs checkpointing turned on."""
    if checkpoint_layers is not None and not activation_checkpointing:
        raise UserError(
            f"--checkpoint_layers {checkpoint_layers} checkpoints some layers but --gradient_checkpointing "
            "(activation_checkpointing) is false: drop one of them."
        )


def check_objective_has_labels(aux_objective: str, uses_task: bool, has_labels: bool, trainer: str) -> None:
    """The "task" local objective reads the batch's labels, which GRPO and DPO batches do not carry."""
    if uses_task and not has_labels:
        raise UserError(
            f"--aux_objective {aux_objective} needs labelled batches, which {trainer} does not have: use "
            "--aux_objective recon (or anchor, recon+anchor)."
        )
