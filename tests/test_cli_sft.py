"""`lopt sft` end to end, in subprocesses, on the built-in model's tiny preset (built once per session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

FAST = [
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--max_samples",
    "32",
    "--eval_samples",
    "8",
]
FAST += ["--logging_steps", "1", "--no_progress"]


def lopt(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lopt", *args], env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lopt {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_hf_checkpoint(output_dir) -> None:
    weights = load_file(os.path.join(output_dir, "model.safetensors"))
    assert not any("aux" in key for key in weights), "aux heads leaked into the saved model"
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.chat_template and tokenizer.eos_token
    assert model.config.num_hidden_layers >= 2
    assert os.path.isfile(os.path.join(output_dir, "training_args.json"))


def test_default_run_trains_lopt_and_writes_a_standard_checkpoint(builtin_tiny, tmp_path):
    out = tmp_path / "run"
    lopt(["sft", *FAST, "--output_dir", str(out)], builtin_tiny["env"])
    assert_hf_checkpoint(out)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
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
    assert metrics[0]["tokens_per_s"] > 0
    assert metrics[0]["lr_early"] == pytest.approx(0.3 * metrics[0]["lr_late"])  # the evidence-based default
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lopt" and summary["steps"] == 3
    assert 0.0 <= summary["heldout_exact_match"] <= 1.0
    assert json.loads((out / "lopt_config.json").read_text())["num_blocks"] == 2
    # The trained model differs from the base model in both halves (LoPT trains every block).
    base = load_file(os.path.join(builtin_tiny["path"], "model.safetensors"))
    trained = load_file(out / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert any(k.startswith("model.layers.0.") for k in changed)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("ll", ["--num_blocks", "4", "--lr_k1", "1e-4"]),
        ("lopt_joint", []),
        ("e2e", []),
        ("freeze", []),
        ("freeze", ["--boundaries", "1"]),
        ("lora", ["--lora_r", "4"]),
    ],
)
def test_each_method(builtin_tiny, tmp_path, method, extra):
    out = tmp_path / f"{method}{len(extra)}"
    lopt(["sft", *FAST, "--method", method, *extra, "--output_dir", str(out)], builtin_tiny["env"])
    assert_hf_checkpoint(out)
    metrics = read_metrics(out)
    base = load_file(os.path.join(builtin_tiny["path"], "model.safetensors"))
    trained = load_file(out / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    if method == "ll":  # k=4: three boundaries, each logged; early group at --lr_k1
        assert {"aux_loss_0", "aux_loss_1", "aux_loss_2"} <= set(metrics[0])
        # The scheduler scales both groups alike: the early group stays at lr_k1/learning_rate = 0.1 of the late.
        assert metrics[0]["lr_early"] == pytest.approx(0.1 * metrics[0]["lr_late"])
    if method == "freeze":
        assert "model.embed_tokens.weight" not in changed and "lm_head.weight" in changed
        assert not any(k.startswith("model.layers.0.") for k in changed)
        # the first layer trained: the midpoint (2 of 4 layers), or the one --boundaries names
        assert any(k.startswith("model.layers.1.") for k in changed) == (extra == ["--boundaries", "1"])
        assert any(k.startswith("model.layers.2.") for k in changed)
    if method == "lora":
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert any(k.startswith("model.layers.0.") for k in changed)  # merged adapters changed the weights
        assert "model.embed_tokens.weight" not in changed
    if method in ("e2e", "lopt_joint"):
        assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed


def test_user_file_with_every_row_format_and_yaml_config(builtin_tiny, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]},
        {"prompt": "Say hi", "completion": "hi"},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"query": "Capital of France?", "response": "Paris"},
        {"question": "3 + 4?", "answer": "7"},
        {"problem": "5 + 5?", "solution": "10"},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows * 3) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text("method: e2e\nmax_steps: 50\nlearning_rate: 0.0005\n")
    out = tmp_path / "user"
    args = [
        "sft",
        "--config",
        str(config),
        "--model_name_or_path",
        builtin_tiny["path"],
        "--train_file",
        str(data),
    ]
    args += [*FAST, "--output_dir", str(out)]  # the flag --max_steps 3 overrides the YAML's 50
    lopt(args, builtin_tiny["env"])
    assert_hf_checkpoint(out)
    lopt_args = json.loads((out / "lopt_args.json").read_text())
    assert (
        lopt_args["method"] == "e2e" and lopt_args["max_steps"] == 3 and lopt_args["learning_rate"] == 0.0005
    )


@pytest.mark.parametrize("objective", ["recon", "recon+anchor"])
def test_resume_continues_exactly_where_the_checkpoint_left_off(builtin_tiny, tmp_path, objective):
    """Run A trains 4 steps with checkpoints; run B resumes from A's checkpoint-2 (optimizer, scheduler, aux heads,
    RNG, and for the anchor the *pretrained* reference, not the checkpoint's weights). Both must end with the same
    weights."""
    steps = ["--max_steps", "4", "--save_steps", "2", "--aux_objective", objective, "--anchor_weight", "1000"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    lopt(["sft", *FAST, *steps, "--output_dir", str(run_a)], builtin_tiny["env"])
    checkpoint = run_a / "checkpoint-2"
    assert (checkpoint / "lopt_aux_heads.safetensors").is_file()
    assert (checkpoint / "optimizer.pt").is_file()
    assert not (run_a / ".lopt-staging").exists(), "staging folder left behind"
    resume = ["--resume_from_checkpoint", str(checkpoint)]
    lopt(["sft", *FAST, *steps, *resume, "--output_dir", str(run_b)], builtin_tiny["env"])
    assert [m["step"] for m in read_metrics(run_b)] == [3, 4]
    weights_a = load_file(run_a / "model.safetensors")
    weights_b = load_file(run_b / "model.safetensors")
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_from_a_non_lopt_checkpoint_is_refused(builtin_tiny, tmp_path):
    run_e2e = tmp_path / "e2e"
    lopt(
        ["sft", *FAST, "--method", "e2e", "--save_steps", "2", "--output_dir", str(run_e2e)],
        builtin_tiny["env"],
    )
    resume = ["--resume_from_checkpoint", str(run_e2e / "checkpoint-2")]
    proc = lopt(
        ["sft", *FAST, *resume, "--output_dir", str(tmp_path / "x")], builtin_tiny["env"], check=False
    )
    assert proc.returncode == 2 and "lopt_aux_heads" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "setup, args, expected",
    [
        (None, ["--train_file", "{tmp}/missing.jsonl"], "missing.jsonl"),
        ("bad_json", ["--train_file", "{tmp}/bad.jsonl"], "line 2"),
        ("unknown_fields", ["--train_file", "{tmp}/unknown.jsonl"], "instruction"),
        ("empty", ["--train_file", "{tmp}/empty.jsonl"], "no rows"),
        (None, ["--num_blocks", "1"], "--num_blocks"),
        (None, ["--model_name_or_path", "./no-such-model"], "'./no-such-model' does not exist"),
        (None, ["--num_blocks", "99"], "num_blocks=99"),
        (
            None,
            ["--model_name_or_path", "./no/such/model", "--train_file", "{tmp}/ok.jsonl"],
            "does not exist",
        ),
        ("long_prompt", ["--train_file", "{tmp}/long.jsonl", "--max_seq_length", "8"], "max_seq_length"),
        ("yaml_unknown", ["--config", "{tmp}/bad.yaml"], "unknown keys"),
        (None, ["--method", "e2e", "--aux_objective", "anchor"], "--aux_objective only applies"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(builtin_tiny, tmp_path, setup, args, expected):
    files = {
        "bad_json": ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n'),
        "unknown_fields": ("unknown.jsonl", '{"text": "hello"}\n'),
        "empty": ("empty.jsonl", ""),
        "long_prompt": ("long.jsonl", json.dumps({"prompt": "word " * 50, "completion": "x"}) + "\n"),
        "yaml_unknown": ("bad.yaml", "lerning_rate: 0.1\n"),
    }
    (tmp_path / "ok.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    if setup:
        name, text = files[setup]
        (tmp_path / name).write_text(text)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model_name_or_path" not in args and "--train_file" in args:  # (the model path is checked first)
        args += ["--model_name_or_path", builtin_tiny["path"]]
    proc = lopt(
        ["sft", *FAST, "--output_dir", str(tmp_path / "out"), *args], builtin_tiny["env"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("lopt sft: error:")]
    assert len(error_lines) == 1, proc.stderr[-3000:]
    assert expected in error_lines[0], error_lines[0]


@pytest.mark.parametrize("command", ["sft", "grpo", "dpo", "compare", "eval", "bench"])
def test_help_for_every_command(command):
    proc = subprocess.run([sys.executable, "-m", "lopt", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and f"usage: lopt {command}" in proc.stdout
    if command in ("sft", "grpo", "dpo"):  # TRL's parser: the LoPT, model, data and TrainingArguments flags
        for flag in ("--num_blocks", "--lambda_aux", "--lr_k1", "--model_name_or_path", "--train_file"):
            assert flag in proc.stdout, flag
        for flag in ("--lr_scheduler_type", "--report_to", "--eval_strategy", "--config"):
            assert flag in proc.stdout, flag


TRL_SFT_RECIPE = """\
# written as for `trl sft --config`
learning_rate: 0.0005
lr_scheduler_type: cosine
report_to: none
eval_strategy: steps
eval_steps: 1
per_device_eval_batch_size: 4
packing: true
max_length: 64
logging_steps: 1
max_steps: 2
per_device_train_batch_size: 4
"""


def test_a_trl_sft_yaml_recipe_trains_with_lopt(builtin_tiny, tmp_path):
    """TRL's flags pass through: a cosine schedule, no reporting, packing, and evaluation on the built-in task's
    validation split every step."""
    config = tmp_path / "recipe.yaml"
    config.write_text(TRL_SFT_RECIPE)
    out = tmp_path / "yaml"
    args = ["sft", "--config", str(config), "--method", "lopt", "--max_samples", "32", "--eval_samples", "4"]
    lopt([*args, "--no_progress", "--output_dir", str(out)], builtin_tiny["env"])
    assert_hf_checkpoint(out)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "task_loss" in m] == [1, 2]
    assert "aux_loss_0" in metrics[0]
    training_args = json.loads((out / "training_args.json").read_text())
    assert training_args["lr_scheduler_type"] == "cosine" and training_args["packing"] is True
    assert training_args["eval_strategy"] == "steps" and training_args["max_length"] == 64
    history = json.loads((out / "lopt_args.json").read_text())
    assert {"packing", "eval_strategy", "learning_rate"} <= set(history["set_fields"])
