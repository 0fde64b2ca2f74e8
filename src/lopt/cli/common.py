"""Pieces shared by the training commands (sft, grpo, dpo): the recipe every command starts from, data and model
checks, the method, the trainer's LoPT arguments and the final outputs. Flags come from `lopt.cli.parser`."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from lopt.errors import UserError
from lopt.io import atomic_directory_write, atomic_write_json, save_checkpoint_files
from lopt.training.arguments import LOPT_METHODS, DataArguments, LoPTArguments, bf16_by_default


def base_recipe(command: str, values: dict[str, Any], set_fields: frozenset[str]) -> dict[str, Any]:
    """lopt's defaults for every training command, applied to the fields the user did not set."""
    import torch

    recipe: dict[str, Any] = {
        "output_dir": os.path.join("runs", f"{command}-{values['method']}"),
        # no checkpoints unless asked for (--save_steps N alone means every N steps)
        "save_strategy": "steps" if "save_steps" in set_fields else "no",
        "include_num_input_tokens_seen": True,  # MetricsLogCallback's tokens/s
        # LoPT's boundary needs non-reentrant checkpointing.
        "activation_checkpointing_kwargs": values.get("gradient_checkpointing_kwargs")
        or {"use_reentrant": False},
        # TRL defaults gradient_checkpointing (transformers 5's deprecated alias) to True: lopt trains without
        # checkpointing unless asked, and passes the user's --gradient_checkpointing under its new name.
        # --checkpoint_layers turns it on too: the trainer enables every layer, then keeps the chosen ones.
        "activation_checkpointing": values["gradient_checkpointing"]
        if "gradient_checkpointing" in set_fields
        else values.get("checkpoint_layers") is not None,
    }
    if not torch.cuda.is_available():
        recipe["use_cpu"] = True
    if "fp16" not in set_fields:  # the user's --fp16 replaces the default bf16
        recipe["bf16"] = bf16_by_default()
    return recipe


def recipe_task(values: dict[str, Any], recorded=None) -> str | None:
    """The task a run trains on, from the parsed values, for choosing its recipe: --task, None for the user's data,
    else the task a starting checkpoint records (`recorded`, lopt.training.rl.recorded_task; commands that read it),
    else the model's default task (check_data refuses bad combinations afterwards)."""
    from lopt.builtin.bases import base_of

    if values["task"] is not None:
        return values["task"]
    if values["train_file"] is not None or values["dataset_name"] is not None:
        return None
    if recorded is not None:
        return recorded.task
    return base_of(values["model_name_or_path"]).default_task


def command_recipe(command: str, values: dict[str, Any], set_fields: frozenset[str], recorded=None):
    """The recipe file of a run (`lopt.builtin.bases.Recipe`: the base's, for the run's task) and the flags it gives:
    its own, then LoPT's objective beside it (`lopt_objective`)."""
    from lopt.builtin.bases import base_of

    chosen = base_of(values["model_name_or_path"]).recipe(command, recipe_task(values, recorded))
    return chosen, {**chosen.values, **lopt_objective(chosen, values, set_fields)}


def lopt_objective(chosen, values: dict[str, Any], set_fields: frozenset[str]) -> dict[str, Any]:
    """The recipe's LoPT objective (its `<command>-lopt.yaml`) as a whole, for a LoPT method, unless the user chose an
    objective (--aux_objective or --lambda_aux) or --fsdp (no per-block clipping there yet). --optimizer_in_backward
    and --block_parallel clip finer anyway (per parameter, per block's process): no clip_per_block with them."""
    chose = set_fields & {"aux_objective", "lambda_aux"}
    if not chosen.lopt_objective or values["method"] not in LOPT_METHODS or chose or values.get("fsdp"):
        return {}
    objective = dict(chosen.lopt_objective)
    if values["optimizer_in_backward"] or values["block_parallel"]:
        objective.pop("clip_per_block", None)
    return objective


def describe_recipe(chosen, values: dict[str, Any], set_fields: frozenset[str]) -> str:
    """ "recipe: smollm2-135m/sft-extract.yaml + smollm2-135m/sft-lopt.yaml" for the start of a run: the files whose
    flags filled the ones the user left unset."""
    applied = lopt_objective(chosen, values, set_fields)
    return f"recipe: {chosen.name}" + (f" + {chosen.lopt_objective_name}" if applied else "")


def check_data(
    command: str, model_args, data: DataArguments, tasks: tuple[str, ...], recorded=None
) -> str | None:
    """The built-in task to train on (None for the user's data): --task, else the task the starting checkpoint
    records (`recorded`: lopt.training.rl.recorded_task, for the commands that read it), else the model's default
    task (lopt.builtin.bases.Base.default_task). One-line errors for flags that do not combine."""
    from lopt.builtin.bases import base_of
    from lopt.builtin.tasks import REAL_BASE_TASKS

    path = model_args.model_name_or_path
    base = (
        recorded.base if recorded is not None else base_of(path)
    )  # a checkpoint's: the base it was trained from
    if data.task is not None:
        if data.task not in tasks:
            raise UserError(f"--task {data.task!r} is not one of {', '.join(tasks)}.")
        if data.user_data:
            raise UserError(
                f"--task {data.task} is a built-in task: drop --train_file/--dataset_name, or --task."
            )
        if not base.can_train(data.task):
            raise UserError(
                f"--task {data.task} is made for the built-in model: drop --model_name_or_path, or give "
                "--train_file/--dataset_name."
            )
        return data.task
    if data.user_data:
        return None
    if recorded is not None:
        if recorded.task is None:
            choices = ", ".join(t for t in tasks if base.can_train(t))
            raise UserError(
                f"cannot tell the task of --model_name_or_path {path} ({recorded.reason}): give --task "
                f"({choices}) or --train_file/--dataset_name."
            )
        if recorded.task not in tasks:
            raise UserError(
                f"lopt {command} has no built-in task {recorded.task} (recorded by --model_name_or_path {path}): "
                "give --train_file or --dataset_name."
            )
        return recorded.task
    task = base.default_task
    if task is None:
        chat_tasks = " or ".join(t for t in REAL_BASE_TASKS if t in tasks)
        also = (", a hub --task" if command == "grpo" else "") + (
            f", or --task {chat_tasks} (any chat model)" if chat_tasks else ""
        )
        raise UserError(
            f"the built-in task is made for the built-in model: give --train_file or --dataset_name{also}."
        )
    if task not in tasks:
        raise UserError(
            f"lopt {command} has no built-in task for {path} (its task {task} is not one "
            f"of {', '.join(tasks)}): give --train_file or --dataset_name."
        )
    return task


def check_model_flags(model_args, lopt_args: LoPTArguments) -> None:
    """TRL ModelConfig flags that lopt cannot honour, refused in one line."""
    if model_args.use_peft and lopt_args.method != "lora":
        raise UserError(
            f"--use_peft trains LoRA adapters: use --method lora (the lora_* flags apply), not --method "
            f"{lopt_args.method}."
        )
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise UserError("--load_in_4bit/--load_in_8bit are not supported by lopt (train in bf16 or fp32).")


def check_training_args(
    training_args, lopt_args: LoPTArguments, command: str, set_fields: frozenset[str] = frozenset()
) -> None:
    """TRL/TrainingArguments flags that do not combine with lopt's commands, refused in one line each; and values no
    trainer can use."""
    import importlib.util

    if training_args.fsdp:
        if command != "sft":
            raise UserError(
                f"--fsdp is built for lopt sft only: train lopt {command} data-parallel (plain torchrun)."
            )
        if lopt_args.block_parallel:
            raise UserError("--fsdp and --block_parallel are exclusive: choose one way to split the work.")
        if "WORLD_SIZE" not in os.environ:
            raise UserError(
                "--fsdp shards the model over the processes of a torchrun launch: start it with `torchrun "
                f"--nproc_per_node N -m lopt {command} --fsdp ...`."
            )

    if lopt_args.optimizer_in_backward:
        check_optimizer_in_backward(training_args, command)

    if lopt_args.checkpoint_layers is not None and not training_args.activation_checkpointing:
        raise UserError(
            f"--checkpoint_layers {lopt_args.checkpoint_layers} checkpoints some layers but --gradient_checkpointing "
            "is false: drop one of them."
        )

    if training_args.torch_compile and lopt_args.is_lopt:
        raise UserError(
            "--torch_compile is not supported with LoPT methods yet (untested with the local backward)."
        )

    if training_args.push_to_hub:
        raise UserError(
            "--push_to_hub is not supported: lopt writes the checkpoint to --output_dir; upload it from there."
        )
    if getattr(training_args, "model_init_kwargs", None):
        raise UserError(
            "--model_init_kwargs is not used: lopt loads the model itself (use --dtype, --attn_implementation)."
        )
    if training_args.use_liger_kernel:
        if lopt_args.is_lopt:
            raise UserError(
                "--use_liger_kernel is not supported with LoPT methods (its fused loss replaces the forward LoPT's "
                "blocks hook into; untested), only with the baselines."
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("--use_liger_kernel needs the liger-kernel package: pip install liger-kernel.")
    if getattr(training_args, "assistant_only_loss", False):
        raise UserError(
            "--assistant_only_loss is not needed: lopt's rows train on the final response only (row formats: docs/TRAINING.md)."
        )
    if getattr(training_args, "completion_only_loss", None) is False:
        raise UserError(
            "--completion_only_loss false is not supported: lopt's rows train on the response tokens only."
        )
    if training_args.bf16 and training_args.fp16:
        raise UserError("--bf16 and --fp16 are exclusive: choose one.")
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) <= 0:
            raise UserError(f"--{name} {getattr(training_args, name)} must be positive.")
    if getattr(training_args, "max_length", 1) is not None and getattr(training_args, "max_length", 1) <= 0:
        raise UserError(f"--max_length {training_args.max_length} must be positive.")


def check_optimizer_in_backward(training_args, command: str) -> None:
    """--optimizer_in_backward steps inside the backward of one process, once per backward (lopt.engine.in_backward)."""
    if training_args.gradient_accumulation_steps > 1:
        raise UserError(
            f"--optimizer_in_backward steps after every backward: --gradient_accumulation_steps must be 1, not "
            f"{training_args.gradient_accumulation_steps} (raise --per_device_train_batch_size instead)."
        )
    if training_args.fp16:
        raise UserError(
            "--optimizer_in_backward cannot use --fp16's grad scaler (it checks every gradient before the step): use "
            "--bf16 or fp32."
        )
    if training_args.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "--optimizer_in_backward runs in one process (it would step before the gradients are averaged over "
            f"processes): run lopt {command} without torchrun/--fsdp, or drop --optimizer_in_backward."
        )
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    if optim in ("lomo", "adalomo"):
        raise UserError(
            f"--optimizer_in_backward does not combine with --optim {optim}, which fuses its own update into the "
            "backward: use one of them."
        )


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


def early_learning_rate(lopt_args: LoPTArguments, learning_rate: float, ratio: float | None) -> float | None:
    """--lr_k1, else `ratio` x learning_rate for LoPT methods when the recipe has a ratio, else None (= lr)."""
    if lopt_args.lr_k1 is not None or not lopt_args.is_lopt or ratio is None:
        return lopt_args.lr_k1
    return ratio * learning_rate


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


def run_arguments(*parsed, set_fields: frozenset[str] = frozenset()) -> dict:
    """Every parsed value, flat (as flags are named), and which ones the user set: the run's lopt_args.json."""
    values: dict[str, Any] = {}
    for instance in parsed:
        values.update(instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance))
    values["set_fields"] = sorted(set_fields)
    return values


RUN_CONFIG = "recipe.yaml"


def run_config(command: str, effective: dict[str, Any], recipe_name: str) -> str:
    """The flags a run used (`effective`: LoPTParser.effective, the ones the user set, flag or YAML, and the ones
    lopt's recipe set, as parsed), as a `--config` YAML that re-runs it; every other flag is at its default."""
    import yaml

    plain = json.loads(json.dumps(effective, default=str))
    header = (
        f"# lopt {command}: the flags this run used, those given and those of its recipe ({recipe_name}); every other "
        f"flag had its default.\n# Re-run it with `lopt {command} --config {RUN_CONFIG}`.\n"
    )
    return header + yaml.safe_dump(plain, sort_keys=True)


def save_final_model(
    trainer, prepared, tokenizer, output_dir: str, run_args: dict, config: str | None = None
) -> None:
    """Write a standard HF checkpoint (LoRA merged, adapter in adapter/), tokenizer, the run's arguments and its
    `config` (`run_config`, as RUN_CONFIG). Called on the writing rank only (rank 0: `trainer.args.should_save`); the
    write is checked, never trusted."""
    model = trainer.model
    lopt_config = prepared.lopt_config

    def write(tmp: str) -> None:
        if prepared.method == "lora":
            model.save_pretrained(os.path.join(tmp, "adapter"))
            merged = model.merge_and_unload()
            save_checkpoint_files(merged, tmp, safe_serialization=True)
        else:
            save_checkpoint_files(model, tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if lopt_config is not None:
            lopt_config.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_args.json"), "w") as f:
            f.write(trainer.args.to_json_string())
        with open(os.path.join(tmp, "lopt_args.json"), "w") as f:
            json.dump(run_args, f, indent=2, sort_keys=True, default=str)
        if config is not None:
            with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
                f.write(config)

    atomic_directory_write(output_dir, write)


def finish(command: str, output_dir: str, summary: dict) -> int:
    """Write summary.json (a Score as its share) and state it in one line: the last thing every training command
    does."""
    from lopt.evaluation.evaluate import summary_line, summary_record

    atomic_write_json(os.path.join(output_dir, "summary.json"), summary_record(summary))
    print(
        f"lopt {command}: saved a Hugging Face checkpoint to {output_dir} (every metric in its summary.json)",
        file=sys.stderr,
    )
    print(f"lopt {command}: {summary_line(summary)}", file=sys.stderr)
    return 0


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
