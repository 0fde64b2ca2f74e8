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

import sys
from collections.abc import Sequence
from typing import Any

from trl import ModelConfig, SFTConfig

from lopt.cli.parser import LoPTParser
from lopt.training import checks, outputs, recipes, start, task_rows
from lopt.training.arguments import DataArguments, LoPTArguments

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
    """The fields lopt sets when the user did not: every command's (recipes.base_recipe), then the run's recipe file
    and its LoPT objective (recipes.command_recipe)."""
    return {
        **recipes.base_recipe("sft", values, set_fields),
        **recipes.command_recipe("sft", values, set_fields)[1],
    }


def main(argv: Sequence[str]) -> int:
    parser = make_parser()
    (lopt_args, model_args, data_args, training_args), set_fields = parser.parse(argv, recipe)
    return run(lopt_args, model_args, data_args, training_args, set_fields, parser.effective)


def run(
    lopt_args: LoPTArguments,
    model_args: ModelConfig,
    data_args: DataArguments,
    training_args: SFTConfig,
    set_fields: frozenset[str] = frozenset(),
    effective: dict[str, Any] | None = None,
) -> int:
    """`effective`: the flags the user and the recipe set (LoPTParser.effective), written beside the checkpoint as
    recipe.yaml (outputs.run_config)."""
    from lopt.builtin.tasks import BUILTIN_TASKS

    # Checks in the order a user fixes them, before any model is built or loaded: model path (the parser), data and
    # every row, then the other flags (the LoPT ones against the model's depth, read from its config).
    task = checks.check_data("sft", model_args, data_args, tuple(BUILTIN_TASKS))
    data_args.check()
    rows = task_rows.sft_rows(data_args, task, training_args.trust_remote_code)
    evaluation = task_rows.sft_eval_rows(data_args, task, training_args)
    checks.check_flags("sft", lopt_args, model_args, training_args, set_fields)
    values = outputs.run_arguments(lopt_args, model_args, data_args, training_args, set_fields=set_fields)
    chosen, _ = recipes.command_recipe("sft", values, set_fields)
    early_lr = recipes.early_learning_rate(lopt_args, training_args.learning_rate, chosen.early_lr_ratio)
    if lopt_args.block_parallel:
        from lopt.training.block_parallel import run_block_parallel

        return run_block_parallel(rows, lopt_args, model_args, data_args, training_args, early_lr, task)

    from transformers import set_seed

    from lopt.data.rows import tokenize_rows
    from lopt.engine.distributed import finish
    from lopt.integrations import LoPTSFTTrainer

    resume = start.resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)
    model, tokenizer, model_path = start.load_model(
        model_args, training_args, progress=not training_args.disable_tqdm
    )
    train_dataset = tokenize_rows(rows, tokenizer, training_args.max_length)
    eval_dataset = tokenize_rows(evaluation, tokenizer, training_args.max_length) if evaluation else None
    prepared = start.prepare_model(model, lopt_args, model_args)
    fsdp = start.take_fsdp(training_args)
    trainer = LoPTSFTTrainer(
        model=prepared.model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **start.lopt_trainer_kwargs(prepared, early_lr, training_args.output_dir, lopt_args, fsdp),
    )
    main_process = trainer.args.should_save  # rank 0 under DDP; the only process that writes or evaluates
    if main_process:
        print(f"lopt sft: {recipes.describe_recipe(chosen, values, set_fields)}", file=sys.stderr)
        print(
            f"lopt sft: {start.describe_method(prepared, training_args.learning_rate, early_lr)}, "
            f"model={model_path}, task={task or 'custom'}, rows={len(train_dataset)}, lr={training_args.learning_rate}, "
            f"batch={training_args.per_device_train_batch_size}x{training_args.gradient_accumulation_steps}, "
            f"max_steps={training_args.max_steps}, output_dir={training_args.output_dir}",
            file=sys.stderr,
        )
    result = trainer.train(resume_from_checkpoint=resume)
    if not main_process:
        finish()  # wait for rank 0's outputs (and exit cleanly: see lopt.engine.distributed.finish)
        return 0
    run_args = outputs.run_arguments(lopt_args, model_args, data_args, training_args, set_fields=set_fields)
    config = outputs.run_config("sft", effective, chosen.name) if effective is not None else None
    outputs.save_final_model(trainer, prepared, tokenizer, training_args.output_dir, run_args, config)

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
            outputs.knowledge_kept(
                trainer.model, tokenizer, model_path, progress=not training_args.disable_tqdm
            )
        )
    code = outputs.finish("sft", training_args.output_dir, summary)
    finish()
    return code
