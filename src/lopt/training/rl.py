"""What `lopt grpo` runs around TRL's GRPOTrainer on lopt's built-in tasks: the task and base a starting checkpoint
records, and the recipe of a real base's tasks (the LoPT objective without labels, the early rate, the completion
budget)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from lopt.builtin.tasks import BUILTIN_TASKS, REAL_BASE_TASKS
from lopt.evaluation.evaluate import RUN_RECORDS, ScoringDefaults, scoring_defaults
from lopt.training.arguments import LOPT_METHODS, SFT_LR_K1_RATIO

# LoPT's local objective for GRPO on a real base's tasks. `lopt sft`'s there (task+anchor) cannot be used: its "task"
# term is the batch's next-token loss, and GRPO batches carry no labels. Of the label-free objectives, "anchor" (the
# early half pulled toward the starting checkpoint's own boundary state), not "recon" (the paper's: the early half
# learns to let a small head reconstruct its input): GRPO starts from a checkpoint that SFT already taught the task,
# so the early half has nothing to gain from a reconstruction, and moving it costs what the base knows (SFT on
# extract, SmolLM2-135M, seed 0: anchor alone kept 87.5% of the facts, recon 76.9%; docs/EVIDENCE.md). With an
# embedding tied to the LM head (SmolLM2) the anchor's frozen copy reads the model's own embedding, so the early
# blocks stay where the checkpoint put them and the last half does the reinforcement. Clipped per block, as in
# `lopt sft` there: under one global clip the anchor's gradient can shrink the task step. lambda and the anchor weight
# stay at their defaults, the setting `lopt compare` measured as lopt_anchor.
GRPO_REAL_BASE_LOPT_OBJECTIVE = {"aux_objective": "anchor", "clip_per_block": True}
# The early group's rate on a real base's tasks (--lr_k1 unset): `lopt sft`'s ratio there.
GRPO_REAL_BASE_LR_K1_RATIO = SFT_LR_K1_RATIO
# On the built-in model's tasks: learning_rate / 20. Measured on the built-in task from E2E-SFT'd checkpoints: with
# the early group at the full rate, the reconstruction objective moves the early blocks faster than the late block can
# follow. GRPO at lr 2e-4 from a 0.83 checkpoint: reward 0.34 -> 0.00, held-out 0.00 (lr/20: reward 0.62 -> 0.80,
# held-out 0.84). DPO at lr 1e-4 from a 0.34 checkpoint: held-out 0.04 (lr/20: 0.36, preference accuracy 0.4 -> 0.65).
BUILTIN_TASK_EARLY_LR_FACTOR = 1 / 20
# max_completion_length on a real base's tasks: the longest reference answer, one token for the end of the turn, and
# this share more (JSON spacing and number lengths vary). A completion cut there is not the answer: it scores 0.
COMPLETION_MARGIN = 0.25


def recorded_task(model_name_or_path: str | None) -> ScoringDefaults | None:
    """The task and base a checkpoint written by `lopt sft` (or grpo, dpo) records in its lopt_args.json, followed
    back to the model it was trained from, as `lopt eval` reads them (`scoring_defaults`). None for a model without
    those records: the built-in model, a real base, a model lopt did not write."""
    if model_name_or_path is None:
        return None
    if not os.path.isfile(os.path.join(os.path.expanduser(model_name_or_path), RUN_RECORDS)):
        return None
    return scoring_defaults(model_name_or_path)


def early_lr_ratio(task: str | None) -> float | None:
    """The early group's rate as a share of learning_rate for LoPT methods without --lr_k1 (None: learning_rate)."""
    if task in REAL_BASE_TASKS:
        return GRPO_REAL_BASE_LR_K1_RATIO
    return BUILTIN_TASK_EARLY_LR_FACTOR if task in BUILTIN_TASKS else None


def real_base_objective(
    values: dict[str, Any], set_fields: frozenset[str], task: str | None
) -> dict[str, Any]:
    """GRPO_REAL_BASE_LOPT_OBJECTIVE for LoPT on a real base's task, unless the user chose an objective (a given
    --aux_objective or --lambda_aux replaces it as a whole, as in `lopt sft`)."""
    if task not in REAL_BASE_TASKS or values["method"] not in LOPT_METHODS:
        return {}
    if set_fields & {"aux_objective", "lambda_aux"}:
        return {}
    objective = dict(GRPO_REAL_BASE_LOPT_OBJECTIVE)
    if values["optimizer_in_backward"]:
        objective.pop("clip_per_block")  # it clips each parameter by its own norm already
    return objective


def completion_budget(answers: Sequence[str], tokenizer) -> int:
    """max_completion_length for a task whose right completion is its reference answer: the longest answer in tokens,
    one more for the end-of-turn token, and COMPLETION_MARGIN more."""
    if not answers:
        raise ValueError("completion_budget needs at least one answer")
    longest = max(len(ids) for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"])
    return math.ceil((longest + 1) * (1 + COMPLETION_MARGIN))


def knowledge_base(model_name_or_path: str | None, loaded_path: str) -> str:
    """The model a run's "knowledge kept" is measured against: the real base a checkpoint descends from (its records;
    a short name resolved to its converted folder, the folder `lopt sft` measures against), else the model loaded."""
    recorded = recorded_task(model_name_or_path)
    if recorded is None or recorded.base_model is None:
        return loaded_path
    from lopt.builtin.hub_bases import resolve_model_name

    return resolve_model_name(recorded.base_model, progress=False)
