"""The rows a training command trains on, read and checked before any model is built or loaded: a built-in task's
split, a hub task of `lopt grpo` (the LoPT authors' datasets), or the user's file or dataset.

Each command's rows are checked whole here (`sft_rows`, `grpo_rows`, `preference_rows`), so a bad row fails in one
line before the minutes a model takes to build; the tokenizer-dependent checks (lengths) come with the datasets
(lopt.data.rows.tokenize_rows, lopt.data.rl_rows)."""

from __future__ import annotations

from lopt.errors import UserError
from lopt.training.arguments import DataArguments

# --task -> (hub dataset, config): the datasets of the authors' train_grpo.py.
TASK_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "numinamath": ("AI-MO/NuminaMath-CoT", None)}
# Prepended to plain-text prompts of the hub tasks, so the model states its answer where the reward looks for it.
TASK_INSTRUCTIONS = {
    "gsm8k": "Solve the problem step by step, then give the final answer on its own line as '#### <number>'.",
    "numinamath": "Solve the problem step by step, then give the final answer as \\boxed{<answer>}.",
}


def _user_rows(
    data_args: DataArguments, trust_remote_code: bool, dataset_name=None, dataset_config=None
) -> list:
    from lopt.data.loading import load_user_rows

    return load_user_rows(
        data_args.train_file,
        dataset_name or data_args.dataset_name,
        dataset_config or data_args.dataset_config,
        data_args.split,
        data_args.max_samples,
        trust_remote_code,
    )


def sft_rows(data_args: DataArguments, task: str | None, trust_remote_code: bool) -> list[dict]:
    """The SFT training rows, each checked: a built-in task's train split, or the user's file or dataset."""
    from lopt.data.rows import to_prompt_completion

    if task is not None:
        from lopt.builtin.tasks import builtin_task_rows

        rows = builtin_task_rows("train", n=data_args.max_samples, task=task)
    else:
        rows = _user_rows(data_args, trust_remote_code)
    for i, row in enumerate(rows):
        to_prompt_completion(row, i)
    return rows


def sft_eval_rows(data_args: DataArguments, task: str | None, training_args) -> list[dict] | None:
    """Rows the trainer scores under --eval_strategy, each checked: a built-in task's validation split, or
    --eval_file."""
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
    from lopt.data.rows import to_prompt_completion

    rows = load_user_rows(data_args.eval_file, None, None, "train", None)
    for i, row in enumerate(rows):
        to_prompt_completion(row, i)
    return rows


def grpo_rows(data_args: DataArguments, task: str | None, trust_remote_code: bool) -> list:
    """GRPO rows, each checked: a built-in task's train split as prompt/answer, a hub task, or the user's rows."""
    from lopt.builtin.tasks import BUILTIN_TASKS
    from lopt.data.rl_rows import to_prompt_answer

    if task in BUILTIN_TASKS:
        from lopt.builtin.tasks import builtin_grpo_rows

        rows = builtin_grpo_rows("train", n=data_args.max_samples, task=task)
    elif task is not None:
        dataset_name, default_config = TASK_DATASETS[task]
        rows = _user_rows(
            data_args, trust_remote_code, dataset_name, data_args.dataset_config or default_config
        )
    else:
        rows = _user_rows(data_args, trust_remote_code)
    for i, row in enumerate(rows):
        to_prompt_answer(row, i)
    return rows


def preference_rows(data_args: DataArguments, task: str | None, trust_remote_code: bool) -> list:
    """DPO pairs, each checked: the built-in task's preference pairs (chosen = the correct answer, rejected = a
    plausible wrong one), or the user's rows."""
    from lopt.data.rl_rows import to_preference

    if task is not None:
        from lopt.builtin.tasks import builtin_preference_rows

        rows = builtin_preference_rows("train", n=data_args.max_samples)
    else:
        rows = _user_rows(data_args, trust_remote_code)
    for i, row in enumerate(rows):
        to_preference(row, i)
    return rows
