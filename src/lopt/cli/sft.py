"""`lopt sft`: supervised post-training with LoPT or a baseline, through TRL's SFTTrainer.

Flags: LoPTArguments, TRL's ModelConfig, DataArguments and TRL's SFTConfig (every field is a flag; `--config x.yaml`
as in `trl sft`). Without --model_name_or_path it uses the built-in pretrained model and, without data flags, a
built-in task, with the built-in recipe for the fields left unset. A real base (e.g. --model_name_or_path smollm2-135m)
without data flags trains on the task extract (lopt.builtin.real_task) with its own recipe.

Multi-process: `torchrun --nproc_per_node N -m lopt sft ...` (or `accelerate launch`) trains data-parallel (DDP; the
trainer mixin syncs what DDP cannot, see lopt.engine.distributed); only rank 0 writes the outputs. `--block_parallel` puts
one LoPT block on each process instead (lopt.training.block_parallel).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from trl import ModelConfig, SFTConfig

from lopt.cli import common
from lopt.cli.parser import LoPTParser
from lopt.errors import UserError
from lopt.io import is_complete_checkpoint
from lopt.training.arguments import DataArguments, LoPTArguments

# SFTConfig's dataset-preparation fields: lopt tokenizes the rows itself (lopt.data), so SFTTrainer skips that step
# and these would change nothing.
DATASET_PREPARATION_FIELDS = (
    "dataset_text_field",
    "dataset_kwargs",
    "chat_template_path",
    "eos_token",
    "pad_token",
)
DESCRIPTION = "Post-train a causal LM with LoPT (or a baseline) on SFT data."


def make_parser() -> LoPTParser:
    from lopt.builtin.bases import BUILTIN, REAL_BASE_OBJECTS, SFT_EARLY_LR_RATIO

    real = next(iter(REAL_BASE_OBJECTS.values()))
    extract, totals = (real.recipe("sft", task) for task in real.tasks)
    return LoPTParser(
        [LoPTArguments, ModelConfig, DataArguments, SFTConfig],
        prog="lopt sft",
        description=f"{DESCRIPTION}\n\n{__doc__.split(chr(10), 2)[2].strip()}",
        epilog="Built-in recipe (built-in model, fields not set): "
        f"{describe_recipe(BUILTIN.recipe('sft', BUILTIN.default_task).values)}. A real base (e.g. {real.name}) on "
        f"its tasks {' and '.join(real.tasks)}: {describe_recipe(extract.values)} ({real.tasks[1]} trains "
        f"{totals.values['max_steps']} steps), and LoPT there with {describe_recipe(extract.lopt_objective)} "
        "(unless --aux_objective or --lambda_aux is given, or --fsdp). LoPT's --lr_k1 defaults "
        f"to {SFT_EARLY_LR_RATIO} x learning_rate. Precision: bf16 autocast on a GPU, fp32 on a CPU unless --bf16 "
        "true. The recipes are files: lopt/recipes/<base>/sft-<task>.yaml (each says where its numbers come from); "
        "a run prints the one it used and writes the flags it ran with to recipe.yaml beside the checkpoint.",
    )


def describe_recipe(recipe: dict[str, Any]) -> str:
    """ "learning_rate 1e-3, per_device_train_batch_size 16, ..." for --help."""

    def value_text(value: Any) -> str:
        if isinstance(value, float) and 0 < value < 0.01:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return str(value)

    return ", ".join(f"{name} {value_text(value)}" for name, value in recipe.items())


def recipe(values: dict[str, Any], set_fields: frozenset[str]) -> dict[str, Any]:
    """The fields lopt sets when the user did not: every command's (common.base_recipe), then the run's recipe file
    and its LoPT objective (common.command_recipe)."""
    return {
        **common.base_recipe("sft", values, set_fields),
        **common.command_recipe("sft", values, set_fields)[1],
    }


def main(argv: Sequence[str]) -> int:
    parser = make_parser()
    (lopt_args, model_args, data_args, training_args), set_fields = parser.parse(argv, recipe)
    return run(lopt_args, model_args, data_args, training_args, set_fields, parser.effective)


def training_rows(data_args: DataArguments, task: str | None, trust_remote_code: bool) -> list[dict]:
    """The training rows: a built-in task's train split, or the user's file or dataset."""
    if task is not None:
        from lopt.builtin.tasks import builtin_task_rows

        return builtin_task_rows("train", n=data_args.max_samples, task=task)
    from lopt.data.loading import load_user_rows

    return load_user_rows(
        data_args.train_file,
        data_args.dataset_name,
        data_args.dataset_config,
        data_args.split,
        data_args.max_samples,
        trust_remote_code,
    )


def eval_rows(data_args: DataArguments, task: str | None, training_args) -> list[dict] | None:
    """Rows the trainer scores under --eval_strategy: a built-in task's validation split, or --eval_file."""
    if training_args.eval_strategy == "no":
        if data_args.eval_file is not None:
            raise UserError(
                "--eval_file is scored during training only: add --eval_strategy steps (or epoch)."
            )
        return None
    if task is not None:
        from lopt.builtin.tasks import builtin_task_rows

        return builtin_task_rows("validation", task=task)
    if data_args.eval_file is None:
        raise UserError(
            f"--eval_strategy {training_args.eval_strategy.value} needs rows to score: give --eval_file."
        )
    from lopt.data.loading import load_user_rows

    return load_user_rows(data_args.eval_file, None, None, "train", None)


def run(
    lopt_args: LoPTArguments,
    model_args: ModelConfig,
    data_args: DataArguments,
    training_args: SFTConfig,
    set_fields: frozenset[str] = frozenset(),
    effective: dict[str, Any] | None = None,
) -> int:
    """`effective`: the flags the user and the recipe set (LoPTParser.effective), written beside the checkpoint as
    recipe.yaml (common.run_config)."""
    from lopt.builtin.tasks import BUILTIN_TASKS

    # Checks in the order a user fixes them: model path (the parser), data, then method and trainer flags.
    task = common.check_data("sft", model_args, data_args, tuple(BUILTIN_TASKS))
    data_args.check()
    rows = training_rows(data_args, task, training_args.trust_remote_code)
    evaluation = eval_rows(data_args, task, training_args)
    lopt_args.check(set_fields)
    common.check_model_flags(model_args, lopt_args)
    common.check_training_args(training_args, lopt_args, "sft")
    for name in DATASET_PREPARATION_FIELDS:
        if name in set_fields:
            raise UserError(
                f"--{name} has no effect in lopt sft: it tokenizes the rows itself with the model's chat template "
                "(row formats: docs/TRAINING.md)."
            )
    values = common.run_arguments(lopt_args, model_args, data_args, training_args, set_fields=set_fields)
    chosen, _ = common.command_recipe("sft", values, set_fields)
    early_lr = common.early_learning_rate(lopt_args, training_args.learning_rate, chosen.early_lr_ratio)
    if lopt_args.block_parallel:
        from lopt.training.block_parallel import run_block_parallel

        return run_block_parallel(rows, lopt_args, model_args, data_args, training_args, early_lr, task)

    from transformers import set_seed

    from lopt.data.rows import tokenize_rows
    from lopt.engine.distributed import finish
    from lopt.integrations import LoPTSFTTrainer

    resume = common.resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)
    model, tokenizer, model_path = common.load_model(
        model_args, training_args, progress=not training_args.disable_tqdm
    )
    train_dataset = tokenize_rows(rows, tokenizer, training_args.max_length)
    eval_dataset = tokenize_rows(evaluation, tokenizer, training_args.max_length) if evaluation else None
    prepared = common.prepare_model(model, lopt_args, model_args)
    fsdp = common.take_fsdp(training_args)
    if fsdp and lopt_args.clip_per_block:
        raise UserError(
            "--clip_per_block does not combine with --fsdp yet: clip with one global norm (drop it)."
        )
    trainer = LoPTSFTTrainer(
        model=prepared.model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **common.lopt_trainer_kwargs(prepared, early_lr, training_args.output_dir, lopt_args, fsdp),
    )
    main_process = trainer.args.should_save  # rank 0 under DDP; the only process that writes or evaluates
    if main_process:
        print(f"lopt sft: {common.describe_recipe(chosen, values, set_fields)}", file=sys.stderr)
        print(
            f"lopt sft: {common.describe_method(prepared, training_args.learning_rate, early_lr)}, "
            f"model={model_path}, task={task or 'custom'}, rows={len(train_dataset)}, lr={training_args.learning_rate}, "
            f"batch={training_args.per_device_train_batch_size}x{training_args.gradient_accumulation_steps}, "
            f"max_steps={training_args.max_steps}, output_dir={training_args.output_dir}",
            file=sys.stderr,
        )
    result = trainer.train(resume_from_checkpoint=resume)
    if not main_process:
        finish()  # wait for rank 0's outputs (and exit cleanly: see lopt.engine.distributed.finish)
        return 0
    run_args = common.run_arguments(lopt_args, model_args, data_args, training_args, set_fields=set_fields)
    config = common.run_config("sft", effective, chosen.name) if effective is not None else None
    common.save_final_model(trainer, prepared, tokenizer, training_args.output_dir, run_args, config)

    summary = {
        "method": prepared.method,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
    }
    if task is not None and data_args.eval_samples > 0:
        from lopt.evaluation.evaluate import builtin_task_score

        summary["heldout_exact_match"] = builtin_task_score(
            trainer.model, tokenizer, data_args.eval_samples, task, progress=not training_args.disable_tqdm
        )
        summary.update(
            knowledge_kept(trainer.model, tokenizer, model_path, progress=not training_args.disable_tqdm)
        )
    code = common.finish("sft", training_args.output_dir, summary)
    finish()
    return code


def knowledge_kept(model, tokenizer, base_path, progress: bool = False) -> dict:
    """When `base_path` is a base whose probe is world knowledge (a real base, e.g. smollm2-135m, not a checkpoint of
    one): {"knowledge_kept": the country facts the base answers right that the trained model still answers right, a
    Score}, what the README's verdict measures; {} for any other model."""
    from lopt.builtin.bases import base_of

    base = base_of(str(base_path))
    if base.probe != "world" or base.checkpoint:
        return {}
    from lopt.evaluation.world_knowledge import knowledge_kept_after_training

    kept = knowledge_kept_after_training(model, tokenizer, base_path, progress=progress)
    return {"knowledge_kept": kept if kept is not None else "none (the base answers no item right)"}


def starting_model(command: str, model_args, task: str | None, progress: bool = True) -> str | None:
    """The model an RL command starts from: the user's, else for a built-in task the built-in SFT checkpoint of that
    task (the raw base never answers it, so it has nothing to reinforce), else the built-in base (None).

    Announced as the command's first line; the checkpoint is made on first use with `lopt sft`'s built-in recipe."""
    from lopt.builtin.bases import base_of

    if not base_of(model_args.model_name_or_path).rl_starts_from_sft(task):
        return None
    print(
        f"lopt {command}: no --model_name_or_path: starting from the built-in SFT checkpoint of task {task} (the "
        f"built-in model after `lopt sft --task {task}`, cached beside it; made now if missing)",
        file=sys.stderr,
        flush=True,
    )
    return str(builtin_sft_checkpoint(task, progress=progress))


def builtin_sft_checkpoint(task: str, progress: bool = True):
    """Path of the built-in model after `lopt sft --task TASK` with the built-in recipe, made once beside the built-in
    model (the same cache, preset and version) by whichever process takes its lock (`lopt.io.build_cache_folder`).

    It trains in a process of its own, outside any torchrun launch this one belongs to: every rank of a launch may
    need it, and training it inside the launch would make it a data-parallel run of that launch."""
    import subprocess
    from pathlib import Path

    from lopt.builtin.base import builtin_model_path
    from lopt.io import build_cache_folder

    base = Path(builtin_model_path(progress=progress))

    def complete(folder: Path) -> bool:  # summary.json is written after the checkpoint itself
        return is_complete_checkpoint(folder, "summary.json")

    def train(tmp: Path) -> None:
        argv = ["--task", task, "--output_dir", str(tmp), "--eval_samples", "0"]
        if not progress:
            argv.append("--no_progress")
        alone = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        code = subprocess.call([sys.executable, "-m", "lopt", "sft", *argv], env=alone)
        if code != 0:
            raise UserError(
                f"making the built-in SFT checkpoint of task {task} failed (exit {code}, its error above): "
                f"`lopt sft --task {task}` shows it alone."
            )

    return build_cache_folder(base.parent / f"{base.name}-sft-{task}", train, complete)


# torchrun's (and accelerate's) environment: a process started without them is a run of its own.
LAUNCH_VARIABLES = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
        "ACCELERATE_USE_FSDP",
        "ACCELERATE_USE_DEEPSPEED",
    }
)
