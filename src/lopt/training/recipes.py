"""The recipe a training command starts from: lopt's defaults for every command, then the recipe file of the run's
base and task (lopt.builtin.bases) and LoPT's objective beside it, applied to the fields the user did not set."""

from __future__ import annotations

import os
from typing import Any

from lopt.training.arguments import LOPT_METHODS, LoPTArguments, bf16_by_default


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


def early_learning_rate(lopt_args: LoPTArguments, learning_rate: float, ratio: float | None) -> float | None:
    """--lr_k1, else `ratio` x learning_rate for LoPT methods when the recipe has a ratio, else None (= lr)."""
    if lopt_args.lr_k1 is not None or not lopt_args.is_lopt or ratio is None:
        return lopt_args.lr_k1
    return ratio * learning_rate
