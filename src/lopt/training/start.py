"""What a training command runs around the trainer, from the parsed flags: the model it starts from (the user's, or
the built-in SFT checkpoint of a task), that model loaded and prepared for the method, the checkpoint it resumes, the
trainer's LoPT arguments, and the line that describes the method."""

from __future__ import annotations

import os
import sys

from lopt.errors import UserError
from lopt.io import is_complete_checkpoint
from lopt.training.arguments import LoPTArguments


def load_model(model_args, training_args, model_name_or_path: str | None = None, progress: bool = True):
    """The model and tokenizer ModelConfig names (or `model_name_or_path`), with its revision, dtype and attention."""
    from lopt.data.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(
        model_name_or_path or model_args.model_name_or_path,
        trust_remote_code=training_args.trust_remote_code,
        progress=progress,
        revision=model_args.model_revision if model_args.model_revision != "main" else None,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    )


def prepare_model(model, lopt_args: LoPTArguments, model_args):
    """`lopt.training.methods.prepare_model` with the method flags (LoRA from TRL's ModelConfig lora_* flags)."""
    from lopt.training.methods import prepare_model as prepare

    lora = lora_config(model_args) if lopt_args.method == "lora" else None
    return prepare(
        model,
        lopt_args.method,
        boundaries=lopt_args.boundary_list(),
        lopt_config=lopt_args.lopt_config(),
        lora_config=lora,
    )


def lora_config(model_args):
    """PEFT's LoraConfig from TRL's lora_* flags (default targets: every linear layer)."""
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        target_parameters=model_args.lora_target_parameters,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        task_type="CAUSAL_LM",
    )


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


def take_fsdp(training_args) -> bool:
    """`--fsdp` (TrainingArguments' own flag): lopt shards the model itself with FSDP2 (lopt.engine.distributed), which
    handles LoPT's backward inside the forward, so transformers' accelerate FSDP plugin is turned off."""
    if not training_args.fsdp:
        return False
    training_args.fsdp, training_args.fsdp_plugin_args = False, None
    return True


def lopt_trainer_kwargs(
    prepared, early_lr: float | None, output_dir: str, lopt_args, fsdp: bool = False
) -> dict:
    """The LoPT mixin's arguments and the callbacks (the metrics log; --round_to_bfloat16), identical for every
    training command."""
    from lopt.integrations import MetricsLogCallback, RoundToBfloat16Callback

    callbacks = [MetricsLogCallback(os.path.join(output_dir, "metrics.jsonl"))]
    if lopt_args.round_to_bfloat16:
        callbacks.append(RoundToBfloat16Callback())
    return dict(
        lopt_config=prepared.lopt_config,
        early_learning_rate=early_lr,
        fsdp=fsdp,
        optimizer_in_backward=lopt_args.optimizer_in_backward,
        clip_per_block=lopt_args.clip_per_block,
        checkpoint_layers=lopt_args.checkpoint_layers,
        callbacks=callbacks,
    )


def describe_method(prepared, learning_rate: float, early_lr: float | None) -> str:
    """ "method=lopt, k=2, lambda=10.0, ..." for the start-of-run line."""
    text = f"method={prepared.method}"
    if prepared.lopt_config is not None:
        c = prepared.lopt_config
        text += (
            f", k={c.num_blocks}, lambda={c.aux_weight}, backward={c.backward}, aux_objective={c.aux_objective}"
            f"{f' (anchor_weight={c.anchor_weight})' if 'anchor' in c.aux_objective else ''}"
            f", lr_k1={early_lr or learning_rate}"
        )
    return text


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
