"""`lopt grpo`: on-policy GRPO with LoPT (or a baseline) through TRL's GRPOTrainer, with verifiable rewards.

Without --model_name_or_path it uses the built-in pretrained model; without data flags, the built-in task (the
reward is exact match with the task's answer). `--task gsm8k` / `--task numinamath` load those datasets from the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from lopt.cli import common
from lopt.errors import DataError, UserError

TASKS = ("builtin", "gsm8k", "numinamath")
# --task -> (hub dataset, config): the datasets of the authors' train_grpo.py.
TASK_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "numinamath": ("AI-MO/NuminaMath-CoT", None)}
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
REWARDS = ("auto", "math", "exact_match")
# Prepended to plain-text prompts of the hub tasks, so the model states its answer where the reward looks for it.
TASK_INSTRUCTIONS = {
    "gsm8k": "Solve the problem step by step, then give the final answer on its own line as '#### <number>'.",
    "numinamath": "Solve the problem step by step, then give the final answer as \\boxed{<answer>}.",
}

# Recipes for flags left unset. The built-in task's recipe is sized for 2 CPU cores (short answers, small batches);
# the other follows the authors' train_grpo.py. Flags and YAML values always win.
BUILTIN_TASK_DEFAULTS = {
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "max_prompt_length": 128,
    "max_completion_length": 8,
    "max_steps": 150,
    "logging_steps": 10,
}
# Built-in task, LoPT methods, --lr_k1 unset: the early group learns at learning_rate / 20 (also used by `lopt dpo`).
# Measured on the built-in task from E2E-SFT'd checkpoints: with the early group at the full rate, the reconstruction
# objective moves the early blocks faster than the late block can follow. GRPO at lr 2e-4 from a 0.83 checkpoint:
# reward 0.34 -> 0.00, held-out 0.00 (lr/20: reward 0.62 -> 0.80, held-out 0.84). DPO at lr 1e-4 from a 0.34
# checkpoint: held-out 0.04 (lr/20: 0.36, preference accuracy 0.4 -> 0.65).
BUILTIN_TASK_EARLY_LR_FACTOR = 1 / 20
USER_TASK_DEFAULTS = {
    "learning_rate": 1e-6,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_prompt_length": 1024,
    "max_completion_length": 512,
    "max_steps": -1,
    "logging_steps": 10,
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


def add_parser(parser: argparse.ArgumentParser) -> None:
    common.add_model_args(parser)
    common.add_method_args(parser)
    g = parser.add_argument_group("task and data (default: the built-in task)")
    g.add_argument(
        "--task",
        default=None,
        choices=TASKS,
        help="builtin (default without data flags), gsm8k (openai/gsm8k main) or numinamath "
        "(AI-MO/NuminaMath-CoT). Sets the dataset unless --train_file/--dataset_name is given.",
    )
    g.add_argument("--train_file", default=None, help=f"JSONL, JSON or Parquet rows with {ROW_FORMATS_HELP}.")
    g.add_argument("--dataset_name", default=None, help="A datasets hub id or local dataset folder.")
    g.add_argument("--dataset_config", default=None)
    g.add_argument("--split", default="train")
    g.add_argument("--max_samples", type=int, default=None)
    g.add_argument(
        "--reward",
        default="auto",
        choices=REWARDS,
        help="math: final answer (\\boxed{} > '####' > last number) compared by value; exact_match: the whole "
        "completion equals the answer after normalisation. auto: exact_match for the built-in task, else math.",
    )
    g.add_argument(
        "--eval_samples",
        type=int,
        default=200,
        help="Built-in task only: held-out rows scored (greedy, exact match) after training.",
    )
    g = parser.add_argument_group("GRPO (flag names follow the LoPT authors' train_grpo.py)")
    g.add_argument(
        "--num_generations", type=int, default=None, help="Completions per prompt. Default 8 built-in / 4."
    )
    g.add_argument(
        "--max_prompt_length",
        type=int,
        default=None,
        help="Rows whose prompt is longer (in tokens) are skipped. Default 128 built-in / 1024.",
    )
    g.add_argument("--max_completion_length", type=int, default=None, help="Default 8 built-in / 512.")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top_p", type=float, default=0.95)
    g.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model).")
    g.add_argument("--loss_type", default="grpo", choices=LOSS_TYPES)
    g.add_argument("--num_iterations", type=int, default=1, help="Optimisation passes per generation batch.")
    g.add_argument(
        "--steps_per_generation",
        type=int,
        default=None,
        help="Micro-steps that share one generation batch. Default: --gradient_accumulation_steps.",
    )
    g.add_argument(
        "--plot",
        action="store_true",
        help="Write reward_curve.png (mean reward per logged step) to output_dir.",
    )
    common.add_training_args(parser)
    set_help(
        parser,
        learning_rate="Default 2e-4 built-in task (early group: --lr_k1 = learning_rate/20) / 1e-6.",
        per_device_train_batch_size="Completions (not prompts) per device and step. Default 32 built-in task / 8.",
        max_steps="Default 150 built-in task / -1 (use epochs).",
        logging_steps="Default 10.",
    )
    parser.epilog = (
        "Batches count completions: one generation batch (--per_device_train_batch_size x --steps_per_generation) "
        "holds prompts x --num_generations completions, so it must be a multiple of --num_generations."
    )


def set_help(parser: argparse.ArgumentParser, **helps: str) -> None:
    """Replace the help text of shared flags whose defaults differ for this command."""
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]


def resolve_task(args: argparse.Namespace) -> str | None:
    """The task whose data and recipe are used: 'builtin', 'gsm8k', 'numinamath', or None for the user's data."""
    user_data = args.train_file is not None or args.dataset_name is not None
    if args.task == "builtin" and user_data:
        raise UserError("--task builtin uses the built-in data: drop --train_file/--dataset_name.")
    if args.task is not None:
        return args.task
    if user_data:
        return None
    if args.model_name_or_path is not None:
        raise UserError(
            "the built-in task is made for the built-in model: give --train_file, --dataset_name or --task "
            "(--task builtin to use it anyway, e.g. with a checkpoint of the built-in model)."
        )
    return "builtin"


def fill_defaults(args: argparse.Namespace, recipe: dict) -> None:
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    common.fill_defaults(args, "grpo")
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max_samples {args.max_samples} must be a positive integer.")
    if recipe is BUILTIN_TASK_DEFAULTS and args.lr_k1 is None and args.method in ("lopt", "ll", "lopt_joint"):
        args.lr_k1 = args.learning_rate * BUILTIN_TASK_EARLY_LR_FACTOR
    vars(args).pop("max_seq_length", None)  # an SFT/DPO setting common.fill_defaults fills in; GRPO has none
    for name in ("num_generations", "max_prompt_length", "max_completion_length", "num_iterations"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} {getattr(args, name)} must be positive.")
    if args.steps_per_generation is not None and args.steps_per_generation <= 0:
        raise UserError(f"--steps_per_generation {args.steps_per_generation} must be positive.")
    if args.num_generations < 2:
        raise UserError("--num_generations must be at least 2: GRPO compares completions of the same prompt.")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature} must be positive (GRPO samples completions).")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p} must be in (0, 1].")


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
    from lopt.data import format_prompt, has_chat_template

    return messages if has_chat_template(tokenizer) else format_prompt(messages, tokenizer)


def build_dataset(rows: list, tokenizer, max_prompt_length: int, instruction: str | None = None):
    """Rows -> a datasets.Dataset with `prompt` and `answer`; prompts over max_prompt_length tokens are skipped."""
    import datasets

    from lopt.data import encode_prompt

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


def load_task_rows(args: argparse.Namespace, task: str | None) -> list:

    if task == "builtin":
        from lopt.builtin import builtin_grpo_rows

        return builtin_grpo_rows("train", n=args.max_samples)
    dataset_name, dataset_config = args.dataset_name, args.dataset_config
    if args.train_file is None and dataset_name is None:
        dataset_name, default_config = TASK_DATASETS[task]
        dataset_config = dataset_config or default_config
    return common.load_user_rows(args, dataset_name, dataset_config)


def reward_function(args: argparse.Namespace, task: str | None):
    from lopt.rewards import REWARD_FUNCTIONS

    name = args.reward
    if name == "auto":
        name = "exact_match" if task == "builtin" else "math"
    return REWARD_FUNCTIONS[name]


# --- the command ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    task = resolve_task(args)
    fill_defaults(args, BUILTIN_TASK_DEFAULTS if task == "builtin" else USER_TASK_DEFAULTS)
    resume = common.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    progress = not args.no_progress

    # Data rows first: a bad file fails fast, before torch/TRL are imported or a model is loaded.
    rows = load_task_rows(args, task)
    for i, row in enumerate(rows):
        to_prompt_answer(row, i)
    reward = reward_function(args, task)

    from transformers import set_seed
    from trl import GRPOConfig

    from lopt.integrations import LoPTGRPOTrainer

    set_seed(args.seed)
    model, tokenizer, model_path = common.load_model_and_tokenizer(
        args.model_name_or_path, args.trust_remote_code, progress=progress
    )
    train_dataset = build_dataset(rows, tokenizer, args.max_prompt_length, TASK_INSTRUCTIONS.get(task))
    prepared = common.prepare_from_args(model, args)
    training_args = GRPOConfig(
        **common.training_kwargs(args),
        remove_unused_columns=False,  # the reward reads the `answer` column
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_p=args.top_p,
        beta=args.beta,
        loss_type=args.loss_type,
        num_iterations=args.num_iterations,
        steps_per_generation=args.steps_per_generation,
    )
    trainer = LoPTGRPOTrainer(
        model=prepared.model,
        reward_funcs=reward,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **common.lopt_trainer_kwargs(prepared, args),
    )
    print(_describe(args, prepared, model_path, task, reward.__name__, len(train_dataset)), file=sys.stderr)
    result = trainer.train(resume_from_checkpoint=resume)
    common.save_final_model(trainer, prepared, tokenizer, args.output_dir, args)

    summary = {
        "method": prepared.method,
        "task": task or "custom",
        "reward_function": reward.__name__,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        **reward_summary(os.path.join(args.output_dir, "metrics.jsonl")),
    }
    if task == "builtin" and args.eval_samples > 0:
        summary["heldout_exact_match"] = common.builtin_task_accuracy(
            trainer.model, tokenizer, args.eval_samples
        )
    if args.plot:
        summary["reward_curve"] = plot_reward_curve(args.output_dir)
    return common.finish("grpo", args.output_dir, summary)


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


def _describe(args, prepared, model_path: str, task: str | None, reward: str, num_rows: int) -> str:
    return (
        f"lopt grpo: {common.describe_method(args, prepared)}, model={model_path}, task={task or 'custom'}, reward={reward}, "
        f"rows={num_rows}, lr={args.learning_rate}, batch={args.per_device_train_batch_size}x"
        f"{args.gradient_accumulation_steps} completions ({args.num_generations} per prompt), "
        f"max_steps={args.max_steps}, output_dir={args.output_dir}"
    )
