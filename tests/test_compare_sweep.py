"""`lopt compare` sweeps: every (method, lr, steps) point, resume, choices on validation, fronts and tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lopt.errors import UserError
from lopt.experiments.compare.report import format_report, goals
from lopt.experiments.compare.select import (
    accuracy_at_retention,
    pareto_front,
    retention_at_accuracy,
    select_on_validation,
    steps_to_accuracy,
)
from lopt.experiments.compare.spec import CompareSpec
from lopt.experiments.compare.sweep import run_compare


def lopt(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lopt", *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_sweep_writes_every_point_and_resume_redoes_only_unfinished_runs(builtin_tiny, tmp_path):
    out = tmp_path / "sweep"
    args = ["compare", "--methods", "e2e,lopt", "--learning_rates", "1e-3,3e-3", "--max_steps", "4"]
    args += [
        "--seeds",
        "1",
        "--eval_samples",
        "6",
        "--task",
        "successor",
        "--output_dir",
        str(out),
        "--no_progress",
    ]
    args += ["--sft_args", "--per_device_train_batch_size 4 --logging_steps 1 --max_samples 32"]
    # the grids as given (the extension: test_compare_extends_a_grid_chosen_at_its_edge)
    args += ["--extend_grid", "0"]
    # Two worker processes here; the resumes below run in-process.
    lopt([*args, "--jobs", "2"], builtin_tiny["env"])
    results = json.loads((out / "results.json").read_text())
    points = {(p["method"], p["learning_rate"], p["max_steps"]) for p in results["points"]}
    assert points == {(m, lr, 4) for m in ("e2e", "lopt") for lr in (1e-3, 3e-3)}
    assert results["setup"]["runs"] == 4 and results["setup"]["runs_reused"] == 0
    for p in results["points"]:
        for key in ("validation_task_accuracy", "task_accuracy"):
            assert 0.0 <= p[key] <= 1.0, key
        assert p["validation_retention_ppl"] > 1 and p["retention_ppl"] > 1
        assert p["compute_s"] == pytest.approx(p["step_time_s"] * 4)
    runs = out / "runs"
    lopt_args = json.loads((runs / "lopt-lr0.003-steps4-seed0" / "lopt_args.json").read_text())
    assert lopt_args["learning_rate"] == 3e-3 and lopt_args["lr_k1"] == 3e-3  # plain name: lr_k1 = lr
    assert lopt_args["task"] == "successor" and lopt_args["max_steps"] == 4
    assert (
        json.loads((runs / "e2e-lr0.001-steps4-seed0" / "lopt_args.json").read_text())["learning_rate"]
        == 1e-3
    )
    for name, chosen in results["methods"].items():
        same = [p for p in results["points"] if p["method"] == name]
        assert chosen == select_on_validation(same), name
    report = (out / "report.md").read_text()
    assert "Accuracy at matched retention" in report and "## LoPT against e2e, goal by goal" in report
    assert (out / "fronts.png").stat().st_size > 1000

    # Resume: a run killed before it finished (no summary.json, no record) and a run made by another command are
    # redone; the two finished runs are reused untouched.
    killed, other = runs / "e2e-lr0.003-steps4-seed0", runs / "lopt-lr0.001-steps4-seed0"
    (killed / "summary.json").unlink()
    (killed / "compare_run.json").unlink()
    marker = json.loads((other / "compare_command.json").read_text())
    marker["command"] = [*marker["command"], "--weight_decay", "0.1"]
    (other / "compare_command.json").write_text(json.dumps(marker))
    kept = {d: os.stat(runs / d / "model.safetensors").st_mtime_ns for d in os.listdir(runs)}
    base_record = json.loads((out / "compare_base.json").read_text())
    base_record["before"]["test_retention_marker"] = 1.0  # the base's scores, same rows: reused, not re-taken
    (out / "compare_base.json").write_text(json.dumps(base_record))
    lopt(args, builtin_tiny["env"])
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["setup"]["runs_reused"] == 2
    assert json.loads((out / "compare_base.json").read_text())["before"]["test_retention_marker"] == 1.0
    for d, mtime in kept.items():
        redone = d in (killed.name, other.name)
        assert (os.stat(runs / d / "model.safetensors").st_mtime_ns != mtime) == redone, d
    assert (killed / "summary.json").is_file() and (killed / "compare_run.json").is_file()
    assert json.loads((other / "compare_command.json").read_text())["command"][-2:] != [
        "--weight_decay",
        "0.1",
    ]

    # Other evaluation rows: every run is re-scored, none retrained.
    kept = {d: os.stat(runs / d / "model.safetensors").st_mtime_ns for d in os.listdir(runs)}
    lopt([*args, "--eval_samples", "5"], builtin_tiny["env"])  # the last --eval_samples wins
    rescored = json.loads((out / "results.json").read_text())
    assert rescored["setup"]["runs_reused"] == 0 and rescored["setup"]["test_rows"] == 5
    assert "test_retention_marker" not in json.loads((out / "compare_base.json").read_text())["before"]
    assert all(os.stat(runs / d / "model.safetensors").st_mtime_ns == m for d, m in kept.items())

    # A time limit already passed: finished runs are still reused, no new run starts, and the report says so.
    lopt([*args, "--eval_samples", "5", "--seeds", "2", "--time_limit", "0.001"], builtin_tiny["env"])
    partial = json.loads((out / "results.json").read_text())
    assert partial["setup"]["runs"] == 8 and partial["setup"]["runs_finished"] == 4
    assert all(p["seeds"] == 1 for p in partial["points"])
    assert not (runs / "e2e-lr0.001-steps4-seed1").exists()
    report = (out / "report.md").read_text()
    assert "4 of 8 planned runs" in report and "Not every planned run has finished" in report

    # --report_only rebuilds the same report from the run records alone (no weights, no base model needed).
    for d in os.listdir(runs):
        (runs / d / "model.safetensors").unlink()
    lopt([*args, "--eval_samples", "5", "--report_only"], builtin_tiny["env"])
    rebuilt = json.loads((out / "results.json").read_text())
    assert rebuilt["points"] == rescored["points"] and rebuilt["before"] == rescored["before"]

    # A report of lopt alone still states its activations against e2e's, as compare_base.json measured them.
    only_lopt = [*args, "--eval_samples", "5", "--report_only"]
    only_lopt[only_lopt.index("e2e,lopt")] = "lopt"
    lopt(only_lopt, builtin_tiny["env"])
    alone = json.loads((out / "results.json").read_text())
    e2e_bytes = json.loads((out / "compare_base.json").read_text())["activation"]["e2e"]
    assert "e2e" not in alone["methods"] and alone["e2e_activation_peak_bytes"] == e2e_bytes
    ratio = alone["methods"]["lopt"]["activation_peak_bytes"] / e2e_bytes
    assert f"({ratio:.2f}x)" in (out / "report.md").read_text()

    # A run kept as its record alone (scripts/keep_evidence.sh) is reused by a compare that goes on, not retrained;
    # one whose record names another command is trained again.
    for d in os.listdir(runs):
        for f in os.listdir(runs / d):
            if f != "compare_run.json":
                (runs / d / f).unlink()
    other_record = json.loads((runs / other.name / "compare_run.json").read_text())
    other_record["command"] = [*other_record["command"], "--weight_decay", "0.1"]
    (runs / other.name / "compare_run.json").write_text(json.dumps(other_record))
    lopt([*args, "--eval_samples", "5"], builtin_tiny["env"])
    went_on = json.loads((out / "results.json").read_text())
    assert went_on["setup"]["runs_reused"] == 3
    assert sorted(d for d in os.listdir(runs) if (runs / d / "model.safetensors").exists()) == [other.name]


def test_report_only_needs_an_earlier_compare(tmp_path):
    spec = CompareSpec(methods=["e2e"], seeds=1, output_dir=str(tmp_path), report_only=True)
    with pytest.raises(UserError, match="compare_base.json"):
        run_compare(spec)


# --- synthetic results: the choices and the tables ---------------------------------------------------------------
def point(method, lr, steps, val_acc, test_acc, val_ppl, test_ppl, step_time=0.1):
    return {
        "method": method,
        "learning_rate": lr,
        "max_steps": steps,
        "seeds": 1,
        "validation_task_accuracy": val_acc,
        "task_accuracy": test_acc,
        "validation_retention_ppl": val_ppl,
        "retention_ppl": test_ppl,
        "validation_retention_ppl_before": 100.0,
        "retention_ppl_before": 100.0,
        "step_time_s": step_time,
        "compute_s": step_time * steps,
        "activation_peak_bytes": 1,
        "peak_memory_bytes": 1,
        "tokens_per_s": 1.0,
        "final_task_loss": 1.0,
        "curve": [[1, 1.0]],
    }


def results_of(points: list[dict], steps=(300,), seeds: int = 3) -> dict:
    methods = {}
    for p in points:
        methods.setdefault(p["method"], None)
    setup = {
        "model": "m",
        "num_layers": 8,
        "vocab_size": 10,
        "data": "d",
        "steps": list(steps),
        "seeds": seeds,
        "device": "cpu",
        "torch": "x",
        "transformers": "y",
        "retention_budgets": [0.25, 1.0, 4.0],
        "accuracy_targets": [0.5, 0.9],
    }
    results = {"setup": setup, "points": points}
    results["methods"] = {
        name: select_on_validation([p for p in points if p["method"] == name]) for name in methods
    }
    return results


def test_selection_reads_validation_never_test():
    # lr 1e-3 is best on test, lr 3e-4 on validation: the choice follows validation.
    a = point("e2e", 1e-3, 300, val_acc=0.60, test_acc=0.95, val_ppl=110, test_ppl=110)
    b = point("e2e", 3e-4, 300, val_acc=0.80, test_acc=0.70, val_ppl=110, test_ppl=110)
    assert select_on_validation([a, b]) is b
    # Budget rise <= 25%: c fits on the test side only, d on the validation side only; d is the one chosen.
    c = point("e2e", 1e-3, 300, val_acc=0.9, test_acc=0.9, val_ppl=140, test_ppl=120)
    d = point("e2e", 1e-4, 300, val_acc=0.5, test_acc=0.4, val_ppl=120, test_ppl=140)
    assert accuracy_at_retention([c, d], 0.25) is d
    assert accuracy_at_retention([c, d], 0.1) is None
    # Accuracy >= 80%: e reaches it on test only; among those reaching it on validation the smaller *validation*
    # rise wins even though its test rise is the larger one.
    e = point("e2e", 1e-3, 300, val_acc=0.7, test_acc=0.99, val_ppl=101, test_ppl=101)
    f = point("e2e", 3e-4, 300, val_acc=0.85, test_acc=0.5, val_ppl=150, test_ppl=300)
    g = point("e2e", 1e-4, 300, val_acc=0.81, test_acc=0.5, val_ppl=130, test_ppl=400)
    assert retention_at_accuracy([e, f, g], 0.8) is g
    assert retention_at_accuracy([e], 0.8) is None
    # Ties on validation accuracy go to the smaller validation rise.
    h = point("e2e", 3e-3, 300, val_acc=0.85, test_acc=0.5, val_ppl=105, test_ppl=900)
    assert select_on_validation([f, h]) is h


def test_pareto_front_keeps_undominated_points_by_rise():
    pts = [
        point("e2e", 1e-4, 300, 0, 0.30, 0, 110),  # rise 10%
        point("e2e", 3e-4, 300, 0, 0.20, 0, 150),  # dominated by the first
        point("e2e", 1e-3, 300, 0, 0.80, 0, 200),
        point("e2e", 3e-3, 300, 0, 0.80, 0, 900),  # same accuracy, more forgetting
        point("e2e", 1e-2, 300, 0, 0.95, 0, 1000),
    ]
    front = pareto_front(pts)
    assert [(p["task_accuracy"], p["retention_ppl"]) for p in front] == [(0.3, 110), (0.8, 200), (0.95, 1000)]


def test_steps_to_accuracy_takes_the_smallest_budget_on_validation():
    pts = [
        point("lopt", 1e-3, 900, val_acc=0.95, test_acc=0.9, val_ppl=1, test_ppl=1, step_time=0.2),
        point("lopt", 3e-3, 300, val_acc=0.55, test_acc=0.99, val_ppl=1, test_ppl=1, step_time=0.2),
        point("lopt", 1e-3, 300, val_acc=0.4, test_acc=0.99, val_ppl=1, test_ppl=1, step_time=0.2),
    ]
    assert steps_to_accuracy(pts, 0.5)["learning_rate"] == 3e-3
    hit = steps_to_accuracy(pts, 0.9)
    assert hit["max_steps"] == 900 and hit["compute_s"] == pytest.approx(180.0)
    assert steps_to_accuracy(pts, 0.99) is None


def test_targets_and_tables_state_met_and_missed_with_numbers():
    pts = [
        # e2e: gentle lr keeps retention, strong lr learns more.
        point("e2e", 1e-4, 300, val_acc=0.90, test_acc=0.90, val_ppl=115, test_ppl=118),
        point("e2e", 1e-3, 300, val_acc=0.97, test_acc=0.96, val_ppl=400, test_ppl=420),
        # LoPT: 5 points behind within rise <= 25%, level within <= 400%.
        point("lopt@0.3", 1e-4, 300, val_acc=0.86, test_acc=0.85, val_ppl=110, test_ppl=112),
        point("lopt@0.3", 1e-3, 300, val_acc=0.96, test_acc=0.955, val_ppl=300, test_ppl=310),
        point("lopt_k4", 1e-3, 300, val_acc=0.60, test_acc=0.60, val_ppl=450, test_ppl=460),
        point("freeze", 1e-3, 300, val_acc=0.50, test_acc=0.50, val_ppl=120, test_ppl=120),
    ]
    results = results_of(pts)
    lines = "\n".join(goals(results))
    assert "rise ≤ 25%, 300 steps: lopt@0.3 (lr 0.0001, 300 steps) 85.0%, rise +12% vs e2e" in lines
    assert "e2e (lr 0.0001, 300 steps) 90.0%, rise +18%: MISSED" in lines
    assert (
        "rise ≤ 400%, 300 steps: lopt@0.3 (lr 0.001, 300 steps) 95.5%, rise +210% vs e2e (lr 0.001" in lines
    )
    assert "96.0%, rise +320%: met" in lines
    # Matched accuracy >= 90%: LoPT needs lr 1e-3 (rise +210%), e2e reaches it at 1e-4 (+18%).
    assert "retention rise ≤ e2e's at val acc ≥ 90%: lopt@0.3 (lr 0.001, 300 steps)" in lines
    assert "(lr 0.0001, 300 steps) 90.0%, rise +18%: MISSED" in lines
    assert (
        "k=4 does not collapse (rise ≤ e2e's at the same lr and steps): lopt_k4 (lr 0.001, 300 steps)"
        in lines
    )
    assert "60.0%, rise +360% vs e2e (lr 0.001, 300 steps) 96.0%, rise +320%: MISSED" in lines
    assert "k=4 beats freeze on accuracy: lopt_k4 60.0% vs freeze 50.0% (lr 0.001, 300 steps): met" in lines
    report = format_report(results)
    e2e_low = "90.0% (lr 0.0001, 300 steps; rise +18%)"
    assert f"| e2e | {e2e_low} | {e2e_low} | 96.0% (lr 0.001, 300 steps; rise +320%) |" in report
    assert "| freeze | 50.0% (lr 0.001, 300 steps; rise +20%) |" in report
    assert "| lopt_k4 | — | — |" in report  # no point within rise <= 25% or <= 100%


def test_spec_refuses_what_would_make_a_sweep_dishonest():
    with pytest.raises(UserError, match="--max_steps"):
        CompareSpec(methods=["e2e"], sft_args=["--max_steps", "5"])
    with pytest.raises(UserError, match="--learning_rate"):
        CompareSpec(methods=["e2e"], learning_rates=[1e-4], sft_args=["--learning_rate=3e-4"])
    with pytest.raises(UserError, match="lroa"):
        CompareSpec(methods=["e2e", "lora"], method_learning_rates={"lroa": [1e-3]})
    with pytest.raises(UserError, match="--validation_file"):
        CompareSpec(
            methods=["e2e"],
            learning_rates=[1e-4, 3e-4],
            model_name_or_path="m",
            train_file="t.jsonl",
            eval_file="e.jsonl",
        )
    for name in ("e2e+b2", "lopt_k4+b2", "lopt+bx", "lopt+b0"):
        with pytest.raises(UserError, match=r"'\+bN' takes a layer"):
            CompareSpec(methods=[name])
    spec = CompareSpec(
        methods=["e2e", "lora", "lopt@0.3"],
        learning_rates=[1e-4, 3e-4],
        method_learning_rates={"lora": [1e-3, 3e-3, 1e-2]},
        max_steps=[900, 300],
    )
    assert spec.points_of("lora") == [(lr, s) for lr in (1e-3, 3e-3, 1e-2) for s in (300, 900)]
    assert spec.points_of("lopt@0.3") == [(lr, s) for lr in (1e-4, 3e-4) for s in (300, 900)]


def test_cli_parses_grids_and_refuses_bad_ones():
    from lopt.cli.compare import _method_grids, _numbers

    assert _method_grids(["lora=1e-3,3e-3", "e2e=1e-4"]) == {"lora": [1e-3, 3e-3], "e2e": [1e-4]}
    with pytest.raises(ValueError, match="NAME=LR"):
        _method_grids(["lora:1e-3"])
    with pytest.raises(ValueError, match="--max_steps 'abc'"):
        _numbers("--max_steps", "abc", int)


def test_sft_task_flag_picks_a_builtin_task_and_refuses_unknown_ones():
    from trl import ModelConfig

    from lopt.builtin.tasks import BUILTIN_TASKS, builtin_task_rows
    from lopt.training.arguments import DataArguments
    from lopt.training.checks import check_data
    from lopt.training.task_rows import sft_rows

    data = DataArguments(task="modules", max_samples=5)
    task = check_data("sft", ModelConfig(), data, tuple(BUILTIN_TASKS))
    assert task == "modules"
    assert sft_rows(data, task, False) == builtin_task_rows("train", n=5, task="modules")
    with pytest.raises(UserError, match="--task 'nope' is not one of"):
        check_data("sft", ModelConfig(), DataArguments(task="nope"), tuple(BUILTIN_TASKS))


def test_a_run_that_logged_nothing_is_a_clear_error(tmp_path):
    from lopt.experiments.compare.runs import _training_metrics

    with pytest.raises(UserError, match="--logging_steps"):
        _training_metrics(str(tmp_path))
