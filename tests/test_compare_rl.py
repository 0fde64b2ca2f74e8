"""`lopt compare --trainer grpo`: every method's GRPO run from one common SFT start, with the sweep's fairness machinery
(grids, choice on validation, resume, --report_only), on the built-in model's tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lopt.errors import UserError
from lopt.experiments.compare.select import select_on_validation
from lopt.experiments.compare.spec import METHOD_FLAGS, CompareSpec, _method_flags

START_ARGS = "--max_steps 4 --per_device_train_batch_size 4 --logging_steps 1 --max_samples 32"
GRPO_ARGS = "--per_device_train_batch_size 4 --num_generations 2 --max_completion_length 6 --max_samples 16 "
GRPO_ARGS += "--logging_steps 1"


def lopt(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lopt", *args], env=env, capture_output=True, text=True, timeout=900
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def mtimes(folder) -> dict:
    return {d: os.stat(folder / d / "model.safetensors").st_mtime_ns for d in os.listdir(folder)}


def test_grpo_compare_trains_every_method_from_one_start_and_resumes(builtin_tiny, tmp_path):
    out = tmp_path / "rl"
    args = ["compare", "--trainer", "grpo", "--methods", "e2e,lopt", "--learning_rates", "1e-4,1e-3"]
    args += ["--max_steps", "2", "--seeds", "1", "--eval_samples", "6", "--task", "successor"]
    args += ["--extend_grid", "0", "--lm_eval_tasks", "none", "--no_progress", "--output_dir", str(out)]
    grpo = ["--grpo_args", GRPO_ARGS]
    lopt([*args, "--sft_args", START_ARGS, *grpo], builtin_tiny["env"])

    # The start: made once by `lopt sft --method e2e` on the task, named with its command.
    start = out / "start"
    record = json.loads((out / "compare_start.json").read_text())
    assert record["path"] == str(start) and record["command"][:3] == ["sft", "--method", "e2e"]
    assert json.loads((start / "lopt_args.json").read_text())["max_steps"] == 4

    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["trainer"] == "grpo" and results["setup"]["runs"] == 4
    assert results["start"]["path"] == str(start) and 0.0 <= results["start"]["scores"]["task_accuracy"] <= 1
    points = {(p["method"], p["learning_rate"]) for p in results["points"]}
    assert points == {(m, lr) for m in ("e2e", "lopt") for lr in (1e-4, 1e-3)}
    runs = out / "runs"
    for p in results["points"]:
        run_args = json.loads(
            (runs / f"{p['method']}-lr{p['learning_rate']:g}-steps2-seed0" / "lopt_args.json").read_text()
        )
        # every run is `lopt grpo` from the start, at its own rate
        assert (
            run_args["model_name_or_path"] == str(start) and run_args["learning_rate"] == p["learning_rate"]
        )
        assert run_args["method"] == p["method"] and run_args["max_steps"] == 2
        assert 0.0 <= p["reward_first"] <= 1.0 and 0.0 <= p["reward_last"] <= 1.0
        assert p["step_time_s"] > 0 and p["peak_memory_bytes"] > 0 and p["retention_ppl"] > 1
        assert [s for s, _ in p["curve"]] == [1, 2]  # the reward of each logged step
    for name, chosen in results["methods"].items():
        assert chosen == select_on_validation([p for p in results["points"] if p["method"] == name]), name
    report = (out / "report.md").read_text()
    assert "# lopt compare: GRPO from one SFT start" in report
    assert "made once by `python -m lopt sft --method e2e --task successor" in report
    assert "| method | lr | steps | seeds | test acc | gain over start |" in report
    for name, chosen in results["methods"].items():  # each grid, its choice on validation in bold
        grid = next(line for line in report.splitlines() if line.startswith(f"- {name}: "))
        assert f"**{chosen['learning_rate']:g}**" in grid and "0.0001" in grid and "0.001" in grid

    # A rerun reuses the start and every run: nothing trains.
    kept, start_mtime = mtimes(runs), os.stat(start / "model.safetensors").st_mtime_ns
    lopt([*args, "--sft_args", START_ARGS, *grpo], builtin_tiny["env"])
    again = json.loads((out / "results.json").read_text())
    assert again["setup"]["runs_reused"] == 4 and again["points"] == results["points"]
    assert mtimes(runs) == kept and os.stat(start / "model.safetensors").st_mtime_ns == start_mtime

    # Another start in the same folder is refused, in one line, before anything trains.
    changed = lopt(
        [*args, "--sft_args", START_ARGS.replace("--max_steps 4", "--max_steps 3"), *grpo],
        builtin_tiny["env"],
        check=False,
    )
    assert changed.returncode != 0
    error = [line for line in changed.stderr.splitlines() if "holds GRPO runs from the start" in line]
    assert len(error) == 1 and "--max_steps 4" in error[0] and "use another --output_dir" in error[0]
    assert mtimes(runs) == kept and os.stat(start / "model.safetensors").st_mtime_ns == start_mtime

    # --report_only rebuilds the report from the run records alone.
    for d in os.listdir(runs):
        (runs / d / "model.safetensors").unlink()
    (out / "report.md").unlink()
    lopt([*args, "--sft_args", START_ARGS, *grpo, "--report_only"], builtin_tiny["env"])
    rebuilt = json.loads((out / "results.json").read_text())
    assert rebuilt["points"] == results["points"] and rebuilt["start"] == results["start"]
    assert "# lopt compare: GRPO from one SFT start" in (out / "report.md").read_text()


# --- the spec's checks: one line naming the value and the fix -----------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods=["e2e", "lopt_task"]), "needs labels and GRPO batches carry none"),
        (dict(grpo_args=["--model_name_or_path", "x"]), "--grpo_args sets --model_name_or_path"),
        (dict(grpo_args=["--seed", "3"]), "--grpo_args sets --seed"),
        (dict(sft_args=["--method", "lopt"]), "the start is `lopt sft --method e2e`"),
        (dict(train_file="rows.jsonl"), "--train_file: a GRPO compare trains and scores on a built-in task"),
        (dict(trainer="ppo"), "--trainer 'ppo' is unknown"),
    ],
)
def test_grpo_compare_refuses_bad_settings(kwargs, message):
    spec = dict(trainer="grpo", methods=["e2e"], seeds=1, task="successor") | kwargs
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        CompareSpec(**spec)
    assert "\n" not in str(error.value)


def test_grpo_only_flags_need_the_grpo_trainer():
    for kwargs in (dict(start_checkpoint="runs/sft"), dict(grpo_args=["--beta", "0.1"])):
        with pytest.raises(UserError, match="add --trainer grpo"):
            CompareSpec(methods=["e2e"], seeds=1, task="successor", **kwargs)


def test_start_checkpoint_must_be_an_sft_checkpoint_and_names_the_task(tmp_path):
    with pytest.raises(UserError, match="has no lopt_args.json"):
        CompareSpec(trainer="grpo", methods=["e2e"], seeds=1, start_checkpoint=str(tmp_path))
    (tmp_path / "lopt_args.json").write_text(json.dumps({"model_name_or_path": None, "task": "successor"}))
    spec = CompareSpec(trainer="grpo", methods=["e2e"], seeds=1, start_checkpoint=str(tmp_path))
    assert spec.task == "successor" and spec.model_name_or_path is None  # read from its records
    with pytest.raises(UserError, match="was trained on 'successor': drop --task, or use --task successor"):
        CompareSpec(trainer="grpo", methods=["e2e"], seeds=1, start_checkpoint=str(tmp_path), task="modules")
    with pytest.raises(UserError, match="drop one"):
        CompareSpec(
            trainer="grpo",
            methods=["e2e"],
            seeds=1,
            start_checkpoint=str(tmp_path),
            sft_args=["--max_steps", "9"],
        )


def test_lopt_anchor_at_0_3_is_the_real_base_grpo_lopt_recipe():
    """scripts/rl_study_*.sh run `lopt_anchor@0.3` as SmolLM2-135M's `lopt grpo` LoPT default: the objective of
    recipes/smollm2-135m/grpo-lopt.yaml and the early group at the real base's GRPO ratio."""
    from lopt.builtin.bases import base_of, read_recipe

    recipe = read_recipe("smollm2-135m/grpo-lopt.yaml")
    flags = _method_flags("lopt_anchor@0.3", 1e-5)
    assert METHOD_FLAGS["lopt_anchor"][:2] == ["--method", "lopt"]
    assert flags[flags.index("--aux_objective") + 1] == recipe["aux_objective"] == "anchor"
    assert recipe["clip_per_block"] is True and "--clip_per_block" in flags
    assert set(recipe) == {
        "aux_objective",
        "clip_per_block",
    }  # lambda and the anchor weight at their defaults
    ratio = dict(base_of("smollm2-135m").early_lr_ratios)["grpo"]
    assert float(flags[flags.index("--lr_k1") + 1]) == pytest.approx(ratio * 1e-5) and ratio == 0.3
