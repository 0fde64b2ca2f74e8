"""`lopt dpo`: Direct Preference Optimization with LoPT (or a baseline) through TRL's DPOTrainer.

Flags: LoPTArguments, TRL's ModelConfig, DataArguments and TRL's DPOConfig (every field is a flag; `--config x.yaml`
as in `trl dpo`). Rows hold `prompt`, `chosen` and `rejected`, each a string or a list of chat messages. Without
--model_name_or_path it starts from the built-in SFT checkpoint (the built-in model after `lopt sft` on the built-in
task, made on first use); without data flags it trains on that task's preference pairs (chosen = the correct answer,
rejected = a plausible wrong one).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from trl import DPOConfig, ModelConfig

from lopt.cli import common, sft
from lopt.cli.grpo import message_list, prompt_messages
from lopt.cli.parser import LoPTParser
from lopt.errors import DataError, UserError
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
    """The fields lopt sets when the user did not: every command's (common.base_recipe), then the recipe file of the
    run's task (the built-in task's pairs, or the user's)."""
    return {
        **common.base_recipe("dpo", values, set_fields),
        **common.command_recipe("dpo", values, set_fields)[1],
    }


def main(argv: Sequence[str]) -> int:
    parser = make_parser()
    parsed, set_fields = parser.parse(argv, recipe)
    return run(*parsed, set_fields=set_fields, effective=parser.effective)


# --- rows -----------------------------------------------------------------------------------------------------


def _completion(row: Mapping[str, Any], key: str, index: int) -> list[dict[str, str]]:
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"row {index}: field {key!r} is empty; fill it in or drop the row")
        return [{"role": "assistant", "content": value}]
    messages = message_list(value, index, key)
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"row {index}: {key!r} must end with a non-empty assistant message")
    return messages


def to_preference(row: Any, index: int) -> tuple[list[dict[str, str]], list[dict], list[dict]]:
    """Normalise one row to (prompt messages, chosen messages, rejected messages)."""
    if not isinstance(row, Mapping):
        raise DataError(f"row {index}: expected an object with named fields, got {type(row).__name__}")
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
    if missing:
        keys = ", ".join(repr(k) for k in row) or "none"
        raise DataError(
            f"row {index}: missing field(s) {', '.join(missing)} (row keys: {keys}); DPO rows need prompt, "
            "chosen and rejected (strings or chat message lists)"
        )
    return (
        prompt_messages(row, "prompt", index),
        _completion(row, "chosen", index),
        _completion(row, "rejected", index),
    )


def build_dataset(rows: list, tokenizer):
    """Rows -> a datasets.Dataset in TRL's preference format: conversational if the tokenizer has a chat template
    (TRL applies it), else plain text laid out as `lopt sft` does (TRL appends EOS to the completions)."""
    import datasets

    from lopt.data.rows import format_prompt, has_chat_template

    templated = has_chat_template(tokenizer)
    items = []
    for i, row in enumerate(rows):
        prompt, chosen, rejected = to_preference(row, i)
        if templated:
            items.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            items.append(
                {
                    "prompt": format_prompt(prompt, tokenizer),
                    "chosen": "\n".join(m["content"] for m in chosen),
                    "rejected": "\n".join(m["content"] for m in rejected),
                }
            )
    return datasets.Dataset.from_list(items)


# --- the command ----------------------------------------------------------------------------------------------


def run(
    lopt_args: LoPTArguments,
    model_args: ModelConfig,
    data_args: DataArguments,
    training_args: DPOConfig,
    set_fields: frozenset[str] = frozenset(),
    effective: dict[str, Any] | None = None,
) -> int:
    """`effective`: the flags the user and the recipe set (LoPTParser.effective), written beside the checkpoint as
    recipe.yaml (common.run_config)."""
    from lopt.builtin.tasks import DEFAULT_TASK

    # Checks in the order a user fixes them: model path (the parser), data, then method and trainer flags.
    # Preference pairs exist for the default built-in task only (its wrong answers are task-specific).
    task = common.check_data("dpo", model_args, data_args, (DEFAULT_TASK,))
    data_args.check()
    if task is not None:
        from lopt.builtin.tasks import builtin_preference_rows

        rows = builtin_preference_rows("train", n=data_args.max_samples)
    else:
        from lopt.data.loading import load_user_rows

        rows = load_user_rows(
            data_args.train_file,
            data_args.dataset_name,
            data_args.dataset_config,
            data_args.split,
            data_args.max_samples,
            training_args.trust_remote_code,
        )
    for i, row in enumerate(rows):
        to_preference(row, i)
    lopt_args.check(set_fields)
    common.check_model_flags(model_args, lopt_args)
    common.check_training_args(training_args, lopt_args, "dpo")
    if training_args.eval_strategy != "no":
        raise UserError(
            "--eval_strategy is not supported by lopt dpo (no eval set): the built-in task's test split is scored "
            "after training (--eval_samples)."
        )
    if training_args.beta <= 0:
        raise UserError(f"--beta {training_args.beta} must be positive.")
    if lopt_args.block_parallel:
        raise UserError("--block_parallel is an sft option: lopt dpo trains data-parallel under torchrun.")
    values = common.run_arguments(lopt_args, model_args, data_args, training_args, set_fields=set_fields)
    chosen, _ = common.command_recipe("dpo", values, set_fields)
    early_lr = common.early_learning_rate(lopt_args, training_args.learning_rate, chosen.early_lr_ratio)
    resume = common.resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    progress = not training_args.disable_tqdm
    start = sft.starting_model("dpo", model_args, task, progress)

    from transformers import set_seed

    from lopt.integrations import LoPTDPOTrainer

    set_seed(training_args.seed)
    model, tokenizer, model_path = common.load_model(model_args, training_args, start, progress=progress)
    train_dataset = build_dataset(rows, tokenizer)
    prepared = common.prepare_model(model, lopt_args, model_args)
    trainer = LoPTDPOTrainer(
        model=prepared.model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **common.lopt_trainer_kwargs(prepared, early_lr, training_args.output_dir, lopt_args),
    )
    if len(trainer.train_dataset) == 0:
        raise DataError(
            f"every pair's prompt fills --max_length {training_args.max_length}: no completion token is left to "
            "compare; raise --max_length or shorten the prompts"
        )
    a = training_args
    print(f"lopt dpo: {common.describe_recipe(chosen, values, set_fields)}", file=sys.stderr)
    print(
        f"lopt dpo: {common.describe_method(prepared, a.learning_rate, early_lr)}, model={model_path}, "
        f"pairs={len(trainer.train_dataset)}, beta={a.beta}, loss_type={','.join(a.loss_type)}, lr={a.learning_rate}, "
        f"batch={a.per_device_train_batch_size}x{a.gradient_accumulation_steps}, max_steps={a.max_steps}, "
        f"output_dir={a.output_dir}",
        file=sys.stderr,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    run_args = common.run_arguments(lopt_args, model_args, data_args, training_args, set_fields=set_fields)
    config = common.run_config("dpo", effective, chosen.name) if effective is not None else None
    common.save_final_model(trainer, prepared, tokenizer, training_args.output_dir, run_args, config)

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
    return common.finish("dpo", training_args.output_dir, summary)
