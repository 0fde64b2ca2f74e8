"""`lopt dpo`: Direct Preference Optimization with LoPT (or a baseline) through TRL's DPOTrainer.

Flags: LoPTArguments, TRL's ModelConfig, DataArguments and TRL's DPOConfig (every field is a flag; `--config x.yaml`
as in `trl dpo`). Rows hold `prompt`, `chosen` and `rejected`, each a string or a list of chat messages. Without
--model_name_or_path it starts from the built-in SFT checkpoint (the built-in model after `lopt sft` on the built-in
task, made on first use); without data flags it trains on that task's preference pairs (chosen = the correct answer,
rejected = a plausible wrong one).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from trl import DPOConfig, ModelConfig

from lopt.cli.parser import LoPTParser
from lopt.data.rl_rows import preference_dataset
from lopt.errors import DataError
from lopt.training import checks, outputs, recipes, start, task_rows
from lopt.training.arguments import DataArguments, LoPTArguments

DESCRIPTION = "Direct Preference Optimization with LoPT (or a baseline) on preference pairs."


def make_parser() -> LoPTParser:
    return LoPTParser(
        [LoPTArguments, ModelConfig, DataArguments, DPOConfig],
        prog="lopt dpo",
        description=f"{DESCRIPTION}\n\n{__doc__.split(chr(10), 2)[2].strip()}",
        epilog="Built-in task recipe (fields not set): learning_rate 1e-4 (--lr_k1 = learning_rate/20), "
        "per_device_train_batch_size 8 pairs, max_length 128, max_steps 60, logging_steps 5.",
    )


def recipe(values: dict[str, Any], set_fields: frozenset[str]) -> dict[str, Any]:
    """The fields lopt sets when the user did not: every command's (recipes.base_recipe), then the recipe file of the
    run's task (the built-in task's pairs, or the user's)."""
    return {
        **recipes.base_recipe("dpo", values, set_fields),
        **recipes.command_recipe("dpo", values, set_fields)[1],
    }


def main(argv: Sequence[str]) -> int:
    parser = make_parser()
    parsed, set_fields = parser.parse(argv, recipe)
    return run(*parsed, set_fields=set_fields, effective=parser.effective)


def run(
    lopt_args: LoPTArguments,
    model_args: ModelConfig,
    data_args: DataArguments,
    training_args: DPOConfig,
    set_fields: frozenset[str] = frozenset(),
    effective: dict[str, Any] | None = None,
) -> int:
    """`effective`: the flags the user and the recipe set (LoPTParser.effective), written beside the checkpoint as
    recipe.yaml (outputs.run_config)."""
    from lopt.builtin.tasks import DEFAULT_TASK

    # Checks in the order a user fixes them, before any model is built or loaded: model path (the parser), data and
    # every row, then the other flags (the LoPT ones against the model's depth, read from its config). Preference
    # pairs exist for the default built-in task only (its wrong answers are task-specific).
    task = checks.check_data("dpo", model_args, data_args, (DEFAULT_TASK,))
    data_args.check()
    rows = task_rows.preference_rows(data_args, task, training_args.trust_remote_code)
    checks.check_flags("dpo", lopt_args, model_args, training_args, set_fields)
    values = outputs.run_arguments(lopt_args, model_args, data_args, training_args, set_fields=set_fields)
    chosen, _ = recipes.command_recipe("dpo", values, set_fields)
    early_lr = recipes.early_learning_rate(lopt_args, training_args.learning_rate, chosen.early_lr_ratio)
    resume = start.resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    progress = not training_args.disable_tqdm
    start_model = start.starting_model("dpo", model_args, task, progress)

    from transformers import set_seed

    from lopt.integrations import LoPTDPOTrainer

    set_seed(training_args.seed)
    model, tokenizer, model_path = start.load_model(model_args, training_args, start_model, progress=progress)
    train_dataset = preference_dataset(rows, tokenizer)
    prepared = start.prepare_model(model, lopt_args, model_args)
    trainer = LoPTDPOTrainer(
        model=prepared.model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **start.lopt_trainer_kwargs(prepared, early_lr, training_args.output_dir, lopt_args),
    )
    if len(trainer.train_dataset) == 0:
        raise DataError(
            f"every pair's prompt fills --max_length {training_args.max_length}: no completion token is left to "
            "compare; raise --max_length or shorten the prompts"
        )
    a = training_args
    print(f"lopt dpo: {recipes.describe_recipe(chosen, values, set_fields)}", file=sys.stderr)
    print(
        f"lopt dpo: {start.describe_method(prepared, a.learning_rate, early_lr)}, model={model_path}, "
        f"pairs={len(trainer.train_dataset)}, beta={a.beta}, loss_type={','.join(a.loss_type)}, lr={a.learning_rate}, "
        f"batch={a.per_device_train_batch_size}x{a.gradient_accumulation_steps}, max_steps={a.max_steps}, "
        f"output_dir={a.output_dir}",
        file=sys.stderr,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    run_args = outputs.run_arguments(lopt_args, model_args, data_args, training_args, set_fields=set_fields)
    config = outputs.run_config("dpo", effective, chosen.name) if effective is not None else None
    outputs.save_final_model(trainer, prepared, tokenizer, training_args.output_dir, run_args, config)

    summary = {
        "method": prepared.method,
        "start_model": model_path,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
    }
    logged = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    if logged:
        summary["reward_accuracy_last_log"] = logged[-1]["rewards/accuracies"]
        summary["reward_margin_last_log"] = logged[-1].get("rewards/margins")
    if task is not None and data_args.eval_samples > 0:
        from lopt.evaluation.evaluate import builtin_task_score

        summary["heldout_exact_match"] = builtin_task_score(
            trainer.model, tokenizer, data_args.eval_samples, task, progress=not training_args.disable_tqdm
        )
    return outputs.finish("dpo", training_args.output_dir, summary)
