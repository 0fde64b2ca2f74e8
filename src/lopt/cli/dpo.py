"""`lopt dpo`: Direct Preference Optimization with LoPT (or a baseline) through TRL's DPOTrainer.

Rows hold `prompt`, `chosen` and `rejected`, each a string or a list of chat messages. Without --model_name_or_path
it uses the built-in pretrained model; without data flags, the built-in preference pairs (chosen = the task's correct
answer, rejected = a plausible wrong one).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from lopt.cli import common
from lopt.cli.grpo import BUILTIN_TASK_EARLY_LR_FACTOR, message_list, prompt_messages, set_help
from lopt.errors import DataError, UserError

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

BUILTIN_DEFAULTS = {
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 8,
    "max_seq_length": 128,
    "max_steps": 60,
    "logging_steps": 5,
}
USER_DEFAULTS = {
    "learning_rate": 1e-6,
    "per_device_train_batch_size": 4,
    "max_seq_length": 1024,
    "max_steps": -1,
    "logging_steps": 10,
}


def add_parser(parser: argparse.ArgumentParser) -> None:
    common.add_model_args(parser)
    common.add_method_args(parser)
    g = parser.add_argument_group("data (default: the built-in preference pairs)")
    g.add_argument(
        "--task",
        default=None,
        choices=("builtin",),
        help="builtin: the built-in preference pairs (the default without data flags); give it explicitly to use "
        "them with --model_name_or_path, e.g. a checkpoint of the built-in model after `lopt sft`.",
    )
    g.add_argument(
        "--train_file",
        default=None,
        help="JSONL, JSON or Parquet rows with prompt/chosen/rejected (strings or chat message lists).",
    )
    g.add_argument("--dataset_name", default=None, help="A datasets hub id or local dataset folder.")
    g.add_argument("--dataset_config", default=None)
    g.add_argument("--split", default="train")
    g.add_argument("--max_samples", type=int, default=None)
    g.add_argument(
        "--max_seq_length",
        type=int,
        default=None,
        help="Prompt + completion tokens (longer pairs are truncated). Default 128 built-in / 1024.",
    )
    g.add_argument(
        "--eval_samples",
        type=int,
        default=200,
        help="Built-in data only: held-out rows scored (greedy, exact match) after training.",
    )
    g = parser.add_argument_group("DPO")
    g.add_argument(
        "--beta", type=float, default=0.1, help="DPO temperature: strength of the tie to the reference."
    )
    g.add_argument(
        "--loss_type",
        default="sigmoid",
        help=f"One of {', '.join(LOSS_TYPES)}; several comma-separated are summed (TRL's loss_type list).",
    )
    common.add_training_args(parser)
    set_help(
        parser,
        learning_rate="Default 1e-4 built-in data (early group: --lr_k1 = learning_rate/20) / 1e-6.",
        per_device_train_batch_size="Preference pairs per device and step. Default 8 built-in / 4.",
        max_steps="Default 60 built-in / -1 (use epochs).",
        logging_steps="Default 5 built-in / 10.",
    )


def fill_defaults(args: argparse.Namespace, builtin_data: bool) -> None:
    for key, value in (BUILTIN_DEFAULTS if builtin_data else USER_DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    common.fill_defaults(args, "dpo")
    if builtin_data and args.lr_k1 is None and args.method in ("lopt", "ll", "lopt_joint"):
        args.lr_k1 = args.learning_rate * BUILTIN_TASK_EARLY_LR_FACTOR  # see lopt.cli.grpo
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max_samples {args.max_samples} must be a positive integer.")
    if args.beta <= 0:
        raise UserError(f"--beta {args.beta} must be positive.")
    loss_types = [t.strip() for t in str(args.loss_type).split(",") if t.strip()]
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if not loss_types or unknown:
        raise UserError(f"--loss_type {args.loss_type!r}: use one or more of {', '.join(LOSS_TYPES)}.")
    args.loss_type = loss_types


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

    from lopt.data import format_prompt, has_chat_template

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


def run(args: argparse.Namespace) -> int:
    user_data = args.train_file is not None or args.dataset_name is not None
    if args.task == "builtin" and user_data:
        raise UserError(
            "--task builtin uses the built-in preference pairs: drop --train_file/--dataset_name."
        )
    builtin_data = not user_data
    if builtin_data and args.task is None and args.model_name_or_path is not None:
        raise UserError(
            "the built-in preference pairs are made for the built-in model: give --train_file or --dataset_name "
            "(or --task builtin to use them anyway, e.g. with a checkpoint of the built-in model)."
        )
    fill_defaults(args, builtin_data)
    resume = common.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    progress = not args.no_progress

    # Data rows first: a bad file fails fast, before torch/TRL are imported or a model is loaded.
    if builtin_data:
        from lopt.builtin import builtin_preference_rows

        rows = builtin_preference_rows("train", n=args.max_samples)
    else:
        rows = common.load_user_rows(args)
    for i, row in enumerate(rows):
        to_preference(row, i)

    from transformers import set_seed
    from trl import DPOConfig

    from lopt.integrations import LoPTDPOTrainer

    set_seed(args.seed)
    model, tokenizer, model_path = common.load_model_and_tokenizer(
        args.model_name_or_path, args.trust_remote_code, progress=progress
    )
    train_dataset = build_dataset(rows, tokenizer)
    prepared = common.prepare_from_args(model, args)
    training_args = DPOConfig(
        **common.training_kwargs(args),
        max_length=args.max_seq_length,
        beta=args.beta,
        loss_type=args.loss_type,
    )
    trainer = LoPTDPOTrainer(
        model=prepared.model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **common.lopt_trainer_kwargs(prepared, args),
    )
    if len(trainer.train_dataset) == 0:
        raise DataError(
            f"every pair's prompt fills --max_seq_length {args.max_seq_length}: no completion token is left to "
            "compare; raise --max_seq_length or shorten the prompts"
        )
    print(_describe(args, prepared, model_path, len(trainer.train_dataset)), file=sys.stderr)
    result = trainer.train(resume_from_checkpoint=resume)
    common.save_final_model(trainer, prepared, tokenizer, args.output_dir, args)

    summary = {
        "method": prepared.method,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
    }
    logged = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    if logged:
        summary["reward_accuracy_last_log"] = logged[-1]["rewards/accuracies"]
        summary["reward_margin_last_log"] = logged[-1].get("rewards/margins")
    if builtin_data and args.eval_samples > 0:
        summary["heldout_exact_match"] = common.builtin_task_accuracy(
            trainer.model, tokenizer, args.eval_samples
        )
    return common.finish("dpo", args.output_dir, summary)


def _describe(args, prepared, model_path: str, num_rows: int) -> str:
    return (
        f"lopt dpo: {common.describe_method(args, prepared)}, model={model_path}, pairs={num_rows}, beta={args.beta}, "
        f"loss_type={','.join(args.loss_type)}, lr={args.learning_rate}, "
        f"batch={args.per_device_train_batch_size}x{args.gradient_accumulation_steps}, "
        f"max_steps={args.max_steps}, output_dir={args.output_dir}"
    )
