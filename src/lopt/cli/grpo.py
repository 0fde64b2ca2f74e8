"""`lopt grpo`: on-policy GRPO with LoPT (or a baseline) through TRL's GRPOTrainer, with verifiable rewards.

Flags: LoPTArguments, TRL's ModelConfig, DataArguments, GRPOTaskArguments and TRL's GRPOConfig (every field is a flag;
`--config x.yaml` as in `trl grpo`). Without --model_name_or_path it starts from the built-in SFT checkpoint (the
built-in model after `lopt sft` on the built-in task, made on first use); without data flags it trains on that task
(the reward is exact match with the task's answer). From a checkpoint `lopt sft` wrote, the task (and the base) come
from its lopt_args.json unless --task is given. `--task gsm8k` / `--task numinamath` load the LoPT authors' hub
datasets.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig, ModelConfig

from lopt.cli import common, sft
from lopt.cli.parser import LoPTParser
from lopt.errors import DataError, UserError
from lopt.training.arguments import DataArguments, LoPTArguments
from lopt.training.rl import recorded_task

DESCRIPTION = "On-policy GRPO with LoPT (or a baseline) and verifiable rewards."
# --task -> (hub dataset, config): the datasets of the authors' train_grpo.py.
TASK_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "numinamath": ("AI-MO/NuminaMath-CoT", None)}
REWARDS = ("auto", "math", "exact_match", "json_match")
# Prepended to plain-text prompts of the hub tasks, so the model states its answer where the reward looks for it.
TASK_INSTRUCTIONS = {
    "gsm8k": "Solve the problem step by step, then give the final answer on its own line as '#### <number>'.",
    "numinamath": "Solve the problem step by step, then give the final answer as \\boxed{<answer>}.",
}

# (prompt field, answer field) pairs accepted in GRPO rows, tried in this order.
PROMPT_ANSWER_FIELDS = (
    ("prompt", "answer"),
    ("question", "answer"),
    ("problem", "solution"),
    ("problem", "answer"),
    ("prompt", "solution"),
)
ROW_FORMATS_HELP = ", ".join(f"{p}/{a}" for p, a in PROMPT_ANSWER_FIELDS)


@dataclass
class GRPOTaskArguments:
    """What `lopt grpo` adds to TRL's GRPOConfig: the reward, a prompt-length filter and a plot."""

    reward: str = field(
        default="auto",
        metadata={
            "help": "math: final answer (\\boxed{} > '####' > last number) compared by value; exact_match: the "
            "whole completion equals the answer after normalisation; json_match: the completion is exactly the "
            "answer's JSON object. auto: the built-in task's scorer (json_match for extract and totals, else "
            "exact_match), else math.",
            "choices": REWARDS,
        },
    )
    max_prompt_length: int = field(
        default=1024,
        metadata={
            "help": "Rows whose prompt is longer (in tokens) are skipped. Default 128 built-in task / 1024."
        },
    )
    plot: bool = field(
        default=False,
        metadata={"help": "Write reward_curve.png (mean reward per logged step) to output_dir."},
    )


def make_parser() -> LoPTParser:
    return LoPTParser(
        [LoPTArguments, ModelConfig, DataArguments, GRPOTaskArguments, GRPOConfig],
        prog="lopt grpo",
        description=f"{DESCRIPTION}\n\n{__doc__.split(chr(10), 2)[2].strip()}",
        epilog="Batches count completions: one generation batch (--per_device_train_batch_size x "
        "--steps_per_generation) holds prompts x --num_generations completions, so it must be a multiple of "
        "--num_generations. Built-in task recipe (fields not set): learning_rate 2e-4 (--lr_k1 = learning_rate/20), "
        "per_device_train_batch_size 32, num_generations 8, max_completion_length 8, max_steps 150; tasks extract "
        "and totals (a real base's, from a checkpoint `lopt sft` trained on it): learning_rate 1e-5 (--lr_k1 = "
        "0.3 x learning_rate), per_device_train_batch_size 8, num_generations 4, max_completion_length the "
        "longest reference answer of the training rows in tokens + 1, plus 25%, max_steps 50, and LoPT with "
        "--aux_objective anchor --clip_per_block (unless --aux_objective or --lambda_aux is given); all tasks: "
        "temperature 0.7, top_p 0.95, loss_type grpo.",
    )


def recipe(values: dict[str, Any], set_fields: frozenset[str]) -> dict[str, Any]:
    """The fields lopt sets when the user did not: every command's (common.base_recipe), then the recipe file of the
    run's task (a starting checkpoint's recorded task when --task is not given) and its LoPT objective."""
    recorded = recorded_task(values["model_name_or_path"])
    return {
        **common.base_recipe("grpo", values, set_fields),
        **common.command_recipe("grpo", values, set_fields, recorded)[1],
    }


def main(argv: Sequence[str]) -> int:
    parser = make_parser()
    parsed, set_fields = parser.parse(argv, recipe)
    return run(*parsed, set_fields=set_fields, effective=parser.effective)


def check_grpo_args(task_args: GRPOTaskArguments, training_args: GRPOConfig) -> None:
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
    if training_args.eval_strategy != "no":
        raise UserError(
            "--eval_strategy is not supported by lopt grpo (no eval set): a built-in task's test split is scored "
            "after training (--eval_samples)."
        )
    if training_args.use_vllm:
        raise UserError("--use_vllm is not supported by lopt grpo: LoPT trains the model that generates.")


# --- rows -----------------------------------------------------------------------------------------------------


def message_list(value: Any, index: int, field: str) -> list[dict[str, str]]:
    """A list of {role, content} chat messages, validated (one-line DataError naming the row and field)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"row {index}: field {field!r} must be a string or a non-empty list of chat messages")
    messages = []
    for j, message in enumerate(value):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise DataError(
                f"row {index}: {field}[{j}] must be an object with a string 'role' and a string 'content'"
            )
        messages.append({"role": role, "content": content})
    return messages


def prompt_messages(
    row: Mapping[str, Any], key: str, index: int, instruction: str | None = None
) -> list[dict[str, str]]:
    """The row's prompt as chat messages: a string becomes a user message (after an optional `system` string),
    prefixed with `instruction` if given. A chat list is kept as it is."""
    value = row[key]
    if isinstance(value, list):
        messages = message_list(value, index, key)
        if messages[-1]["role"] == "assistant":
            raise DataError(
                f"row {index}: the prompt in {key!r} ends with an assistant message; a prompt ends with the turn "
                "the model answers (e.g. a user message)"
            )
        return messages
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"row {index}: field {key!r} (the prompt) must be a non-empty string or a chat list")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"row {index}: field 'system' must be a string or absent")
    text = f"{instruction}\n\n{value}" if instruction else value
    return ([{"role": "system", "content": system}] if system and system.strip() else []) + [
        {"role": "user", "content": text}
    ]


def to_prompt_answer(
    row: Any, index: int, instruction: str | None = None
) -> tuple[list[dict[str, str]], str]:
    """Normalise one GRPO row to (prompt messages, reference answer text)."""
    if not isinstance(row, Mapping):
        raise DataError(f"row {index}: expected an object with named fields, got {type(row).__name__}")
    for prompt_key, answer_key in PROMPT_ANSWER_FIELDS:
        if prompt_key in row and answer_key in row:
            answer = row[answer_key]
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise DataError(
                    f"row {index}: field {answer_key!r} (the reference answer) must be a string or a number"
                )
            answer = str(answer)
            if not answer.strip():
                raise DataError(f"row {index}: field {answer_key!r} (the reference answer) is empty")
            return prompt_messages(row, prompt_key, index, instruction), answer
    keys = ", ".join(repr(k) for k in row) or "none"
    raise DataError(
        f"row {index}: no prompt/answer fields (row keys: {keys}); GRPO rows need one of {ROW_FORMATS_HELP}"
    )


def model_prompt(messages: list[dict[str, str]], tokenizer) -> list[dict[str, str]] | str:
    """What the trainer gets as a prompt: the chat messages if the tokenizer has a chat template (TRL applies it),
    else the plain prompt text exactly as `lopt sft` lays it out."""
    from lopt.data.rows import format_prompt, has_chat_template

    return messages if has_chat_template(tokenizer) else format_prompt(messages, tokenizer)


def build_dataset(rows: list, tokenizer, max_prompt_length: int, instruction: str | None = None):
    """Rows -> a datasets.Dataset with `prompt` and `answer`; prompts over max_prompt_length tokens are skipped."""
    import datasets

    from lopt.data.rows import encode_prompt

    items, skipped = [], 0
    for i, row in enumerate(rows):
        messages, answer = to_prompt_answer(row, i, instruction)
        if len(encode_prompt(messages, tokenizer)) > max_prompt_length:
            skipped += 1
            continue
        items.append({"prompt": model_prompt(messages, tokenizer), "answer": answer})
    if not items:
        raise DataError(
            f"all {len(rows)} rows have prompts longer than --max_prompt_length {max_prompt_length} tokens; "
            "raise it or shorten the prompts"
        )
    if skipped:
        print(
            f"lopt grpo: skipped {skipped} of {len(rows)} rows whose prompt is longer than "
            f"--max_prompt_length {max_prompt_length}",
            file=sys.stderr,
        )
    return datasets.Dataset.from_list(items)


def load_task_rows(data_args: DataArguments, task: str | None, trust_remote_code: bool) -> list:
    """GRPO rows: a built-in task's train split as prompt/answer, a hub task, or the user's rows."""
    from lopt.builtin.tasks import BUILTIN_TASKS
    from lopt.data.loading import load_user_rows

    if task in BUILTIN_TASKS:
        from lopt.builtin.tasks import builtin_grpo_rows

        return builtin_grpo_rows("train", n=data_args.max_samples, task=task)
    dataset_name, dataset_config = data_args.dataset_name, data_args.dataset_config
    if task is not None:
        dataset_name, default_config = TASK_DATASETS[task]
        dataset_config = dataset_config or default_config
    return load_user_rows(
        data_args.train_file,
        dataset_name,
        dataset_config,
        data_args.split,
        data_args.max_samples,
        trust_remote_code,
    )


def reward_function(name: str, task: str | None):
    from lopt.builtin.tasks import BUILTIN_TASKS
    from lopt.training.rewards import REWARD_FUNCTIONS

    if name == "auto":
        from lopt.builtin.tasks import REAL_BASE_TASKS

        name = "json_match" if task in REAL_BASE_TASKS else "exact_match" if task in BUILTIN_TASKS else "math"
    return REWARD_FUNCTIONS[name]


# --- the command ----------------------------------------------------------------------------------------------


def run(
    lopt_args: LoPTArguments,
    model_args: ModelConfig,
    data_args: DataArguments,
    task_args: GRPOTaskArguments,
    training_args: GRPOConfig,
    set_fields: frozenset[str] = frozenset(),
    effective: dict[str, Any] | None = None,
) -> int:
    """`effective`: the flags the user and the recipe set (LoPTParser.effective), written beside the checkpoint as
    recipe.yaml (common.run_config)."""
    from lopt.builtin.tasks import BUILTIN_TASKS
    from lopt.training import rl

    # Checks in the order a user fixes them: model path (the parser), data, then method and trainer flags.
    recorded = recorded_task(model_args.model_name_or_path)
    task = common.check_data("grpo", model_args, data_args, (*BUILTIN_TASKS, *TASK_DATASETS), recorded)
    data_args.check()
    rows = load_task_rows(data_args, task, training_args.trust_remote_code)
    for i, row in enumerate(rows):
        to_prompt_answer(row, i)
    lopt_args.check(set_fields)
    common.check_model_flags(model_args, lopt_args)
    common.check_training_args(training_args, lopt_args, "grpo")
    check_grpo_args(task_args, training_args)
    if lopt_args.block_parallel:
        raise UserError("--block_parallel is an sft option: lopt grpo trains data-parallel under torchrun.")
    reward = reward_function(task_args.reward, task)
    builtin = task in BUILTIN_TASKS
    values = common.run_arguments(
        lopt_args, model_args, data_args, task_args, training_args, set_fields=set_fields
    )
    chosen, _ = common.command_recipe("grpo", values, set_fields, recorded)
    early_lr = common.early_learning_rate(lopt_args, training_args.learning_rate, chosen.early_lr_ratio)
    resume = common.resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    progress = not training_args.disable_tqdm
    start = sft.starting_model("grpo", model_args, task, progress)

    from transformers import set_seed

    from lopt.integrations import LoPTGRPOTrainer

    set_seed(training_args.seed)
    model, tokenizer, model_path = common.load_model(model_args, training_args, start, progress=progress)
    train_dataset = build_dataset(rows, tokenizer, task_args.max_prompt_length, TASK_INSTRUCTIONS.get(task))
    leaves_it = "max_completion_length" not in {
        *set_fields,
        *chosen.values,
    }  # to the answers: a real base's tasks
    if builtin and leaves_it:
        training_args.max_completion_length = rl.completion_budget(train_dataset["answer"], tokenizer)
        if effective is not None:
            effective = {**effective, "max_completion_length": training_args.max_completion_length}
    prepared = common.prepare_model(model, lopt_args, model_args)
    trainer = LoPTGRPOTrainer(
        model=prepared.model,
        reward_funcs=reward,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **common.lopt_trainer_kwargs(prepared, early_lr, training_args.output_dir, lopt_args),
    )
    a = training_args
    print(f"lopt grpo: {common.describe_recipe(chosen, values, set_fields)}", file=sys.stderr)
    print(
        f"lopt grpo: {common.describe_method(prepared, a.learning_rate, early_lr)}, model={model_path}, "
        f"task={task or 'custom'}, reward={reward.__name__}, rows={len(train_dataset)}, lr={a.learning_rate}, "
        f"batch={a.per_device_train_batch_size}x{a.gradient_accumulation_steps} completions ({a.num_generations} "
        f"per prompt, up to {a.max_completion_length} tokens), max_steps={a.max_steps}, output_dir={a.output_dir}",
        file=sys.stderr,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    run_args = common.run_arguments(
        lopt_args, model_args, data_args, task_args, training_args, set_fields=set_fields
    )
    config = common.run_config("grpo", effective, chosen.name) if effective is not None else None
    common.save_final_model(trainer, prepared, tokenizer, training_args.output_dir, run_args, config)

    summary = {
        "method": prepared.method,
        "task": task or "custom",
        "start_model": model_path,
        "reward_function": reward.__name__,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        **reward_summary(os.path.join(training_args.output_dir, "metrics.jsonl")),
    }
    if builtin and data_args.eval_samples > 0:
        from lopt.evaluation.evaluate import builtin_task_score

        summary["heldout_exact_match"] = builtin_task_score(
            trainer.model, tokenizer, data_args.eval_samples, task, progress=not training_args.disable_tqdm
        )
        base = rl.knowledge_base(model_args.model_name_or_path, model_path)
        summary.update(sft.knowledge_kept(trainer.model, tokenizer, base))
    if task_args.plot:
        summary["reward_curve"] = plot_reward_curve(training_args.output_dir)
    return common.finish("grpo", training_args.output_dir, summary)


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def reward_summary(metrics_path: str) -> dict:
    """Mean reward of the first and of the last logged step (each a mean over that logging window)."""
    rewards = [m["reward"] for m in read_metrics(metrics_path) if isinstance(m.get("reward"), (int, float))]
    if not rewards:
        return {}
    return {"reward_first_log": rewards[0], "reward_last_log": rewards[-1]}


def plot_reward_curve(output_dir: str, filename: str = "reward_curve.png", window: int = 5) -> str:
    """Plot the mean reward per logged step (each a mean over its logging window) from metrics.jsonl, with a
    running mean over `window` logs, into output_dir/filename. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if "reward" in m]
    path = os.path.join(output_dir, filename)
    steps = [m["step"] for m in metrics]
    rewards = [m["reward"] for m in metrics]
    smooth = [
        sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
        for i in range(len(rewards))
    ]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(steps, rewards, marker="o", markersize=3, linewidth=0.8, alpha=0.6, label="mean reward per log")
    if len(rewards) >= window:
        ax.plot(steps, smooth, linewidth=2.2, label=f"running mean ({window} logs)")
    if rewards and 0.0 <= min(rewards) and max(rewards) <= 1.0:
        ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    title = f"lopt grpo: {os.path.basename(os.path.abspath(output_dir))}"
    args_path = os.path.join(output_dir, "lopt_args.json")
    if os.path.isfile(args_path):
        with open(args_path) as f:
            run_args = json.load(f)
        lopt = (
            f", k={run_args.get('num_blocks')}"
            if run_args.get("method") in ("lopt", "ll", "lopt_joint")
            else ""
        )
        title += f" (--method {run_args.get('method')}{lopt})"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
