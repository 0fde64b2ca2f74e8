"""Bad rows and impossible flags fail before any model is built or loaded (lopt.training.checks): one line, exit 2,
and the built-in model's cache stays empty."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lopt.errors import UserError


def fresh_env(tmp_path) -> dict:
    """An empty lopt cache: building the built-in model (or its SFT checkpoint) would fill it."""
    env = dict(os.environ)
    env.update(
        LOPT_BUILTIN_PRESET="tiny",
        LOPT_CACHE_DIR=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    env.pop("LOPT_DEBUG", None)
    return env


def refused(tmp_path, args: list[str]) -> str:
    """Run `lopt ARGS` on a fresh cache; assert exit 2, one error line, no model built; return the line."""
    command = args[0]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lopt", *args, "--output_dir", str(tmp_path / "out")],
        env=fresh_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"lopt {command}: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), sorted(p.name for p in cache.iterdir())
    assert not (tmp_path / "out").exists()
    assert elapsed < 120, (
        elapsed
    )  # the import of transformers/TRL, never a model build (minutes on a busy CPU)
    return errors[0]


def test_a_bad_row_fails_before_the_built_in_model_is_built(tmp_path):
    rows = tmp_path / "bad.jsonl"
    rows.write_text(json.dumps({"text": 5}) + "\n")
    line = refused(tmp_path, ["sft", "--train_file", str(rows)])
    assert "row 0: no known fields (row keys: 'text')" in line


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_too_many_blocks_fail_before_any_model_is_built(tmp_path, command):
    """The built-in model's depth is its preset's (no build); grpo would first make the built-in SFT checkpoint."""
    from lopt.builtin.base import preset_config

    layers = preset_config("tiny").num_hidden_layers
    line = refused(tmp_path, [command, "--num_blocks", "99"])
    assert f"num_blocks=99 is larger than the model's {layers} layers" in line


def test_model_depth_reads_the_config_only(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from lopt.builtin import base
    from lopt.data.loading import model_depth

    def no_build(*args, **kwargs):
        raise AssertionError("the built-in model was built")

    monkeypatch.setenv("LOPT_BUILTIN_PRESET", "tiny")
    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(base, "_build", no_build)
    assert model_depth(None) == base.preset_config("tiny").num_hidden_layers
    LlamaConfig(num_hidden_layers=3).save_pretrained(tmp_path / "user")
    assert model_depth(str(tmp_path / "user")) == 3
    assert model_depth("smollm2-135m") is None  # not converted yet: only converting would tell
    assert model_depth(str(tmp_path / "missing")) is None  # loading says why


def test_check_model_depth_uses_the_engine_rules(tmp_path):
    from transformers import LlamaConfig
    from trl import ModelConfig

    from lopt.training.arguments import LoPTArguments
    from lopt.training.checks import check_model_depth

    LlamaConfig(num_hidden_layers=4).save_pretrained(tmp_path)
    model = ModelConfig(model_name_or_path=str(tmp_path))
    check_model_depth(LoPTArguments(num_blocks=4), model)
    with pytest.raises(ValueError, match="num_blocks=5 is larger than the model's 4 layers"):
        check_model_depth(LoPTArguments(num_blocks=5), model)
    with pytest.raises(ValueError, match="boundaries=\\[4\\] are out of range"):
        check_model_depth(LoPTArguments(boundaries="4"), model)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        check_model_depth(LoPTArguments(method="e2e", checkpoint_layers="7,"), model)


def test_a_rule_shared_with_the_trainer_has_one_text():
    """--optimizer_in_backward with gradient accumulation: the command and the trainer mixin raise the same line."""
    from lopt.integrations.checks import check_optimizer_in_backward

    with pytest.raises(UserError) as err:
        check_optimizer_in_backward(
            joint_backward=False,
            gradient_accumulation_steps=4,
            fp16=False,
            processes=1,
            fsdp=False,
            optim="adamw",
        )
    assert str(err.value) == (
        "--optimizer_in_backward steps after every backward: --gradient_accumulation_steps must be 1, not 4 (raise "
        "--per_device_train_batch_size instead)."
    )


@pytest.mark.parametrize(
    "command, argv, line",
    [
        (
            "grpo",
            ["--aux_objective", "recon+task"],
            "--aux_objective recon+task needs labelled batches, which lopt grpo does not have: use --aux_objective "
            "recon (or anchor, recon+anchor).",
        ),
        (
            "sft",
            ["--clip_per_block", "--optimizer_in_backward", "--max_grad_norm", "0"],
            "--clip_per_block does not combine with --optimizer_in_backward, which clips each parameter by its own "
            "norm.",
        ),
        (
            "sft",
            ["--method", "e2e", "--clip_per_block"],
            "--clip_per_block only applies to LoPT methods, not --method e2e.",
        ),
    ],
)
def test_rules_shared_with_the_trainer_are_checked_from_the_flags(command, argv, line, monkeypatch, tmp_path):
    """The mixin's rules, checked by check_flags before any model (the built-in model is not built: _build raises)."""
    from lopt.builtin import base
    from lopt.cli import grpo, sft
    from lopt.training.checks import check_flags

    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(base, "_build", lambda *a, **k: pytest.fail("the built-in model was built"))
    module = {"grpo": grpo, "sft": sft}[command]
    parsed, set_fields = module.make_parser().parse(argv, module.recipe)
    lopt_args, model_args, training_args = parsed[0], parsed[1], parsed[-1]
    task_args = parsed[3] if command == "grpo" else None
    with pytest.raises(UserError) as err:
        check_flags(command, lopt_args, model_args, training_args, set_fields, task_args)
    assert str(err.value) == line
