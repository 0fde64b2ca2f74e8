"""`lopt grpo` and `lopt dpo` end to end, in subprocesses, on the built-in model's tiny preset.

The subprocesses are started together when the module's first test needs them (they are independent), so the file
takes about as long as its slowest run rather than their sum. Most bad-input cases go through the same entry point
(`lopt.cli.main.main`) in-process; one per command runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_cli_sft import assert_hf_checkpoint, read_metrics

GRPO_FAST = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2"]
GRPO_FAST += ["--max_completion_length", "6", "--max_samples", "16", "--eval_samples", "4"]
GRPO_FAST += ["--logging_steps", "1", "--no_progress"]
DPO_FAST = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_samples", "8"]
DPO_FAST += ["--eval_samples", "4"]
DPO_FAST += ["--logging_steps", "1", "--no_progress"]

GRPO_ROWS = [
    {"prompt": "What is 2 plus 3?", "answer": "5"},
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"problem": "Compute 10 - 4.", "solution": "10 - 4 = $\\boxed{6}$."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"}],
        "answer": 2,
    },
]
DPO_ROWS = [
    {"prompt": "What is 2 plus 3?", "chosen": "5", "rejected": "6"},
    {
        "prompt": [{"role": "user", "content": "1 + 1?"}],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": "3"}],
    },
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "system": "One word."},
]


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lopt", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=600)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{proc.args[3:]} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return result


def lopt(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return finish(start(args, env), check=check)


@pytest.fixture(scope="module")
def runs(builtin_tiny, tmp_path_factory):
    """Start every independent training run at once; tests wait for the one they check."""
    root = tmp_path_factory.mktemp("rl-runs")
    grpo_file, dpo_file = root / "grpo.jsonl", root / "dpo.jsonl"
    grpo_file.write_text("".join(json.dumps(r) + "\n" for r in GRPO_ROWS * 2))
    dpo_file.write_text("".join(json.dumps(r) + "\n" for r in DPO_ROWS * 2))
    user_model = ["--model_name_or_path", builtin_tiny["path"]]
    e2e, beta = ["--method", "e2e"], ["--beta", "0.1"]
    specs = {  # embedded default with LoPT; the user's JSONL with --method e2e
        "grpo": ["grpo", *GRPO_FAST, "--save_steps", "1", "--plot"],
        "grpo_file_e2e": ["grpo", *GRPO_FAST, *user_model, "--train_file", str(grpo_file), *e2e, *beta],
        "dpo": ["dpo", *DPO_FAST, "--aux_objective", "recon+anchor"],
        "dpo_file_e2e": ["dpo", *DPO_FAST, *user_model, "--train_file", str(dpo_file), *e2e],
    }
    # the default recipe, on 8 prompts and 60 steps so it fits CI
    specs["grpo_learns"] = [
        "grpo",
        "--max_samples",
        "8",
        "--max_steps",
        "60",
        "--eval_samples",
        "0",
        "--no_progress",
    ]
    specs["help_grpo"], specs["help_dpo"] = ["grpo", "--help"], ["dpo", "--help"]
    specs["offline"] = ["grpo", "--task", "gsm8k"]  # HF_HUB_OFFLINE=1 in the env: the hub load fails at once
    jobs = {}
    for name, args in specs.items():
        out = root / name
        jobs[name] = (start([*args, "--output_dir", str(out)], builtin_tiny["env"]), out)
    yield {name: _Lazy(proc, out) for name, (proc, out) in jobs.items()}
    for proc, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


class _Lazy:
    def __init__(self, proc, out):
        self.proc, self.out, self._result = proc, out, None

    def result(self, check: bool = True) -> subprocess.CompletedProcess:
        if self._result is None:
            self._result = finish(self.proc, check=check)
        return self._result


def changed_keys(base_dir, out) -> set[str]:
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    trained = load_file(os.path.join(out, "model.safetensors"))
    return {k for k in base if not torch.equal(base[k], trained[k])}


def assert_lopt_metrics(metrics: list[dict]) -> None:
    assert [m["step"] for m in metrics] == [1, 2]
    for key in (
        "loss",
        "task_loss",
        "aux_loss_0",
        "lr_late",
        "lr_early",
        "tokens_per_s",
        "peak_memory_bytes",
    ):
        assert key in metrics[0], key
    assert metrics[0]["aux_loss_0"] > 0


# --- grpo --------------------------------------------------------------------------------------------------------
def test_grpo_default_run(runs, builtin_tiny):
    run = runs["grpo"]
    proc = run.result()
    first_line = proc.stderr.splitlines()[0]
    assert first_line.startswith(
        "lopt grpo: no --model_name_or_path: starting from the built-in SFT checkpoint"
    )
    assert "task=successor, reward=exact_match_reward" in proc.stderr
    assert_hf_checkpoint(run.out)
    metrics = read_metrics(run.out)
    assert_lopt_metrics(metrics)
    assert all(0.0 <= m["reward"] <= 1.0 for m in metrics)
    assert metrics[0]["tokens_per_s"] > 0
    assert metrics[0]["lr_early"] == pytest.approx(
        metrics[0]["lr_late"] / 20
    )  # the built-in recipe's --lr_k1
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["method"] == "lopt" and summary["steps"] == 2 and summary["task"] == "successor"
    assert summary["start_model"].endswith("-sft-successor")
    assert 0.0 <= summary["heldout_exact_match"] <= 1.0 and "reward_last_log" in summary
    assert (run.out / "reward_curve.png").stat().st_size > 1000
    assert (run.out / "checkpoint-1" / "lopt_aux_heads.safetensors").is_file()
    assert_trained(summary["start_model"], run.out, metrics, early=True)


def test_grpo_from_a_checkpoint_takes_its_recorded_task(runs, builtin_tiny, tmp_path, capsys):
    """`lopt grpo --model_name_or_path <a checkpoint lopt sft wrote>` without --task trains on the task the checkpoint's
    lopt_args.json records (here the built-in SFT checkpoint of successor: the built-in model, so --task successor is
    accepted too); a checkpoint trained on the user's rows names no task: one line saying so and what to give."""
    from lopt.cli.main import main

    start = json.loads((runs["grpo"].out / "summary.json").read_text())["start_model"]  # made by that run
    out = tmp_path / "from-checkpoint"
    proc = lopt(
        ["grpo", *GRPO_FAST, "--model_name_or_path", start, "--output_dir", str(out)], builtin_tiny["env"]
    )
    assert "task=successor, reward=exact_match_reward" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "successor" and summary["start_model"] == start
    assert 0.0 <= summary["heldout_exact_match"] <= 1.0 and "knowledge_kept" not in summary  # not a real base
    assert read_metrics(out)[0]["lr_early"] == pytest.approx(read_metrics(out)[0]["lr_late"] / 20)

    from lopt.training.arguments import DataArguments
    from lopt.training.checks import check_data
    from lopt.training.rl import recorded_task

    model = type("M", (), {"model_name_or_path": start})
    assert (
        check_data("grpo", model, DataArguments(task="successor"), ("successor",), recorded_task(start))
        == "successor"
    )

    custom = runs["grpo_file_e2e"]
    custom.result()
    args = ["grpo", "--model_name_or_path", str(custom.out), "--output_dir", str(tmp_path / "no")]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lopt grpo: error:")]
    assert len(errors) == 1, errors
    assert f"cannot tell the task of --model_name_or_path {custom.out}" in errors[0]
    assert "grpo.jsonl, not a built-in task" in errors[0] and "give --task (" in errors[0]
    assert not (tmp_path / "no").exists()


def test_default_grpo_recipe_reward_rises(runs):
    """`lopt grpo` without a model starts from the built-in SFT checkpoint, where the task reward is not always 0, and
    the default recipe (LoPT, lr 2e-4, lr_k1 = lr/20, 32 completions, 8 per prompt) raises it. Measured on the tiny
    preset (2 CPU cores): mean reward 0.031 at step 10 -> 0.128 at step 60 (150 steps: 0.022 -> 0.18)."""
    run = runs["grpo_learns"]
    run.result()
    rewards = [m["reward"] for m in read_metrics(run.out)]
    assert len(rewards) == 6  # logged every 10 steps
    assert rewards[-1] > rewards[0] + 0.05 and rewards[-1] > 2 * rewards[0], rewards


def assert_trained(base_dir, out, metrics, early: bool) -> None:
    """Early blocks change with LoPT (aux loss) or E2E when there is a task gradient; the late ones change when
    the task gradient is not zero (for GRPO: some prompt's completions got different rewards)."""
    changed = changed_keys(base_dir, out)
    if early:
        assert "model.embed_tokens.weight" in changed and any(
            k.startswith("model.layers.0.") for k in changed
        )
    if any(m.get("reward_std", 1.0) > 0 for m in metrics):
        assert "lm_head.weight" in changed


def test_grpo_user_file_with_every_row_format_and_e2e(runs, builtin_tiny):
    run = runs["grpo_file_e2e"]
    proc = run.result()
    assert "method=e2e, model=" in proc.stderr and "task=custom, reward=math_reward, rows=8" in proc.stderr
    assert_hf_checkpoint(run.out)
    metrics = read_metrics(run.out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert "aux_loss_0" not in metrics[0] and "kl" in metrics[0]  # beta > 0: a reference model was used
    assert not (run.out / "lopt_config.json").exists()
    assert "heldout_exact_match" not in json.loads((run.out / "summary.json").read_text())
    assert_trained(builtin_tiny["path"], run.out, metrics, early=False)


# --- dpo ---------------------------------------------------------------------------------------------------------
def test_dpo_default_run(runs, builtin_tiny):
    run = runs["dpo"]
    run.result()
    assert_hf_checkpoint(run.out)
    metrics = read_metrics(run.out)
    assert_lopt_metrics(metrics)
    assert "rewards/margins" in metrics[-1]
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["method"] == "lopt" and summary["steps"] == 2
    assert summary["start_model"].endswith("-sft-successor")  # the built-in SFT checkpoint, not the raw base
    assert 0.0 <= summary["heldout_exact_match"] <= 1.0
    assert_trained(summary["start_model"], run.out, metrics, early=True)
    # the anchor's reference forward runs inside TRL's policy forward (the reference model's is no-grad)
    assert json.loads((run.out / "lopt_config.json").read_text())["aux_objective"] == "recon+anchor"


def test_dpo_user_file_with_strings_and_chat_messages_and_e2e(runs, builtin_tiny):
    run = runs["dpo_file_e2e"]
    proc = run.result()
    assert "method=e2e, model=" in proc.stderr and "pairs=6" in proc.stderr
    assert_hf_checkpoint(run.out)
    metrics = read_metrics(run.out)
    assert [m["step"] for m in metrics] == [1, 2] and "aux_loss_0" not in metrics[0]
    assert_trained(builtin_tiny["path"], run.out, metrics, early=True)


# --- errors and help -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, rows, extra, expected, in_subprocess",
    [
        ("grpo", [{"text": "no answer"}], [], "prompt/answer", True),
        ("grpo", [{"prompt": "2+2?", "answer": ""}], [], "reference answer) is empty", False),
        (
            "grpo",
            [{"prompt": [{"role": "assistant", "content": "4"}], "answer": "4"}],
            [],
            "assistant",
            False,
        ),
        ("grpo", [{"prompt": "2+2?", "answer": "4"}], ["--num_generations", "1"], "at least 2", False),
        ("dpo", [{"prompt": "2+2?", "chosen": "4"}], [], "missing field(s) rejected", True),
        ("dpo", [{"prompt": "2+2?", "chosen": [{"role": "user"}], "rejected": "5"}], [], "chosen[0]", False),
        ("dpo", [{"prompt": "2+2?", "chosen": "4", "rejected": " "}], [], "'rejected' is empty", False),
    ],
)
def test_bad_data_is_one_line_and_exit_code_2(
    builtin_tiny, tmp_path, capsys, command, rows, extra, expected, in_subprocess
):
    """One case per command end to end in a subprocess; the others through the same entry point in-process."""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [command, "--train_file", str(data), "--model_name_or_path", builtin_tiny["path"], *extra]
    args += ["--output_dir", str(tmp_path / "out")]
    if in_subprocess:
        proc = lopt(args, builtin_tiny["env"], check=False)
        returncode, stderr = proc.returncode, proc.stderr
    else:
        from lopt.cli.main import main

        returncode, stderr = main(args), capsys.readouterr().err
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith(f"lopt {command}: error:")]
    assert len(errors) == 1 and expected in errors[0], stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["grpo", "dpo"])
def test_builtin_task_is_for_the_builtin_model_only(builtin_tiny, tmp_path, capsys, command):
    from lopt.cli.main import main

    args = [command, "--model_name_or_path", builtin_tiny["path"], "--output_dir", str(tmp_path / "out")]
    assert main(args) == 2
    assert "give --train_file or --dataset_name" in capsys.readouterr().err
    assert main([command, "--task", "successor", "--train_file", "x.jsonl"]) == 2
    assert "drop --train_file" in capsys.readouterr().err


def test_hub_task_offline_is_one_line(runs):
    proc = runs["offline"].result(check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lopt grpo: error: could not load dataset 'openai/gsm8k' (config 'main'" in proc.stderr


@pytest.mark.parametrize("command", ["grpo", "dpo"])
def test_help(runs, command):
    proc = runs[f"help_{command}"].result()
    for flag in (
        "--method",
        "--num_blocks",
        "--lambda_aux",
        "--lr_k1",
        "--train_file",
        "--beta",
        "--loss_type",
    ):
        assert flag in proc.stdout, flag
    if command == "grpo":
        for flag in (
            "--task",
            "--num_generations",
            "--max_prompt_length",
            "--max_completion_length",
            "--temperature",
        ):
            assert flag in proc.stdout, flag
        for flag in ("--top_p", "--num_iterations", "--steps_per_generation", "--plot"):
            assert flag in proc.stdout, flag
