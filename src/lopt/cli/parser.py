"""The parser of `lopt sft`, `lopt grpo` and `lopt dpo`: TRL's own (`trl.TrlParser`, as `trl sft` uses it) over typed
dataclasses, so every field of TRL's configs is a flag, and `--config x.yaml` gives defaults that flags override.

What lopt adds: one-line errors (exit 2) for unknown or bad flags and YAML keys, aliases for lopt's earlier names
(`--max_seq_length` for TRL's `--max_length`, `--warmup_ratio` for `--warmup_steps`, `--no_progress` for
`--disable_tqdm`), and the set of fields the user set (flag or YAML), so a
command's recipe fills only the others. Nothing compares values with defaults.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from trl import TrlParser

from lopt.data.loading import check_model_path
from lopt.errors import UserError

# alias -> the field it sets: lopt's earlier names, kept working
ALIASES = {"max_seq_length": "max_length", "warmup_ratio": "warmup_steps", "no_progress": "disable_tqdm"}
# value aliases: (type, help)
VALUE_ALIASES = {
    "max_seq_length": (int, "Alias of --max_length."),
    "warmup_ratio": (
        float,
        "Alias of --warmup_steps with a value in [0, 1) (transformers 5: a ratio of the steps).",
    ),
}

Recipe = Callable[[dict[str, Any], frozenset[str]], dict[str, Any]]


class LoPTParser(TrlParser):
    def __init__(
        self, dataclass_types: Sequence[type], prog: str, description: str, epilog: str | None = None
    ):
        super().__init__(
            dataclass_types=list(dataclass_types),
            prog=prog,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.fields = {f.name for dtype in self.dataclass_types for f in fields(dtype) if f.init}
        # HfArgumentParser gives `bool | None = None` fields (TRL's --bf16, --gradient_checkpointing, ...) no bare
        # form, so `--bf16` alone fails with "expected one argument". Let a bare flag mean true, as for plain bools.
        optional_bools = {
            f.name
            for dtype in self.dataclass_types
            for f in fields(dtype)
            if f.type in (bool | None, "bool | None")
        }
        for action in self._actions:
            if action.dest in optional_bools and action.nargs is None and action.option_strings:
                action.nargs, action.const = "?", True
        for alias, (kind, help_text) in VALUE_ALIASES.items():
            if ALIASES[alias] in self.fields:
                self.add_argument(
                    f"--{alias}", dest=ALIASES[alias], type=kind, default=argparse.SUPPRESS, help=help_text
                )
        self.add_argument(
            "--no_progress",
            dest="disable_tqdm",
            action="store_const",
            const=True,
            default=argparse.SUPPRESS,
            help="Alias of --disable_tqdm true: no progress bars.",
        )
        self.add_argument(
            "--config",
            default=argparse.SUPPRESS,
            help="YAML file (as for `trl sft --config`): its keys set any flag; flags given here win. An `env:` "
            "mapping sets environment variables.",
        )

    def error(self, message: str):  # argparse's "usage + message, exit 2" becomes lopt's one-line error
        raise UserError(message)

    def parse(self, argv: Sequence[str], recipe: Recipe | None = None) -> tuple[tuple, frozenset[str]]:
        """The dataclass instances, and the names of the fields the user set. The model path is checked first; then
        `recipe(values, set_fields)` gives defaults for the fields left unset. `self.effective` is then every value
        the user or the recipe set."""
        values, set_fields = self.parse_values(argv)
        check_model_path(values.get("model_name_or_path"))
        used = set(set_fields)
        if recipe is not None:
            for name, value in recipe(values, set_fields).items():
                if name not in self.fields:
                    raise KeyError(
                        f"recipe field {name!r} is not a flag of {self.prog}"
                    )  # a bug, not user input
                if name not in set_fields:
                    values[name] = value
                used.add(name)
        # The flags the run uses beyond the dataclass defaults, as given (before the dataclasses' own conversions):
        # written beside the checkpoint as a --config that re-runs it (lopt.training.outputs.run_config).
        self.effective = {name: values[name] for name in sorted(used)}
        return self.build(values), set_fields

    def parse_values(self, argv: Sequence[str]) -> tuple[dict[str, Any], frozenset[str]]:
        """Every field's value (flag > YAML > dataclass default) and the fields set by a flag or the YAML."""
        argv, yaml_fields = self._apply_config(list(argv))
        namespace, unknown = self.parse_known_args(argv)
        if unknown:
            raise UserError(self._unknown_message(unknown))
        values = vars(namespace)
        values.pop("config", None)
        return values, frozenset(yaml_fields | self._flags_given(argv))

    def build(self, values: dict[str, Any]) -> tuple:
        """One instance per dataclass (each runs its own checks, e.g. TrainingArguments.__post_init__)."""
        instances = []
        for dtype in self.dataclass_types:
            names = {f.name for f in fields(dtype) if f.init}
            instances.append(dtype(**{k: v for k, v in values.items() if k in names}))
        return tuple(instances)

    def _flags_given(self, argv: list[str]) -> set[str]:
        """The fields named on the command line: parse again with every default suppressed."""
        saved = [(action, action.default) for action in self._actions]
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            namespace, _ = self.parse_known_args(argv)
        finally:
            for action, default in saved:
                action.default = default
        return set(vars(namespace)) - {"config"}

    def _apply_config(self, argv: list[str]) -> tuple[list[str], set[str]]:
        """`--config FILE`: TrlParser's YAML handling (env, then defaults), with one-line errors and the aliases."""
        import yaml

        path = None
        for i, arg in enumerate(argv):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise UserError("--config needs a YAML file path.")
                path = argv[i + 1]
                argv = argv[:i] + argv[i + 2 :]
                break
            if arg.startswith("--config="):
                path = arg.split("=", 1)[1]
                argv = argv[:i] + argv[i + 1 :]
                break
        if path is None:
            return argv, set()
        if not os.path.isfile(path):
            raise UserError(f"--config {path!r} does not exist.")
        try:
            with open(path) as f:
                config = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise UserError(f"--config {path!r} is not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(config, dict):
            raise UserError(f"--config {path!r} must hold a mapping of flag names to values.")
        env = config.pop("env", {})
        if not isinstance(env, dict):
            raise UserError(f"--config {path!r}: `env` must be a mapping of variable names to values.")
        for key, value in env.items():
            os.environ[str(key)] = str(value)
        config = {ALIASES.get(key, key): value for key, value in config.items()}
        unknown = sorted(key for key in config if key not in self.fields)
        if unknown:
            hints = [self._suggest(key) for key in unknown]
            raise UserError(
                f"--config {path!r} has unknown keys {unknown}{''.join(hints)}; see `{self.prog} --help`."
            )
        self.set_defaults_with_config(**config)
        return argv, set(config)

    def _unknown_message(self, unknown: list[str]) -> str:
        flags = [arg for arg in unknown if arg.startswith("-")] or unknown
        hint = self._suggest(flags[0].lstrip("-").split("=")[0])
        return f"unknown flag(s) {' '.join(flags)}{hint}; see `{self.prog} --help`."

    def _suggest(self, name: str) -> str:
        close = difflib.get_close_matches(name, sorted(self.fields | set(ALIASES)), n=1)
        return f" (did you mean --{close[0]}?)" if close else ""
