"""The flag checks of the training commands, all run before any model is built or loaded: the data flags and the
task they pick (`check_data`), then every other flag (`check_flags`): LoPT's, the TRL ModelConfig and trainer flags
lopt cannot honour, values no trainer can use, each command's own, and the LoPT flags against the model's depth read
from its config. One-line errors naming the value and the fix; the rules the trainer mixin enforces too are written
once, in lopt.integrations.checks, and called from both places."""

from __future__ import annotations

import os

from lopt.errors import UserError
from lopt.training.arguments import DataArguments, LoPTArguments


def check_data(
    command: str, model_args, data: DataArguments, tasks: tuple[str, ...], recorded=None
) -> str | None:
    """The built-in task to train on (None for the user's data): --task, else the task the starting checkpoint
    records (`recorded`: lopt.training.rl.recorded_task, for the commands that read it), else the model's default
    task (lopt.builtin.bases.Base.default_task). One-line errors for flags that do not combine."""
    from lopt.builtin.bases import base_of
    from lopt.builtin.tasks import REAL_BASE_TASKS

    path = model_args.model_name_or_path
    base = (
        recorded.base if recorded is not None else base_of(path)
    )  # a checkpoint's: the base it was trained from
    if data.task is not None:
        if data.task not in tasks:
            raise UserError(f"--task {data.task!r} is not one of {', '.join(tasks)}.")
        if data.user_data:
            raise UserError(
                f"--task {data.task} is a built-in task: drop --train_file/--dataset_name, or --task."
            )
        if not base.can_train(data.task):
            raise UserError(
                f"--task {data.task} is made for the built-in model: drop --model_name_or_path, or give "
                "--train_file/--dataset_name."
            )
        return data.task
    if data.user_data:
        return None
    if recorded is not None:
        if recorded.task is None:
            choices = ", ".join(t for t in tasks if base.can_train(t))
            raise UserError(
                f"cannot tell the task of --model_name_or_path {path} ({recorded.reason}): give --task "
                f"({choices}) or --train_file/--dataset_name."
            )
        if recorded.task not in tasks:
            raise UserError(
                f"lopt {command} has no built-in task {recorded.task} (recorded by --model_name_or_path {path}): "
                "give --train_file or --dataset_name."
            )
        return recorded.task
    task = base.default_task
    if task is None:
        chat_tasks = " or ".join(t for t in REAL_BASE_TASKS if t in tasks)
        also = (", a hub --task" if command == "grpo" else "") + (
            f", or --task {chat_tasks} (any chat model)" if chat_tasks else ""
        )
        raise UserError(
            f"the built-in task is made for the built-in model: give --train_file or --dataset_name{also}."
        )
    if task not in tasks:
        raise UserError(
            f"lopt {command} has no built-in task for {path} (its task {task} is not one "
            f"of {', '.join(tasks)}): give --train_file or --dataset_name."
        )
    return task


def check_flags(
    command: str,
    lopt_args: LoPTArguments,
    model_args,
    training_args,
    set_fields: frozenset[str] = frozenset(),
    task_args=None,
) -> None:
    """Every flag rule of a training command that needs no model, run right after its data is read and before any
    model is built or loaded: LoPT's flags (LoPTArguments.check), the model flags, the trainer's flags, the command's
    own, then the LoPT flags against the model's depth read from its config (check_model_depth)."""
    lopt_args.check(set_fields)
    check_model_flags(model_args, lopt_args)
    check_training_args(training_args, lopt_args, command, set_fields)
    if command == "sft":
        check_sft_args(set_fields)
    else:
        if lopt_args.block_parallel:
            raise UserError(
                f"--block_parallel is an sft option: lopt {command} trains data-parallel under torchrun."
            )
        if training_args.eval_strategy != "no":
            raise UserError(
                f"--eval_strategy is not supported by lopt {command} (no eval set): a built-in task's test split is "
                "scored after training (--eval_samples)."
            )
        if command == "grpo":
            check_grpo_args(task_args, training_args)
        if command == "dpo":
            check_dpo_args(training_args)
    check_model_depth(lopt_args, model_args, training_args.trust_remote_code)


def check_model_flags(model_args, lopt_args: LoPTArguments) -> None:
    """TRL ModelConfig flags that lopt cannot honour, refused in one line."""
    if model_args.use_peft and lopt_args.method != "lora":
        raise UserError(
            f"--use_peft trains LoRA adapters: use --method lora (the lora_* flags apply), not --method "
            f"{lopt_args.method}."
        )
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise UserError("--load_in_4bit/--load_in_8bit are not supported by lopt (train in bf16 or fp32).")


def check_training_args(
    training_args, lopt_args: LoPTArguments, command: str, set_fields: frozenset[str] = frozenset()
) -> None:
    """TRL/TrainingArguments flags that do not combine with lopt's commands, refused in one line each; and values no
    trainer can use. The rules the trainer mixin enforces too are lopt.integrations.checks' (one text each)."""
    import importlib.util

    from lopt.integrations import checks as shared

    lopt_config = lopt_args.lopt_config() if lopt_args.is_lopt else None
    if training_args.fsdp:
        if command != "sft":
            raise UserError(
                f"--fsdp is built for lopt sft only: train lopt {command} data-parallel (plain torchrun)."
            )
        if lopt_args.block_parallel:
            raise UserError("--fsdp and --block_parallel are exclusive: choose one way to split the work.")
        anchor = lopt_config.aux_objective if lopt_config is not None and lopt_config.uses_anchor else None
        shared.check_fsdp(launched="WORLD_SIZE" in os.environ, anchor_objective=anchor)

    if lopt_config is not None:
        shared.check_objective_has_labels(
            lopt_config.aux_objective, lopt_config.uses_task, command == "sft", f"lopt {command}"
        )
    if lopt_args.clip_per_block:
        shared.check_clip_per_block(
            lopt=lopt_args.is_lopt,
            fsdp=bool(training_args.fsdp),
            optimizer_in_backward=lopt_args.optimizer_in_backward,
            method=lopt_args.method,
        )
    if lopt_args.optimizer_in_backward:
        shared.check_optimizer_in_backward(
            joint_backward=lopt_args.method == "lopt_joint",
            gradient_accumulation_steps=training_args.gradient_accumulation_steps,
            fp16=training_args.fp16,
            processes=int(os.environ.get("WORLD_SIZE", "1")),
            fsdp=bool(training_args.fsdp),
            optim=training_args.optim,
        )
    shared.check_checkpoint_layers(lopt_args.checkpoint_layers, training_args.activation_checkpointing)

    if training_args.torch_compile and lopt_args.is_lopt:
        raise UserError(
            "--torch_compile is not supported with LoPT methods yet (untested with the local backward)."
        )

    if training_args.push_to_hub:
        raise UserError(
            "--push_to_hub is not supported: lopt writes the checkpoint to --output_dir; upload it from there."
        )
    if getattr(training_args, "model_init_kwargs", None):
        raise UserError(
            "--model_init_kwargs is not used: lopt loads the model itself (use --dtype, --attn_implementation)."
        )
    if training_args.use_liger_kernel:
        if lopt_args.is_lopt:
            raise UserError(
                "--use_liger_kernel is not supported with LoPT methods (its fused loss replaces the forward LoPT's "
                "blocks hook into; untested), only with the baselines."
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("--use_liger_kernel needs the liger-kernel package: pip install liger-kernel.")
    if getattr(training_args, "assistant_only_loss", False):
        raise UserError(
            "--assistant_only_loss is not needed: lopt's rows train on the final response only (row formats: docs/TRAINING.md)."
        )
    if getattr(training_args, "completion_only_loss", None) is False:
        raise UserError(
            "--completion_only_loss false is not supported: lopt's rows train on the response tokens only."
        )
    if training_args.bf16 and training_args.fp16:
        raise UserError("--bf16 and --fp16 are exclusive: choose one.")
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) <= 0:
            raise UserError(f"--{name} {getattr(training_args, name)} must be positive.")
    if getattr(training_args, "max_length", 1) is not None and getattr(training_args, "max_length", 1) <= 0:
        raise UserError(f"--max_length {training_args.max_length} must be positive.")


# SFTConfig's dataset-preparation fields: lopt tokenizes the rows itself (lopt.data), so SFTTrainer skips that step
# and these would change nothing.
DATASET_PREPARATION_FIELDS = (
    "dataset_text_field",
    "dataset_kwargs",
    "chat_template_path",
    "eos_token",
    "pad_token",
)


def check_sft_args(set_fields: frozenset[str]) -> None:
    for name in DATASET_PREPARATION_FIELDS:
        if name in set_fields:
            raise UserError(
                f"--{name} has no effect in lopt sft: it tokenizes the rows itself with the model's chat template "
                "(row formats: docs/TRAINING.md)."
            )


def check_grpo_args(task_args, training_args) -> None:
    for name in ("num_generations", "max_completion_length", "num_iterations"):
        if getattr(training_args, name) <= 0:
            raise UserError(f"--{name} {getattr(training_args, name)} must be positive.")
    if task_args.max_prompt_length <= 0:
        raise UserError(f"--max_prompt_length {task_args.max_prompt_length} must be positive.")
    if training_args.steps_per_generation is not None and training_args.steps_per_generation <= 0:
        raise UserError(f"--steps_per_generation {training_args.steps_per_generation} must be positive.")
    if training_args.num_generations < 2:
        raise UserError("--num_generations must be at least 2: GRPO compares completions of the same prompt.")
    if training_args.temperature <= 0:
        raise UserError(
            f"--temperature {training_args.temperature} must be positive (GRPO samples completions)."
        )
    if not 0 < training_args.top_p <= 1:
        raise UserError(f"--top_p {training_args.top_p} must be in (0, 1].")
    if training_args.remove_unused_columns:
        raise UserError(
            "--remove_unused_columns true would drop the `answer` column the reward reads: drop it."
        )
    if training_args.use_vllm:
        raise UserError("--use_vllm is not supported by lopt grpo: LoPT trains the model that generates.")


def check_dpo_args(training_args) -> None:
    if training_args.beta <= 0:
        raise UserError(f"--beta {training_args.beta} must be positive.")


def check_model_depth(lopt_args: LoPTArguments, model_args, trust_remote_code: bool = False) -> None:
    """--num_blocks, --boundaries and --checkpoint_layers against the model's layers, read from its config
    (lopt.data.loading.model_depth: no weights built or loaded). A model whose depth only loading tells is checked by
    the trainer once loaded, with the same rules (LoPTConfig.block_ranges, parse_checkpoint_layers)."""
    if not lopt_args.is_lopt and lopt_args.checkpoint_layers is None:
        return
    from lopt.data.loading import model_depth

    revision = model_args.model_revision if model_args.model_revision != "main" else None
    num_layers = model_depth(model_args.model_name_or_path, trust_remote_code, revision)
    if num_layers is None:
        return
    if lopt_args.is_lopt:
        lopt_args.lopt_config().block_ranges(num_layers)
    if lopt_args.checkpoint_layers is not None:
        from lopt.engine.checkpointing import parse_checkpoint_layers

        parse_checkpoint_layers(lopt_args.checkpoint_layers, num_layers)
