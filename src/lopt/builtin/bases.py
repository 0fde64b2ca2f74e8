"""The base a run starts from, as one object: the built-in model, a real base (e.g. smollm2-135m), or the user's model.

    base_of(model_name_or_path) -> Base    what a --model_name_or_path is, or descends from
    Base.path(progress)                    the folder (or hub id) to load: built or converted on first use
    Base.tasks / Base.default_task         the built-in tasks made for it, and the one it trains on by default
    Base.can_train(task)                   whether a built-in task fits it (a real base's tasks fit any chat model)
    Base.recipe(command, task)             lopt's defaults for a command's run (a `Recipe`, from `lopt/recipes/`)
    Base.retention / Base.probe            its retention text and its knowledge probe
    BUILTIN, USER, REAL_BASE_OBJECTS       the bases lopt knows

Every command and `lopt compare` ask this object which world they are in; nothing else tells the built-in model, a
real base and the user's model apart.

Recipes are YAML files in `lopt/recipes/<base>/` in the format `--config` reads (flag names as keys), each with a
comment header saying where its numbers come from. A run's recipe is the first file found of:

    <the base>/<command>-<task>.yaml, <the base>/<command>.yaml    the base's own (the user's model has none)
    <the task's base>/<command>-<task>.yaml, .../<command>.yaml    a task borrowed from the base it was made for
    user/<command>.yaml                                             the user's own data (or a hub task)

and `<command>-lopt.yaml` beside the chosen file, when there is one, is LoPT's objective there (applied by the
command, as a whole, when the user chose no objective). So the built-in model's `sft.yaml` serves every `lopt sft`
run on it, and a user's model on `extract` gets smollm2-135m's recipes for it.

Adding a task for a real base: its rows and scorer in a module like `lopt.builtin.totals_task`, its name in
`lopt.builtin.tasks` (`BUILTIN_TASKS`, `REAL_BASE_TASKS`: the real bases' `tasks` below are those), and one recipe
file per command, `recipes/smollm2-135m/sft-<task>.yaml` and `grpo-<task>.yaml`; `tests/test_bases.py` checks that
every task of every base has its recipes. Nothing else changes: every command and compare reach it through here.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Any

from lopt.builtin.tasks import BUILTIN_MODEL_TASKS, BUILTIN_TASKS, REAL_BASE_TASKS
from lopt.errors import UserError

__all__ = [
    "BUILTIN",
    "REAL_BASE_OBJECTS",
    "RUN_RECORDS",
    "SFT_EARLY_LR_RATIO",
    "USER",
    "Base",
    "Recipe",
    "base_of",
    "read_recipe",
]

# The records `lopt sft`, `grpo` and `dpo` write beside a checkpoint: every flag of the run
# (lopt.training.outputs.run_arguments); base_of follows them back to the base.
RUN_RECORDS = "lopt_args.json"
# The recipes lopt ships: package data (pyproject.toml's [tool.setuptools.package-data]).
RECIPES = files("lopt").joinpath("recipes")

# `lopt sft` with a LoPT method and no --lr_k1, on every base: the early group learns at this fraction of
# --learning_rate. Chosen from the 3-seed `lopt compare` study in docs/EVIDENCE.md, 'Choosing the defaults'
# (built-in model and task, 300 steps): 0.3 gave the best held-out accuracy of the ratios 1 (the paper's), 0.3 and
# 0.1, and a smaller retention loss than 1.
SFT_EARLY_LR_RATIO = 0.3


@dataclass(frozen=True)
class Recipe:
    """lopt's defaults for one run: `name` the file ("smollm2-135m/sft-totals.yaml"), `values` its flags,
    `lopt_objective` the flags of LoPT's objective beside it ({} when none), `early_lr_ratio` the early group's share of
    --learning_rate for LoPT methods without --lr_k1 (None: the full rate)."""

    name: str
    values: dict[str, Any]
    lopt_objective: dict[str, Any]
    lopt_objective_name: str | None
    early_lr_ratio: float | None


@dataclass(frozen=True)
class Base:
    """One base model and everything lopt ships for it.

    kind: "builtin" (the built-in pretrained model, lopt.builtin.base), "real" (a pretrained base by short name,
    lopt.builtin.hub_bases) or "user" (any other model). name: "builtin", the short name, or "user"; it is also the
    folder of its recipes. tasks: the built-in tasks made for it, its default first. retention: the text whose
    perplexity measures what it kept, "corpus" (the built-in model's held-out pretraining documents) or "prose"
    (English prose). probe: its knowledge probe, "corpus" (the lm-eval cloze over facts of the built-in corpus,
    lopt.builtin.knowledge), "world" (country facts, lopt.evaluation.world_knowledge: compare's world_knowledge
    default, and the "knowledge kept" of a run on its tasks) or None. early_lr_ratios: command -> the early group's
    share of --learning_rate under its recipes. model_name_or_path: the model as the user named it (None: the
    built-in model). checkpoint: True for a model that lopt trained from this base (base_of read its records), and
    origin then names the base as the records do (None: the built-in model). copy_of_builtin: True for a folder of
    the built-in model named by --model_name_or_path: the user's model to the training commands and compare (the
    user's recipes and data; tests train such a folder as any model), the built-in model to `lopt eval` (its task
    and retention text).
    """

    kind: str
    name: str
    tasks: tuple[str, ...] = ()
    retention: str = "prose"
    probe: str | None = None
    early_lr_ratios: tuple[tuple[str, float], ...] = (("sft", SFT_EARLY_LR_RATIO),)
    model_name_or_path: str | None = None
    checkpoint: bool = False
    origin: str | None = None
    copy_of_builtin: bool = False

    @property
    def default_task(self) -> str | None:
        """The built-in task a run trains on when given no data: the base's first task. None for the user's model
        and for a checkpoint (its task is in its records: lopt.evaluation.evaluate.scoring_defaults)."""
        return self.tasks[0] if self.tasks and not self.checkpoint else None

    def can_train(self, task: str) -> bool:
        """Whether the built-in `task` fits this model: its own tasks, or a real base's (made for any chat model).
        The built-in model's tasks fit it alone (and the checkpoints trained from it)."""
        return task in self.tasks or task not in BUILTIN_MODEL_TASKS

    def rl_starts_from_sft(self, task: str | None) -> bool:
        """Whether `lopt grpo`/`dpo` on `task` start from the task's SFT checkpoint instead of this model: for the
        built-in model named by default on a built-in task (the raw model never answers it: nothing to reinforce)."""
        return self.kind == "builtin" and self.model_name_or_path is None and task in BUILTIN_TASKS

    def path(self, progress: bool = True) -> str:
        """What to load: the built-in model's folder (built on first use), a real base's converted folder (converted
        on first use) when named by its short name, else the model as given (a folder or a hub id)."""
        if self.model_name_or_path is None:
            from lopt.builtin.base import builtin_model_path

            return str(builtin_model_path(progress=progress))
        from lopt.builtin.hub_bases import resolve_model_name

        return resolve_model_name(self.model_name_or_path, progress=progress)

    def base_path(self, progress: bool = True) -> str:
        """What the base itself loads from: `path()`, or for a checkpoint the base it was trained from (e.g. the real
        base a run's knowledge kept is measured against)."""
        if not self.checkpoint:
            return self.path(progress)
        return replace(self, model_name_or_path=self.origin, checkpoint=False, origin=None).path(progress)

    def recipe(self, command: str, task: str | None) -> Recipe:
        """lopt's defaults for `lopt COMMAND` on this base and `task` (None: the user's data): see the module
        docstring for which file that is."""
        owner = _task_base(task)
        sources = [] if self.kind == "user" else [self]
        sources += [base for base in (owner, USER) if base is not None and base not in sources]
        for base in sources:
            for stem in (f"{command}-{task}", command) if task is not None else (command,):
                name = f"{base.name}/{stem}.yaml"
                if RECIPES.joinpath(name).is_file():
                    objective_name = f"{base.name}/{command}-lopt.yaml"
                    has_objective = RECIPES.joinpath(objective_name).is_file()
                    return Recipe(
                        name=name,
                        values=read_recipe(name),
                        lopt_objective=read_recipe(objective_name) if has_objective else {},
                        lopt_objective_name=objective_name if has_objective else None,
                        early_lr_ratio=dict(base.early_lr_ratios).get(command),
                    )
        raise UserError(
            f"lopt ships no {command} recipe for {self.name} (task {task}): a bug, please report it."
        )


# The built-in model and its two tasks. Under GRPO and DPO (from an SFT checkpoint of a task) its early group learns at
# learning_rate / 20: with the full rate the reconstruction objective moved the early blocks faster than the late
# block could follow (the measurements are in recipes/builtin/grpo-successor.yaml and dpo-successor.yaml).
BUILTIN = Base(
    kind="builtin",
    name="builtin",
    tasks=BUILTIN_MODEL_TASKS,
    retention="corpus",
    probe="corpus",
    early_lr_ratios=(("sft", SFT_EARLY_LR_RATIO), ("grpo", 1 / 20), ("dpo", 1 / 20)),
)
# Any other model: no tasks or recipes of its own (a real base's tasks and the user's data bring theirs).
USER = Base(kind="user", name="user")


def _real_base(name: str) -> Base:
    """A real base (lopt.builtin.hub_bases.REAL_BASES): the chat tasks, English prose and the world-knowledge probe.
    GRPO's early group learns at lopt sft's ratio (recipes/<name>/grpo-*.yaml)."""
    return Base(
        kind="real",
        name=name,
        tasks=REAL_BASE_TASKS,
        retention="prose",
        probe="world",
        early_lr_ratios=(("sft", SFT_EARLY_LR_RATIO), ("grpo", SFT_EARLY_LR_RATIO)),
    )


def _real_bases() -> dict[str, Base]:
    from lopt.builtin.hub_bases import REAL_BASES

    return {name: _real_base(name) for name in REAL_BASES}


REAL_BASE_OBJECTS: dict[str, Base] = _real_bases()


def _task_base(task: str | None) -> Base | None:
    """The base a built-in task was made for (the first that lists it); None for the user's data or a hub task."""
    if task is None or task not in BUILTIN_TASKS:
        return None
    return next(base for base in (BUILTIN, *REAL_BASE_OBJECTS.values()) if task in base.tasks)


def base_of(model_name_or_path: str | None, _depth: int = 0) -> Base:
    """The base `model_name_or_path` is: the built-in model (None, or its built folder), a real base (its short
    name, or a folder converted from one), or the user's model; a checkpoint lopt trained (it holds RUN_RECORDS) is
    followed back to the model it was trained from, and is that base's (with `checkpoint` set)."""
    from lopt.builtin.base import METADATA_FILE as BUILTIN_METADATA
    from lopt.builtin.hub_bases import METADATA_FILE as REAL_METADATA

    if model_name_or_path is None:
        return BUILTIN
    given = {"model_name_or_path": model_name_or_path}
    if model_name_or_path in REAL_BASE_OBJECTS:
        return replace(REAL_BASE_OBJECTS[model_name_or_path], **given)
    folder = os.path.expanduser(model_name_or_path)
    if os.path.isfile(os.path.join(folder, REAL_METADATA)):
        name = _read_json(os.path.join(folder, REAL_METADATA)).get("name")
        if name not in REAL_BASE_OBJECTS:  # converted by an older lopt: its metadata had no name
            name = next(iter(REAL_BASE_OBJECTS))
        return replace(REAL_BASE_OBJECTS[name], **given)
    if os.path.isfile(os.path.join(folder, BUILTIN_METADATA)):
        return replace(USER, **given, retention=BUILTIN.retention, copy_of_builtin=True)
    records = os.path.join(folder, RUN_RECORDS)
    if os.path.isfile(records) and _depth < 8:
        parent = base_of(_read_json(records).get("model_name_or_path"), _depth + 1)
        if parent.kind != "user":
            origin = parent.origin if parent.checkpoint else parent.model_name_or_path
            return replace(parent, **given, checkpoint=True, origin=origin)
    return replace(USER, **given)


def _read_json(path: str) -> dict:
    with open(path) as f:
        value = json.load(f)
    return value if isinstance(value, dict) else {}


@functools.cache
def _recipe_text(name: str) -> str:
    return RECIPES.joinpath(name).read_text()


def read_recipe(name: str) -> dict[str, Any]:
    """The flags of a shipped recipe file ("builtin/sft.yaml"), as `--config` reads them."""
    import yaml

    values = yaml.safe_load(_recipe_text(name)) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {name} must hold a mapping of flag names to values")
    return values
