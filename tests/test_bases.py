"""lopt.builtin.bases: which base a model is, the recipes it ships (pinned: the same runs get the same values) and
the effective config a run writes beside its checkpoint (re-parsed with --config)."""

from __future__ import annotations

import json

import pytest
import yaml

from lopt.builtin.bases import BUILTIN, REAL_BASE_OBJECTS, RECIPES, USER, base_of, read_recipe
from lopt.builtin.tasks import BUILTIN_TASKS

SMOLLM2 = "smollm2-135m"
GRPO_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "loss_type": "grpo"}
# Every recipe lopt ships, by (base, command, task): its file and its flags. A change here changes what a default run
# does: say why in the file's header.
PINNED = {
    ("builtin", "sft", "successor"): (
        "builtin/sft.yaml",
        {
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 16,
            "max_length": 128,
            "max_steps": 300,
            "logging_steps": 25,
        },
    ),
    ("builtin", "sft", "modules"): (
        "builtin/sft.yaml",
        None,
    ),  # None: the flags pinned above for the same file
    ("builtin", "sft", None): (
        "builtin/sft.yaml",
        None,
    ),  # the user's data on the built-in model: its recipe too
    ("builtin", "grpo", "successor"): (
        "builtin/grpo-successor.yaml",
        {
            **GRPO_SAMPLING,
            "learning_rate": 2e-4,
            "per_device_train_batch_size": 32,
            "num_generations": 8,
            "max_prompt_length": 128,
            "max_completion_length": 8,
            "max_steps": 150,
            "logging_steps": 10,
        },
    ),
    ("builtin", "grpo", "modules"): (
        "builtin/grpo-modules.yaml",
        "builtin/grpo-successor.yaml",
    ),  # same flags
    ("builtin", "dpo", "successor"): (
        "builtin/dpo-successor.yaml",
        {
            "learning_rate": 1e-4,
            "per_device_train_batch_size": 8,
            "max_length": 128,
            "max_steps": 60,
            "logging_steps": 5,
        },
    ),
    (SMOLLM2, "sft", "extract"): (
        "smollm2-135m/sft-extract.yaml",
        {
            "learning_rate": 1e-4,
            "per_device_train_batch_size": 8,
            "max_length": 128,
            "max_steps": 40,
            "logging_steps": 5,
        },
    ),
    (SMOLLM2, "sft", "totals"): (
        "smollm2-135m/sft-totals.yaml",
        {
            "learning_rate": 1e-4,
            "per_device_train_batch_size": 8,
            "max_length": 128,
            "max_steps": 150,
            "logging_steps": 5,
        },
    ),
    (SMOLLM2, "grpo", "extract"): (
        "smollm2-135m/grpo-extract.yaml",
        {
            **GRPO_SAMPLING,
            "learning_rate": 1e-5,
            "per_device_train_batch_size": 8,
            "num_generations": 4,
            "max_prompt_length": 128,
            "max_steps": 50,
            "logging_steps": 5,
        },
    ),
    (SMOLLM2, "grpo", "totals"): ("smollm2-135m/grpo-totals.yaml", "smollm2-135m/grpo-extract.yaml"),
    (SMOLLM2, "sft", None): ("user/sft.yaml", {"num_train_epochs": 1.0}),
    ("user", "sft", None): ("user/sft.yaml", None),
    ("user", "sft", "totals"): ("smollm2-135m/sft-totals.yaml", None),  # a borrowed task brings its recipe
    ("user", "grpo", None): (
        "user/grpo.yaml",
        {
            **GRPO_SAMPLING,
            "per_device_train_batch_size": 8,
            "num_generations": 4,
            "max_prompt_length": 1024,
            "max_completion_length": 512,
            "num_train_epochs": 1.0,
        },
    ),
    ("user", "grpo", "gsm8k"): ("user/grpo.yaml", None),
    ("builtin", "grpo", "extract"): ("smollm2-135m/grpo-extract.yaml", None),
    ("user", "dpo", None): ("user/dpo.yaml", {"per_device_train_batch_size": 4, "num_train_epochs": 1.0}),
}
OBJECTIVES = {
    "sft": {"aux_objective": "task+anchor", "lambda_aux": 1.0, "anchor_weight": 0.1, "clip_per_block": True},
    "grpo": {"aux_objective": "anchor", "clip_per_block": True},
}
BASES = {"builtin": BUILTIN, SMOLLM2: REAL_BASE_OBJECTS[SMOLLM2], "user": USER}


def test_every_recipe_resolves_to_its_pinned_file_and_flags():
    pinned = {}
    for (base, command, task), (name, values) in PINNED.items():
        recipe = BASES[base].recipe(command, task)
        if values is None or isinstance(values, str):  # the flags of a file pinned above
            values = pinned[values or name]
        pinned[name] = values
        assert (recipe.name, recipe.values) == (name, values), (base, command, task)
        assert all(type(recipe.values[k]) is type(v) for k, v in values.items()), name  # 1e-4, not "1e-4"
        objective = OBJECTIVES[command] if name.startswith(SMOLLM2) else {}
        assert recipe.lopt_objective == objective, name
        ratio = {"builtin/sft": 0.3, "builtin/grpo": 1 / 20, "builtin/dpo": 1 / 20, "smollm2-135m": 0.3}
        expected = next(
            (r for prefix, r in ratio.items() if name.startswith(prefix)), 0.3 if command == "sft" else None
        )
        assert recipe.early_lr_ratio == expected, name
    shipped = {
        f"{folder.name}/{f.name}" for folder in RECIPES.iterdir() if folder.is_dir() for f in folder.iterdir()
    }
    used = {name for name, _ in PINNED.values()} | {f"{SMOLLM2}/{c}-lopt.yaml" for c in OBJECTIVES}
    assert shipped == used  # every file is pinned above, and every pinned file is shipped


def test_every_task_of_every_base_has_its_own_recipes():
    """Adding a task to a base means adding its recipe files: a task without them fails here."""
    for base in (BUILTIN, *REAL_BASE_OBJECTS.values()):
        assert base.tasks and set(base.tasks) <= set(BUILTIN_TASKS)
        for task in base.tasks:
            for command in ("sft", "grpo"):
                assert base.recipe(command, task).name.startswith(f"{base.name}/"), (base.name, command, task)


def test_every_recipe_file_has_a_header_and_parses_as_a_config():
    from lopt.cli import dpo, grpo, sft

    parsers = {"sft": sft.make_parser(), "grpo": grpo.make_parser(), "dpo": dpo.make_parser()}
    for folder in RECIPES.iterdir():
        for path in folder.iterdir():
            name = f"{folder.name}/{path.name}"
            assert path.read_text().startswith("# "), f"{name}: say where its numbers come from"
            command = path.name.split("-")[0].removesuffix(".yaml")
            values, set_fields = parsers[command].parse_values(["--config", str(path)])
            assert set_fields == set(read_recipe(name)), name
            assert all(values[k] == v for k, v in read_recipe(name).items()), name


def test_base_of_tells_the_three_worlds_and_follows_checkpoints(tmp_path):
    from lopt.builtin.base import METADATA_FILE as BUILTIN_METADATA
    from lopt.builtin.hub_bases import METADATA_FILE as REAL_METADATA

    assert base_of(None) is BUILTIN and BUILTIN.default_task == "successor" and BUILTIN.probe == "corpus"
    real = base_of(SMOLLM2)
    assert (real.kind, real.default_task, real.retention, real.probe) == ("real", "extract", "prose", "world")
    user = base_of("some/model")
    assert (user.kind, user.default_task, user.probe) == ("user", None, None) and user.path() == "some/model"
    converted, built = tmp_path / "converted", tmp_path / "built"
    converted.mkdir(), built.mkdir()
    (converted / REAL_METADATA).write_text(json.dumps({"name": SMOLLM2}))
    (built / BUILTIN_METADATA).write_text("{}")
    assert base_of(str(converted)).name == SMOLLM2 and base_of(str(converted)).path() == str(converted)
    copy = base_of(str(built))  # the built-in model named by its folder: the user's model to the commands
    assert (copy.kind, copy.default_task, copy.copy_of_builtin, copy.retention) == (
        "user",
        None,
        True,
        "corpus",
    )
    assert not copy.can_train("successor") and not copy.rl_starts_from_sft("successor")
    assert BUILTIN.rl_starts_from_sft("successor") and not real.rl_starts_from_sft("extract")
    # checkpoints lopt wrote, two deep: the real base they descend from, marked, with no default task of their own
    first, second = tmp_path / "sft", tmp_path / "grpo"
    for folder, parent in ((first, str(converted)), (second, str(first))):
        folder.mkdir()
        (folder / "lopt_args.json").write_text(json.dumps({"model_name_or_path": parent, "task": "totals"}))
    checkpoint = base_of(str(second))
    assert (checkpoint.kind, checkpoint.checkpoint, checkpoint.default_task) == ("real", True, None)
    assert checkpoint.path() == str(second) and checkpoint.base_path() == str(converted)
    (first / "lopt_args.json").write_text(json.dumps({"model_name_or_path": "some/model"}))
    assert base_of(str(second)).kind == "user"  # trained from the user's model: the user's
    assert BUILTIN.can_train("extract") and real.can_train("extract") and user.can_train("totals")
    assert not real.can_train("successor") and not user.can_train("modules")


@pytest.mark.parametrize(
    "argv, recipe",
    [
        (
            ["--model_name_or_path", SMOLLM2, "--task", "totals"],
            "recipe: smollm2-135m/sft-totals.yaml + smollm2-135m/sft-lopt.yaml",
        ),
        (["--model_name_or_path", SMOLLM2, "--method", "e2e"], "recipe: smollm2-135m/sft-extract.yaml"),
        ([], "recipe: builtin/sft.yaml"),
    ],
)
def test_the_recipe_line_names_the_files_used(argv, recipe):
    from lopt.cli import sft
    from lopt.training import recipes

    values, set_fields = sft.make_parser().parse_values(argv)
    chosen, _ = recipes.command_recipe("sft", values, set_fields)
    assert recipes.describe_recipe(chosen, values, set_fields) == recipe


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_the_run_config_reparses_to_the_same_run(command, tmp_path):
    """recipe.yaml holds every flag the user or the recipe set, with the run's values; `--config recipe.yaml` gives
    the same parsed run (and nothing for the recipe left to fill)."""
    from lopt.cli import grpo, sft
    from lopt.training import outputs

    module = {"sft": sft, "grpo": grpo}[command]
    argv = ["--model_name_or_path", SMOLLM2, "--task", "totals", "--lambda_aux", "2", "--seed", "3"]
    parser = module.make_parser()
    parsed, set_fields = parser.parse(argv, module.recipe)
    values, _ = parser.parse_values(argv)
    recipe_fields = set(module.recipe(values, set_fields))
    assert set(parser.effective) == {*set_fields, *recipe_fields} and "learning_rate" in recipe_fields
    text = outputs.run_config(command, parser.effective, "smollm2-135m/x.yaml")
    assert text.startswith("# lopt ") and yaml.safe_load(text)["lambda_aux"] == 2.0
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    again_parser = module.make_parser()
    again, again_set = again_parser.parse(["--config", str(path)], module.recipe)
    assert again_set == set(parser.effective)  # everything set: the recipe has nothing left to fill
    assert again_parser.effective == json.loads(json.dumps(parser.effective, default=str))
    assert outputs.run_arguments(*again) == outputs.run_arguments(*parsed)
