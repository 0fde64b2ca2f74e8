"""`lopt eval` and `lopt compare` on the built-in tiny preset (the CI-sized quick path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lopt.experiments.compare.report import format_report, summarize


def lopt(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lopt", *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_eval_scores_task_and_retention(builtin_tiny, tmp_path):
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--model_name_or_path",
        builtin_tiny["path"],
        "--max_samples",
        "8",
        "--output_file",
        str(out),
    ]
    proc = lopt([*args, "--no_progress"], builtin_tiny["env"])
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert result["task_n"] == 8 and 0.0 <= result["task_accuracy"] <= 1.0
    assert 1.0 < result["retention_ppl"] < 2048 / 5  # far below a uniform guess over the vocabulary


def test_compare_quick_writes_results_report_and_plots(builtin_tiny, tmp_path):
    out = tmp_path / "compare"
    args = [
        "compare",
        "--quick",
        "--methods",
        "e2e,lopt,lopt_joint,lopt_recon_anchor,lopt+b1,freeze+b3",
        "--lr_k1_ratios",
        "1,0.5",
        "--max_steps",
        "3",
        "--eval_samples",
        "8",
    ]
    args += ["--sft_args", "--per_device_train_batch_size 4 --logging_steps 1 --max_samples 32"]
    lopt([*args, "--output_dir", str(out), "--no_progress"], builtin_tiny["env"])
    results = json.loads((out / "results.json").read_text())
    for key in ("model", "vocab_size", "num_layers", "steps", "seeds", "device", "torch", "transformers"):
        assert key in results["setup"], key
    assert set(results["methods"]) == {
        *("e2e", "lopt", "lopt@0.5", "lopt_joint", "lopt_recon_anchor", "lopt+b1", "freeze+b3")
    }
    runs = out / "runs"
    lopt_args = json.loads((runs / "lopt@0.5-lr0.001-steps3-seed0" / "lopt_args.json").read_text())
    assert lopt_args["learning_rate"] == 1e-3  # `lopt sft`'s built-in default: no --learning_rates given
    assert lopt_args["lr_k1"] == 0.5 * lopt_args["learning_rate"]
    paper_args = json.loads((runs / "lopt-lr0.001-steps3-seed0" / "lopt_args.json").read_text())
    assert paper_args["lr_k1"] == paper_args["learning_rate"]  # plain names are the paper's recipe
    anchor_config = json.loads(
        (runs / "lopt_recon_anchor-lr0.001-steps3-seed0" / "lopt_config.json").read_text()
    )
    assert anchor_config["aux_objective"] == "recon+anchor"
    anchor_args = json.loads((runs / "lopt_recon_anchor-lr0.001-steps3-seed0" / "lopt_args.json").read_text())
    assert anchor_args["clip_per_block"] is True and paper_args["clip_per_block"] is False
    assert json.loads((runs / "lopt+b1-lr0.001-steps3-seed0" / "lopt_config.json").read_text())[
        "boundaries"
    ] == [1]
    assert (
        json.loads((runs / "freeze+b3-lr0.001-steps3-seed0" / "lopt_args.json").read_text())["boundaries"]
        == "3"
    )
    for name, entry in results["methods"].items():
        for key in (
            "activation_peak_bytes",
            "peak_memory_bytes",
            "step_time_s",
            "tokens_per_s",
            "task_accuracy",
        ):
            assert entry[key] is not None and entry[key] >= 0, (name, key)
        assert entry["retention_ppl"] > 1 and entry["retention_ppl_before"] > 1
        assert [step for step, _ in entry["curve"]] == [1, 2, 3]
    methods = results["methods"]
    # Real properties of the engine, not timing: local LoPT keeps fewer activations than E2E; joint does not.
    assert methods["lopt"]["activation_peak_bytes"] < methods["e2e"]["activation_peak_bytes"]
    assert methods["lopt_joint"]["activation_peak_bytes"] >= methods["e2e"]["activation_peak_bytes"] * 0.9
    # A boundary at layer 1 of 4 leaves three layers to the last block: more to keep than the midpoint's two.
    assert methods["lopt+b1"]["activation_peak_bytes"] > methods["lopt"]["activation_peak_bytes"]
    assert methods["freeze+b3"]["activation_peak_bytes"] < methods["e2e"]["activation_peak_bytes"]
    report = (out / "report.md").read_text()
    assert "| lopt |" in report and "What the numbers show" in report
    for png in ("loss_curves.png", "memory_time.png", "accuracy_retention.png", "fronts.png"):
        assert (out / png).stat().st_size > 1000, png


def test_compare_extends_a_grid_chosen_at_its_edge(builtin_tiny, tmp_path):
    """A two-rate grid's choice is always at one of its edges: compare runs one more rate past that edge (3x), chooses
    again on validation, and says whether the choice is still at an edge; --report_only derives the same grid from
    the records, whatever grid it is given."""
    from lopt.experiments.compare.grid import GRID_FACTOR, grid_edge

    out = tmp_path / "compare"
    args = [
        "compare",
        "--quick",
        "--methods",
        "e2e",
        "--method_learning_rates",
        "e2e=1e-3,3e-3",
        "--extend_grid",
        "1",
    ]
    args += ["--max_steps", "3", "--eval_samples", "8", "--output_dir", str(out), "--no_progress"]
    args += [
        "--lm_eval_tasks",
        "none",
        "--sft_args",
        "--per_device_train_batch_size 4 --logging_steps 1 --max_samples 32",
    ]
    lopt(args, builtin_tiny["env"])
    results = json.loads((out / "results.json").read_text())
    chosen = results["methods"]["e2e"]
    assert len(chosen["grid_added"]) == 1 and len(chosen["grid"]) == 3
    added = chosen["grid_added"][0]
    assert added == pytest.approx(1e-3 / GRID_FACTOR, rel=1e-2) or added == pytest.approx(3e-3 * GRID_FACTOR)
    assert (out / "runs" / f"e2e-lr{added:g}-steps3-seed0" / "compare_run.json").is_file()
    assert {p["learning_rate"] for p in results["points"]} == set(chosen["grid"])
    assert chosen["grid_edge"] == grid_edge(chosen["grid"], chosen["learning_rate"])
    report = (out / "report.md").read_text()
    assert f"(added past an edge: {added:g})" in report
    assert ("edge of its grid" in report) == (chosen["grid_edge"] is not None)

    lopt([*args, "--report_only"], builtin_tiny["env"])
    rebuilt = json.loads((out / "results.json").read_text())["methods"]["e2e"]
    assert rebuilt["grid"] == chosen["grid"] and rebuilt["learning_rate"] == chosen["learning_rate"]

    # A planned rate with no finished run is not part of the grid the choice is judged on: the report names it.
    planned = ",".join(f"{lr:g}" for lr in [*chosen["grid"], 0.1])
    partial = [a if a != "e2e=1e-3,3e-3" else f"e2e={planned}" for a in args]
    lopt([*partial, "--extend_grid", "0", "--report_only"], builtin_tiny["env"])
    rebuilt = json.loads((out / "results.json").read_text())["methods"]["e2e"]
    assert rebuilt["grid"] == chosen["grid"] and rebuilt["grid_not_run"] == [0.1]
    assert "(planned, not run: 0.1)" in (out / "report.md").read_text()

    # Rates that ran but were not planned (an extension run by hand, or by an earlier compare) join the grid.
    narrow = [a if a != "e2e=1e-3,3e-3" else "e2e=1e-3" for a in args]
    lopt([*narrow, "--extend_grid", "0", "--report_only"], builtin_tiny["env"])
    rebuilt = json.loads((out / "results.json").read_text())["methods"]["e2e"]
    assert rebuilt["grid"] == chosen["grid"] and rebuilt["learning_rate"] == chosen["learning_rate"]
    assert rebuilt["grid_not_run"] == [] and rebuilt["grid_added"] == []


def test_report_states_missed_targets_plainly():
    def entry(act, time, acc, ppl):
        curve = [[1, 1.0]]
        return {
            "activation_peak_bytes": act,
            "step_time_s": time,
            "task_accuracy": acc,
            "retention_ppl": ppl,
            "retention_ppl_before": 50.0,
            "curve": curve,
            "peak_memory_bytes": 1,
            "tokens_per_s": 1.0,
            "final_task_loss": 1.0,
        }

    results = {
        "setup": {
            "model": "m",
            "num_layers": 8,
            "vocab_size": 10,
            "data": "d",
            "steps": 1,
            "seeds": 1,
            "device": "cpu",
            "torch": "x",
            "transformers": "y",
        },
        "methods": {
            "e2e": entry(100, 1.0, 0.8, 60.0),
            "lopt": entry(70, 1.2, 0.5, 70.0),
            "freeze": entry(60, 0.6, 0.6, 55.0),
        },
    }
    lines = "\n".join(summarize(results))
    assert "0.70x e2e (target ≤ 0.56): MISSED" in lines
    assert "step time is 1.20x e2e" in lines and "-30.0 points" in lines
    assert "freeze 60.0%, target above: MISSED" in lines and "Fewer than 3 seeds" in lines
    assert "retention rise +20.0 vs e2e +10.0 (target ≤ half: MISSED)" in lines
    assert "| lopt | — | — | — | 0.0 (0.70x)" in format_report(results)


def test_eval_scores_the_task_a_checkpoint_was_trained_on(builtin_tiny, tmp_path):
    """A user's second run: `lopt sft` on a real base (a tiny stand-in: the built-in tiny model marked as a converted
    real base), then `lopt eval` on the checkpoint with no data flags scores extract, the task the checkpoint's own
    records name, and says so; a folder without records is scored on no task, and says so. The checkpoint's files
    get the user's usual permissions."""
    import shutil

    from lopt.builtin.base import METADATA_FILE as BUILTIN_METADATA
    from lopt.builtin.hub_bases import METADATA_FILE as REAL_BASE_METADATA

    plain = tmp_path / "plain"  # a Hugging Face folder that lopt did not write
    shutil.copytree(builtin_tiny["path"], plain)
    (plain / BUILTIN_METADATA).unlink()
    standin = tmp_path / "standin"
    shutil.copytree(plain, standin)
    (standin / REAL_BASE_METADATA).write_text("{}")

    out = tmp_path / "sft"
    fast = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_samples", "16", "--no_progress"]
    args = ["sft", "--model_name_or_path", str(standin), "--max_length", "192", "--eval_samples", "2", *fast]
    proc = lopt([*args, "--output_dir", str(out)], builtin_tiny["env"])
    assert "task=extract" in proc.stderr
    assert "knowledge_kept" in json.loads(
        (out / "summary.json").read_text()
    )  # a real base's run says what it kept

    proc = lopt(
        ["eval", "--model_name_or_path", str(out), "--max_samples", "4", "--no_progress"], builtin_tiny["env"]
    )
    result = json.loads(proc.stdout)
    assert (
        f"lopt eval: scoring task extract: lopt_args.json: trained from {standin}, task extract"
        in proc.stderr
    )
    assert result["task"] == "extract" and result["task_n"] == 4
    assert all(example["answer"].startswith("{") for example in result["examples"])  # extract's JSON records
    # --task names another built-in task: its test split, said so
    proc = lopt(["eval", "--model_name_or_path", str(out), "--task", "totals", "--max_samples", "2", "--no_progress"],
                builtin_tiny["env"])  # fmt: skip
    result = json.loads(proc.stdout)
    assert "lopt eval: scoring task totals: --task" in proc.stderr
    assert result["task"] == "totals" and all('"items"' in e["answer"] for e in result["examples"])

    proc = lopt(["eval", "--model_name_or_path", str(plain), "--no_progress"], builtin_tiny["env"])
    result = json.loads(proc.stdout)
    assert "lopt eval: no task accuracy (give --train_file to score held-out rows)" in proc.stderr
    assert result["task"] is None and result["task_accuracy"] is None and result["retention_ppl"] > 1

    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json", "lopt_args.json", "summary.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
