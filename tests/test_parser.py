"""`lopt sft/grpo/dpo` flags on TRL's parser, in-process (no training): every TRL field is a flag, recipes fill only
unset fields, aliases, one-line errors in the order a user fixes them, and the package's import layering."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import pathlib

import pytest
from trl import DPOConfig, GRPOConfig, SFTConfig

from lopt.cli import dpo, grpo, sft
from lopt.cli.main import main
from lopt.errors import UserError
from lopt.training.arguments import LoPTArguments

COMMANDS = {"sft": (sft, SFTConfig), "grpo": (grpo, GRPOConfig), "dpo": (dpo, DPOConfig)}
SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "lopt"


def example_argv(action: argparse.Action) -> list[str]:
    """A flag and a value its action accepts (a choice, a number of its type, a bare boolean flag)."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return [flag]
    if action.nargs == "?" and action.const is True:
        return [flag]  # bool fields: `--flag` means true
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return [flag, "true"]
    if action.choices:
        return [flag, str(list(action.choices)[0])]
    if action.type is int:
        return [flag, "3"]
    if action.type is float:
        return [flag, "0.5"]
    return [flag, "x"]


def accepted(parser, action: argparse.Action, tmp_path) -> frozenset[str]:
    """The fields set by one example of the flag; `dict | None` fields, which argparse cannot convert from a string
    (transformers' HfArgumentParser gives them type=dict), through the YAML."""
    try:
        return parser.parse_values(example_argv(action))[1]
    except UserError:
        config = tmp_path / f"{action.dest}.yaml"
        config.write_text(f"{action.dest}: {{}}\n")
        return parser.parse_values(["--config", str(config)])[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_of_the_trainer_config_is_a_flag(command, tmp_path):
    module, config_class = COMMANDS[command]
    parser = module.make_parser()
    actions = {
        a.dest: a for a in parser._actions if a.option_strings and a.option_strings[0] == f"--{a.dest}"
    }
    names = [f.name for f in dataclasses.fields(config_class) if f.init]
    assert len(names) > 100  # TrainingArguments alone has more
    for name in names:
        assert name in actions, f"--{name} is not a flag of lopt {command}"
        assert name in accepted(parser, actions[name], tmp_path), name


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_build_every_dataclass(command):
    module, config_class = COMMANDS[command]
    parsed, set_fields = module.make_parser().parse([], module.recipe)
    assert set_fields == frozenset()
    assert isinstance(parsed[0], LoPTArguments) and isinstance(parsed[-1], config_class)
    assert parsed[-1].output_dir.endswith(f"{command}-lopt")
    assert (
        parsed[-1].activation_checkpointing is False
    )  # TRL's gradient_checkpointing=True default is not used


def training_args(command: str, argv: list[str]):
    module, _ = COMMANDS[command]
    parsed, set_fields = module.make_parser().parse(argv, module.recipe)
    return parsed[-1], set_fields


@pytest.mark.parametrize(
    "command, name, trl_default, recipe_value, flag_value",
    [
        ("sft", "learning_rate", 2e-5, 1e-3, "2e-5"),
        ("sft", "max_length", 1024, 128, "1024"),
        ("grpo", "temperature", 1.0, 0.7, "1.0"),
        ("grpo", "num_generations", 8, 8, "8"),
        ("dpo", "max_steps", -1, 60, "-1"),
    ],
)
def test_built_in_recipe_fills_only_what_the_user_did_not_set(
    tmp_path, command, name, trl_default, recipe_value, flag_value
):
    """A value equal to TRL's default, given by flag or YAML, is kept: the recipe knows what was set, and never
    compares with defaults."""
    unset, set_fields = training_args(command, [])
    assert getattr(unset, name) == recipe_value and name not in set_fields
    by_flag, set_fields = training_args(command, [f"--{name}", flag_value])
    assert getattr(by_flag, name) == trl_default and name in set_fields
    config = tmp_path / "run.yaml"
    config.write_text(f"{name}: {flag_value}\n")
    by_yaml, set_fields = training_args(command, ["--config", str(config)])
    assert getattr(by_yaml, name) == trl_default and name in set_fields


def test_user_model_gets_trl_defaults_and_flags_beat_yaml(tmp_path):
    model = ["--model_name_or_path", "gpt2"]
    args, _ = training_args("sft", model)
    assert args.learning_rate == SFTConfig.learning_rate and args.max_length == 1024
    assert args.num_train_epochs == 1.0  # lopt's one epoch, not TRL's 3
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.01\nmax_steps: 50\n")
    args, set_fields = training_args("sft", [*model, "--config", str(config), "--max_steps", "3"])
    assert args.learning_rate == 0.01 and args.max_steps == 3
    assert {"learning_rate", "max_steps", "model_name_or_path"} <= set_fields


def test_aliases_and_lopt_defaults(tmp_path):
    args, set_fields = training_args(
        "sft", ["--max_seq_length", "64", "--no_progress", "--warmup_ratio", "0.1"]
    )
    assert args.max_length == 64 and args.disable_tqdm is True and args.warmup_steps == 0.1
    assert {"max_length", "disable_tqdm", "warmup_steps"} <= set_fields
    config = tmp_path / "run.yaml"
    config.write_text("max_seq_length: 32\n")
    args, set_fields = training_args("sft", ["--config", str(config)])
    assert args.max_length == 32 and "max_length" in set_fields
    args, _ = training_args("sft", ["--save_steps", "5"])
    assert args.save_strategy == "steps" and args.save_steps == 5
    args, _ = training_args("sft", [])
    assert args.save_strategy == "no"  # no checkpoints unless asked for
    args, _ = training_args("sft", ["--gradient_checkpointing"])
    assert (
        args.activation_checkpointing is True
    )  # passed on under transformers 5's name: no deprecation warning


@pytest.mark.parametrize("command", COMMANDS)
def test_bare_flag_of_an_optional_bool_means_true(command):
    """TRL declares bf16 as `bool | None = None`, for which HfArgumentParser alone needs `--bf16 true`."""
    bare, _ = training_args(command, ["--bf16"])
    off, _ = training_args(command, ["--bf16", "false"])
    assert bare.bf16 is True and off.bf16 is False


def test_lopt_arguments_reach_the_config():
    (lopt_args, *_), set_fields = sft.make_parser().parse(
        ["--boundaries", "1,3", "--aux_head_ratio", "2", "--lambda_aux", "5", "--method", "lopt_joint"],
        sft.recipe,
    )
    config = lopt_args.lopt_config()
    assert config.boundaries == [1, 3] and config.num_blocks == 3 and config.aux_head_ratio == 2
    assert config.aux_weight == 5.0 and config.backward == "joint"
    lopt_args.check(set_fields)
    # every LoPTConfig field a LoPTArguments field shares by name passes through unchanged
    shared = {f.name for f in dataclasses.fields(LoPTArguments)} & set(config.to_dict())
    assert {"num_blocks", "aux_objective", "anchor_weight", "anchor_dtype", "aux_head_ratio"} <= shared
    with pytest.raises(UserError, match="--num_blocks is 4"):
        LoPTArguments(boundaries="1,3", num_blocks=4).check(frozenset({"num_blocks"}))
    with pytest.raises(UserError, match="--boundaries applies to LoPT methods"):
        LoPTArguments(method="e2e", boundaries="2").check()
    with pytest.raises(UserError, match="as one layer"):
        LoPTArguments(method="freeze", boundaries="1,3").check()
    LoPTArguments(method="freeze", boundaries="3").check()  # freeze: the first layer trained
    assert LoPTArguments(method="e2e").lopt_config() is None


@pytest.mark.parametrize(
    "name, untied", [("lopt", True), ("lopt@0.3+b1", True), ("lopt_tied", False), ("lopt_task@0.3", False)]
)
def test_compare_paper_arm_unties_the_embedding(name, untied):
    """`lopt compare`'s "lopt" reproduces the authors' code (a tied head untied); the other LoPT names keep the
    default (one shared matrix). The recipe's flags go through `lopt sft`'s parser as compare passes them."""
    from lopt.experiments.compare.spec import _method_flags

    (lopt_args, *_), set_fields = sft.make_parser().parse(_method_flags(name, lr=1e-3), sft.recipe)
    lopt_args.check(set_fields)
    assert lopt_args.lopt_config().untie_embeddings is untied


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        # the model path is checked first, before data and method flags
        (["sft", "--model_name_or_path", "./no-such-model"], "'./no-such-model' does not exist"),
        (["grpo", "--model_name_or_path", "./no-such-model", "--num_blocks", "1"], "does not exist"),
        (["dpo", "--model_name_or_path", "/no/such/model", "--train_file", "x.jsonl"], "does not exist"),
        # then data, then method flags
        (["sft", "--train_file", "{tmp}/missing.jsonl", "--num_blocks", "1"], "missing.jsonl"),
        (["sft", "--num_blocks", "1"], "--num_blocks 1 is invalid"),
        (["sft", "--lerning_rate", "0.1"], "unknown flag(s) --lerning_rate (did you mean --learning_rate?)"),
        (["sft", "--config", "{tmp}/bad.yaml"], "unknown keys ['lerning_rate']"),
        (["sft", "--config", "{tmp}/none.yaml"], "does not exist"),
        (["sft", "--num_blocks", "two"], "invalid int value: 'two'"),
        (["sft", "--method", "sgd"], "invalid choice: 'sgd'"),
        (["sft", "--task", "successor", "--train_file", "x.jsonl"], "drop --train_file"),
        (["grpo", "--task", "nope"], "--task 'nope' is not one of"),
        (["sft", "--use_peft"], "use --method lora"),
        (["sft", "--load_in_4bit"], "not supported"),
        (["sft", "--eval_file", "x.jsonl", "--train_file", "{tmp}/ok.jsonl"], "--eval_strategy steps"),
        (["sft", "--eval_strategy", "steps", "--train_file", "{tmp}/ok.jsonl"], "give --eval_file"),
        (["grpo", "--use_vllm"], "--use_vllm is not supported"),
        (["grpo", "--eval_strategy", "steps"], "--eval_strategy is not supported by lopt grpo"),
        (["dpo", "--eval_strategy", "steps"], "--eval_strategy is not supported by lopt dpo"),
        (["sft", "--push_to_hub"], "--push_to_hub is not supported"),
        (["sft", "--dataset_text_field", "text"], "--dataset_text_field has no effect"),
        (["sft", "--chat_template_path", "t.jinja"], "--chat_template_path has no effect"),
        (["sft", "--torch_compile"], "--torch_compile is not supported with LoPT"),
        (["sft", "--use_liger_kernel"], "not supported with LoPT methods"),
        (["sft", "--assistant_only_loss"], "--assistant_only_loss is not needed"),
        (["sft", "--completion_only_loss", "false"], "--completion_only_loss false"),
        (["sft", "--model_init_kwargs", '{"dtype": "float32"}'], "--model_init_kwargs is not used"),
        (["dpo", "--block_parallel"], "sft option"),
        (["sft", "--method", "e2e", "--untie_embeddings"], "--untie_embeddings only applies to LoPT methods"),
    ],
)
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, expected):
    (tmp_path / "bad.yaml").write_text("lerning_rate: 0.1\n")
    (tmp_path / "ok.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = run_main([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"lopt {argv[0]}: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["sft", "grpo", "dpo"])
def test_task_with_a_user_model_is_refused(builtin_tiny, tmp_path, capsys, command):
    model = ["--model_name_or_path", builtin_tiny["path"], "--output_dir", str(tmp_path / "out")]
    code, err = run_main([command, *model, "--task", "successor"], capsys)
    assert code == 2 and "--task successor is made for the built-in model" in err
    code, err = run_main([command, *model], capsys)
    assert code == 2 and "give --train_file or --dataset_name" in err


def test_only_the_command_layer_imports_lopt_cli():
    offenders = []
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC)
        if relative.parts[0] == "cli" or relative.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            offenders += [f"{relative}: {n}" for n in names if n == "lopt.cli" or n.startswith("lopt.cli.")]
    assert not offenders, offenders
