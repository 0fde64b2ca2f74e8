"""What `lopt grpo` runs around TRL's GRPOTrainer on lopt's built-in tasks: the task and base a starting checkpoint
records, the completion budget of a task whose answers are known, and the base a run's knowledge is measured against.
The recipes (and LoPT's objective without labels) are files: lopt.builtin.bases."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from lopt.builtin.bases import RUN_RECORDS, base_of
from lopt.evaluation.evaluate import ScoringDefaults, scoring_defaults

# max_completion_length on a task whose recipe leaves it to the answers (a real base's): the longest reference answer,
# one token for the end of the turn, and this share more (JSON spacing and number lengths vary). A completion cut
# there is not the answer: it scores 0.
COMPLETION_MARGIN = 0.25


def recorded_task(model_name_or_path: str | None) -> ScoringDefaults | None:
    """The task and base a checkpoint written by `lopt sft` (or grpo, dpo) records in its lopt_args.json, followed
    back to the model it was trained from, as `lopt eval` reads them (`scoring_defaults`). None for a model without
    those records: the built-in model, a real base, a model lopt did not write."""
    base = base_of(model_name_or_path)
    if base.kind != "user" and not base.checkpoint:  # a base itself
        return None
    if not os.path.isfile(os.path.join(os.path.expanduser(model_name_or_path), RUN_RECORDS)):
        return None
    return scoring_defaults(model_name_or_path)


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
    base = base_of(model_name_or_path)
    if not base.checkpoint or base.kind != "real":
        return loaded_path
    return base.base_path(progress=False)
