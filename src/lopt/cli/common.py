"""Pieces shared by the training commands (sft, and later grpo/dpo): flags, model loading, final outputs."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lopt.config import ANCHOR_DTYPES, AUX_OBJECTIVES
from lopt.data import ensure_pad_token
from lopt.errors import UserError
from lopt.io import atomic_directory_write, atomic_write_json
from lopt.methods import METHODS

# Defaults that depend on whether the built-in model is used: the built-in recipe is sized for 2 CPU cores.
# Flags left unset (None) are filled from here; flags and YAML values always win.
USER_MODEL_DEFAULTS = {
    "learning_rate": 2e-5,
    "per_device_train_batch_size": 8,
    "max_seq_length": 1024,
    "max_steps": -1,
    "logging_steps": 10,
}
# `lopt sft` with a LoPT method and no --lr_k1: the early group learns at this fraction of --learning_rate.
# Chosen from the 3-seed `lopt compare` study in the README (built-in model and task, 300 steps): 0.3 gave the
# best held-out accuracy of the ratios 1 (the paper's), 0.3 and 0.1, and a smaller retention loss than 1.
SFT_LR_K1_RATIO = 0.3

BUILTIN_DEFAULTS = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 16,
    "max_seq_length": 128,
    "max_steps": 300,
    "logging_steps": 25,
}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model_name_or_path",
        default=None,
        help="HF hub id or local path of a causal LM. Default: the built-in pretrained model (no download).",
    )
    g.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Allow custom model code from the hub (off by default).",
    )
    g.add_argument("--config", default=None, help="YAML file with defaults for any flag; flags override it.")


def add_method_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("method (flag names follow the LoPT authors' scripts)")
    g.add_argument("--method", default="lopt", choices=METHODS, help="ll is an alias of lopt. Default: lopt.")
    g.add_argument("--num_blocks", type=int, default=2, help="LoPT blocks k (2 = cut at the midpoint).")
    g.add_argument("--lambda_aux", type=float, default=10.0, help="Weight of the local aux loss (lambda).")
    g.add_argument(
        "--lr_k1",
        type=float,
        default=None,
        help="LR of the early group (embedding, early blocks, aux heads). Default for sft: 0.3 x --learning_rate "
        "(see README, 'Choosing the defaults'); pass --lr_k1 equal to --learning_rate for the paper's setting.",
    )
    g.add_argument(
        "--aux_objective",
        default="recon",
        choices=AUX_OBJECTIVES,
        help="Local objective of the early blocks: recon (the paper's), anchor (stay near the pretrained model's "
        "hidden state at the boundary), task (the batch's next-token loss read through the model's own final norm "
        "and LM head; SFT only), or a sum such as recon+task.",
    )
    g.add_argument(
        "--task_weight", type=float, default=1.0, help="Weight of the task term in recon+task etc."
    )
    g.add_argument(
        "--aux_warmup_steps", type=int, default=0, help="First N steps: only the aux heads learn locally."
    )
    g.add_argument(
        "--anchor_weight", type=float, default=1.0, help="Weight of the anchor term in recon+anchor."
    )
    g.add_argument(
        "--anchor_dtype",
        default=None,
        choices=ANCHOR_DTYPES,
        help="dtype of the frozen pretrained copy the anchor needs (default: the model's; bfloat16 halves it).",
    )
    g.add_argument("--lora_r", type=int, default=16)
    g.add_argument("--lora_alpha", type=int, default=32)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument(
        "--lora_target_modules", default="all-linear", help="Comma-separated module names, or all-linear."
    )


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument(
        "--learning_rate", type=float, default=None, help="Default 1e-3 built-in / 2e-5 user model."
    )
    g.add_argument("--per_device_train_batch_size", type=int, default=None, help="Default 16 built-in / 8.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--num_train_epochs", type=float, default=1.0)
    g.add_argument("--max_steps", type=int, default=None, help="Default 300 built-in / -1 (use epochs).")
    g.add_argument("--warmup_ratio", type=float, default=0.0)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=42)
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", default=None, help="Default: runs/<command>-<method>.")
    g.add_argument("--logging_steps", type=int, default=None)
    g.add_argument(
        "--save_steps", type=int, default=None, help="Checkpoint every N steps (default: no checkpoints)."
    )
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint-N folder, or 'last' for the newest in output_dir.",
    )
    g.add_argument("--no_progress", action="store_true", help="Disable progress bars.")


def fill_defaults(args: argparse.Namespace, command: str) -> argparse.Namespace:
    """Fill the flags left unset with the built-in or user-model recipe, and check flag combinations."""
    builtin = args.model_name_or_path is None
    for key, value in (BUILTIN_DEFAULTS if builtin else USER_MODEL_DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{command}-{args.method}")
    if args.bf16 and args.fp16:
        raise UserError("--bf16 and --fp16 are exclusive: choose one.")
    if args.num_blocks < 2:
        raise UserError(f"--num_blocks {args.num_blocks} is invalid: LoPT needs at least 2 blocks.")
    for name in (
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_seq_length",
    ):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) <= 0:
            raise UserError(f"--{name} {getattr(args, name)} must be positive.")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise UserError(f"--warmup_ratio {args.warmup_ratio} must be in [0, 1).")
    lopt_method = args.method in ("lopt", "ll", "lopt_joint")
    if args.lr_k1 is not None and not lopt_method:
        raise UserError(f"--lr_k1 only applies to LoPT methods, not --method {args.method}.")
    if command == "sft" and lopt_method and args.lr_k1 is None:
        args.lr_k1 = SFT_LR_K1_RATIO * args.learning_rate
    if args.aux_objective != "recon" and not lopt_method:
        raise UserError(f"--aux_objective only applies to LoPT methods, not --method {args.method}.")
    if args.aux_warmup_steps and not lopt_method:
        raise UserError(f"--aux_warmup_steps only applies to LoPT methods, not --method {args.method}.")
    return args


def load_model_and_tokenizer(model_name_or_path: str | None, trust_remote_code: bool = False, progress=True):
    """The user's model (safetensors only, no remote code unless asked) or the built-in one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_name_or_path is None:
        from lopt.builtin import builtin_model_path

        model_name_or_path = str(builtin_model_path(progress=progress))
    elif _looks_like_path(model_name_or_path) and not os.path.exists(model_name_or_path):
        raise UserError(
            f"--model_name_or_path {model_name_or_path!r} does not exist: give a local model folder or a hub id."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {model_name_or_path!r}: {first_line}") from err
    ensure_pad_token(tokenizer)
    return model, tokenizer, model_name_or_path


def _looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else with a slash, or starting like a path, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    if resume is None:
        return None
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint last: no checkpoint-N folder in {output_dir!r}.")
        return last
    if not os.path.isdir(resume):
        raise UserError(
            f"--resume_from_checkpoint {resume!r} is not a folder: give a checkpoint-N folder or 'last'."
        )
    return resume


def save_final_model(trainer, prepared, tokenizer, output_dir: str, args: argparse.Namespace) -> None:
    """Write a standard HF checkpoint (LoRA merged, adapter in adapter/), tokenizer, and the run's arguments."""
    model = trainer.model
    lopt_config = prepared.lopt_config

    def write(tmp: str) -> None:
        if prepared.method == "lora":
            model.save_pretrained(os.path.join(tmp, "adapter"))
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if lopt_config is not None:
            lopt_config.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_args.json"), "w") as f:
            f.write(trainer.args.to_json_string())
        with open(os.path.join(tmp, "lopt_args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True, default=str)

    atomic_directory_write(output_dir, write)


def finish(command: str, output_dir: str, summary: dict) -> int:
    """Write summary.json and print it: the last thing every training command does."""
    atomic_write_json(os.path.join(output_dir, "summary.json"), summary)
    print(f"lopt {command}: saved a Hugging Face checkpoint to {output_dir}", file=sys.stderr)
    for key, value in summary.items():
        print(f"  {key}: {value}", file=sys.stderr)
    return 0


def builtin_task_accuracy(model, tokenizer, n: int) -> float:
    """Held-out exact match of the built-in task on its first n test rows."""
    from lopt.evaluate import evaluate_checkpoint, load_task_rows

    rows, match = load_task_rows(None, None, None, "test", n)
    return evaluate_checkpoint(model, tokenizer, rows, None, match=match)["task_accuracy"]


def describe_method(args: argparse.Namespace, prepared) -> str:
    """ "method=lopt, k=2, lambda=10.0, ..." for the start-of-run line."""
    text = f"method={prepared.method}"
    if prepared.lopt_config is not None:
        c = prepared.lopt_config
        text += (
            f", k={c.num_blocks}, lambda={c.aux_weight}, backward={c.backward}, aux_objective={c.aux_objective}"
            f"{f' (anchor_weight={c.anchor_weight})' if c.aux_objective == 'recon+anchor' else ''}"
            f", lr_k1={args.lr_k1 or args.learning_rate}"
        )
    return text


def prepare_from_args(model, args: argparse.Namespace):
    """`lopt.methods.prepare_model` with the shared method flags."""
    from lopt.methods import prepare_model

    return prepare_model(
        model,
        args.method,
        num_blocks=args.num_blocks,
        aux_weight=args.lambda_aux,
        aux_objective=args.aux_objective,
        anchor_weight=args.anchor_weight,
        anchor_dtype=args.anchor_dtype,
        task_weight=args.task_weight,
        aux_warmup_steps=args.aux_warmup_steps,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_target_modules=args.lora_target_modules,
    )


def training_kwargs(args: argparse.Namespace) -> dict:
    """TrainingArguments fields shared by every training command (each adds its trainer's own fields)."""
    import torch

    return dict(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # LoPT's boundary needs non-reentrant
        bf16=args.bf16,
        fp16=args.fp16,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        report_to=[],
        disable_tqdm=args.no_progress,
        use_cpu=not torch.cuda.is_available(),
        save_only_model=False,
        include_num_input_tokens_seen=True,  # MetricsLogCallback's tokens/s
    )


def lopt_trainer_kwargs(prepared, args: argparse.Namespace) -> dict:
    """The LoPT mixin's arguments and the metrics log, identical for every training command."""
    from lopt.integrations import MetricsLogCallback

    return dict(
        lopt_config=prepared.lopt_config,
        early_learning_rate=args.lr_k1,
        callbacks=[MetricsLogCallback(os.path.join(args.output_dir, "metrics.jsonl"))],
    )


def load_sft_rows(args: argparse.Namespace, builtin_data: bool) -> list[dict]:
    """The training rows of `lopt sft`: the built-in task's train split, or the user's data flags."""
    if builtin_data:
        from lopt.builtin import builtin_task_rows

        return builtin_task_rows("train", n=args.max_samples)
    return load_user_rows(args)


def load_user_rows(args: argparse.Namespace, dataset_name=None, dataset_config=None) -> list[dict]:
    """Rows from --train_file or a dataset (the shared data flags)."""
    from lopt.data import load_rows

    return load_rows(
        train_file=args.train_file,
        dataset_name=dataset_name if dataset_name is not None else args.dataset_name,
        dataset_config=dataset_config if dataset_config is not None else args.dataset_config,
        split=args.split,
        max_samples=args.max_samples,
        trust_remote_code=args.trust_remote_code,
    )
