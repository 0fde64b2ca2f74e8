"""What a compare runs: the method names and the `lopt sft` flags of each (`METHOD_FLAGS`; "name@r" scales the early
lr, "name+bN" moves the boundary), the default retention budgets and accuracy targets, and `CompareSpec`, the
checked settings of one `lopt compare` call.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from lopt.errors import UserError

# compare name -> `lopt sft` flags. Names are fixed recipes: a LoPT name trains its early group at the full lr
# (the paper's setting), "name@r" (e.g. "lopt@0.3", `lopt sft`'s default rate) at r x lr.
METHOD_FLAGS: dict[str, list[str]] = {
    "e2e": ["--method", "e2e"],
    # The paper's arm reproduces the authors' code, which unties a tied embedding and LM head (so do its "@r" and
    # "+bN" variants). "lopt_tied" is the same recipe with `lopt sft`'s default: a tied matrix stays one parameter,
    # in the late group; so are the other LoPT names. Untied models (the built-in one) train alike under both.
    # The objective is named even where it is the library default: on a real base's tasks `lopt sft` defaults to
    # another one (recipes/smollm2-135m/sft-lopt.yaml).
    "lopt": [
        "--method",
        "lopt",
        "--num_blocks",
        "2",
        "--untie_embeddings",
        "true",
        "--aux_objective",
        "recon",
    ],
    "lopt_tied": ["--method", "lopt", "--num_blocks", "2", "--aux_objective", "recon"],
    "lopt_k4": ["--method", "lopt", "--num_blocks", "4", "--aux_objective", "recon"],
    "lopt_joint": ["--method", "lopt_joint", "--num_blocks", "2", "--aux_objective", "recon"],
    "freeze": ["--method", "freeze"],
    "lora": ["--method", "lora"],
    # The anchored objectives clip each block by its own norm: on SmolLM2-135M the anchor's gradient reached a norm
    # of ~2e4 within 10 steps, and one global clip then scaled the last block's task step down with it (0% accuracy
    # at 40 steps; 60.7% with --clip_per_block, docs/EVIDENCE.md).
    "lopt_anchor": ["--method", "lopt", "--num_blocks", "2", "--aux_objective", "anchor", "--clip_per_block"],
    "lopt_recon_anchor": [
        *("--method", "lopt", "--num_blocks", "2", "--aux_objective", "recon+anchor", "--clip_per_block")
    ],
    "lopt_k4_anchor": [
        *("--method", "lopt", "--num_blocks", "4", "--aux_objective", "recon+anchor", "--clip_per_block")
    ],
    # The local task objective (logit-lens next-token loss at each boundary), at lambda 1: with the paper's 10 the
    # early gradients dominate the global clipping norm and shrink the last block's step.
    "lopt_task": ["--method", "lopt", "--num_blocks", "2", "--aux_objective", "task", "--lambda_aux", "1"],
    "lopt_k4_task": ["--method", "lopt", "--num_blocks", "4", "--aux_objective", "task", "--lambda_aux", "1"],
    "lopt_task_anchor": [
        *("--method", "lopt", "--num_blocks", "2", "--aux_objective", "task+anchor"),
        *("--lambda_aux", "1", "--anchor_weight", "0.1", "--clip_per_block"),
    ],
    # Predicted boundary gradients (lopt.engine.synthetic): a perfect predictor would give e2e's update, so the early
    # group trains at the full rate, as e2e's does. The early half is held for the first 20 steps while the
    # predictors learn (AdamW turns even a poor prediction into a full-sized step); with the anchor as
    # lopt_task_anchor has it.
    "lopt_synth": [
        *("--method", "lopt", "--num_blocks", "2", "--aux_objective", "synth", "--aux_warmup_steps", "20")
    ],
    "lopt_synth_anchor": [
        *(
            "--method",
            "lopt",
            "--num_blocks",
            "2",
            "--aux_objective",
            "synth+anchor",
            "--aux_warmup_steps",
            "20",
        ),
        *("--lambda_aux", "1", "--anchor_weight", "0.1", "--clip_per_block"),
    ],
}
DEFAULT_METHODS = ("e2e", "lopt", "lopt@0.3", "lopt_k4", "lopt_joint", "freeze", "lora")
# A GRPO compare (--trainer grpo): the methods whose local objective needs no labels (GRPO batches carry none).
DEFAULT_GRPO_METHODS = ("e2e", "lopt", "lopt_anchor", "freeze", "lora")
TRAINERS = ("sft", "grpo")


# retention-perplexity rise, as a fraction of the base model's perplexity
RETENTION_BUDGETS = (0.25, 1.0, 4.0)
ACCURACY_TARGETS = (0.5, 0.8, 0.9)  # validation task accuracy


# `lopt sft` flags that compare sets itself, per run; in --sft_args they would silently override the sweep.
_COMPARE_OWNED_FLAGS = ("--max_steps", "--seed", "--output_dir", "--task", "--eval_samples")
# In a GRPO compare: `lopt grpo` flags compare sets per run (the start is the --model_name_or_path of every run), and
# `lopt sft` flags of the one start run that compare sets itself (its method is e2e, its task the compare's).
_GRPO_OWNED_FLAGS = (*_COMPARE_OWNED_FLAGS, "--model_name_or_path")
_START_OWNED_FLAGS = ("--method", "--output_dir", "--task", "--model_name_or_path", "--eval_samples")


@dataclass
class CompareSpec:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: int = 3
    max_steps: list[int] = field(default_factory=lambda: [300])  # the step-budget axis: one run per budget
    learning_rates: list[float] | None = None  # None: --learning_rate in sft_args, else `lopt sft`'s default
    method_learning_rates: dict[str, list[float]] = field(default_factory=dict)  # name or base name -> grid
    eval_samples: int = 300
    task: str | None = None  # a built-in task; None: the model's default one (see _task)
    # None: the built-in model; a real base (lopt.builtin.hub_bases) trains on its task (extract) by default
    model_name_or_path: str | None = None
    train_file: str | None = None
    eval_file: str | None = None  # test rows: what the report states
    validation_file: str | None = None  # validation rows: what the selection uses
    retention_file: str | None = None
    # any other `lopt sft` flags, identical for every method (a GRPO compare: the flags of its one SFT start run)
    sft_args: list[str] = field(default_factory=list)
    # "sft": every run is `lopt sft` from the base. "grpo": every run is `lopt grpo` from one common SFT checkpoint
    # of the task (made once with `lopt sft --method e2e`, or --start_checkpoint), so methods differ in the RL alone.
    trainer: str = "sft"
    start_checkpoint: str | None = None  # a GRPO compare's start, instead of the e2e SFT run compare makes
    grpo_args: list[str] = field(default_factory=list)  # any other `lopt grpo` flags, identical for every run
    output_dir: str = "runs/compare"
    progress: bool = True
    lr_k1_ratios: list[float] | None = None  # adds "lopt@r" for each ratio r != 1 (the learning-rate study)
    retention_budgets: tuple[float, ...] = RETENTION_BUDGETS
    accuracy_targets: tuple[float, ...] = ACCURACY_TARGETS
    # lm-evaluation-harness tasks scored before and after every run (lopt.evaluation.lm_eval_tasks.CompareLMEval)
    lm_eval_tasks: str | None = None
    lm_eval_limit: float | None = None
    lm_eval_batch_size: int | str = 16
    # The world-knowledge probe and code perplexity (lopt.evaluation.world_knowledge); None: on for a real base only.
    world_knowledge: bool | None = None
    jobs: int = 1  # runs at once, each in its own worker process (a GPU is mostly idle with one small run)
    time_limit: float | None = None  # seconds; past it no new run starts and the report covers finished runs
    # A method whose rate chosen on validation sits at an edge of its grid (2+ rates) gets up to this many more rates
    # past that edge, each GRID_FACTOR from the last, until the choice is interior (lopt.experiments.compare.grid).
    extend_grid: int = 2
    report_only: bool = False  # no training or scoring: the report from the finished runs in output_dir
    # The `lopt compare ...` arguments that made this (results.json's setup.command): with the run records and
    # compare_base.json, `--report_only` under them rebuilds the report anywhere (tests replay docs/evidence-real).
    command: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.max_steps, int):
            self.max_steps = [self.max_steps]
        self._check_trainer()
        unknown = [m for m in self.methods if _base_name(m) not in METHOD_FLAGS]
        if unknown:
            raise UserError(
                f"--methods {unknown} unknown; choose from {', '.join(METHOD_FLAGS)} (optionally name@lr_k1_ratio, "
                "name+bN for a boundary at layer N)."
            )
        for name in self.methods:
            _lr_k1_ratio(name)  # validates the "@r" suffix
            _boundary(name)  # and the "+bN" one
        if self.lr_k1_ratios:
            if "lopt" not in self.methods:
                raise UserError(
                    "--lr_k1_ratios varies the lopt method's early lr: include lopt in --methods."
                )
            if any(r <= 0 for r in self.lr_k1_ratios):
                raise UserError(f"--lr_k1_ratios {self.lr_k1_ratios} must all be > 0.")
            at = self.methods.index("lopt") + 1
            extra = [f"lopt@{r:g}" for r in self.lr_k1_ratios if r != 1 and f"lopt@{r:g}" not in self.methods]
            self.methods[at:at] = extra
        if self.extend_grid < 0:
            raise UserError(f"--extend_grid {self.extend_grid} must be >= 0 (0: the grids as given).")
        if self.jobs < 1:
            raise UserError(f"--jobs {self.jobs} must be >= 1.")
        if self.time_limit is not None and not self.time_limit > 0:
            raise UserError(f"--time_limit {self.time_limit} must be > 0 seconds.")
        if self.seeds < 1 or not self.max_steps or min(self.max_steps) < 1:
            raise UserError(f"--seeds {self.seeds} and --max_steps {self.max_steps} must be >= 1.")
        self.max_steps = sorted(set(self.max_steps))
        grids = {"--learning_rates": self.learning_rates or [], **self.method_learning_rates}
        for flag, grid in grids.items():
            if any(not lr > 0 for lr in grid):
                raise UserError(f"learning rates {flag} {grid} must all be > 0.")
        known = {*self.methods, *map(_base_name, self.methods)}
        stray = [k for k in self.method_learning_rates if k not in known]
        if stray:
            raise UserError(
                f"--method_learning_rates names {stray}, not in --methods {','.join(self.methods)}: fix the name."
            )
        per_run_args, per_run_flags = (
            ("--grpo_args", _GRPO_OWNED_FLAGS)
            if self.trainer == "grpo"
            else ("--sft_args", _COMPARE_OWNED_FLAGS)
        )
        args = self.grpo_args if self.trainer == "grpo" else self.sft_args
        owned = [flag for flag in per_run_flags if _has_flag(args, flag)]
        if (self.learning_rates or self.method_learning_rates) and _has_flag(args, "--learning_rate"):
            owned.append("--learning_rate")
        if owned:
            raise UserError(
                f"{per_run_args} sets {', '.join(owned)}, which compare sets per run: use compare's own flags "
                "(--max_steps, --seeds, --task, --learning_rates"
                + (", --start_checkpoint" if self.trainer == "grpo" else "")
                + ") instead."
            )
        if self.task is not None:
            from lopt.builtin.tasks import BUILTIN_TASKS

            if self.task not in BUILTIN_TASKS:
                raise UserError(f"--task {self.task!r} is unknown: choose from {', '.join(BUILTIN_TASKS)}.")
            if not self.base.can_train(self.task):
                raise UserError(
                    f"--task {self.task!r} is made for the built-in model: drop it, or --model_name_or_path."
                )
            if self.train_file is not None:
                raise UserError(f"--task {self.task!r} is a built-in task: drop it, or --train_file.")
        if _task(self) is None and self.train_file is None:
            raise UserError(
                "a user model needs --train_file, or --task extract or totals (a real base such as smollm2-135m "
                "trains on extract by default)."
            )
        sweeping = any(len(self.points_of(name)) > 1 for name in self.methods)
        if sweeping and self.eval_file and not self.validation_file:
            raise UserError(
                "a sweep chooses each method's best setting on validation rows: add --validation_file (rows "
                "disjoint from --eval_file, which only reports)."
            )

    def _check_trainer(self) -> None:
        """A GRPO compare's own flags; with --start_checkpoint, its base and task are the checkpoint's records."""
        if self.trainer not in TRAINERS:
            raise UserError(f"--trainer {self.trainer!r} is unknown: choose from {', '.join(TRAINERS)}.")
        if self.trainer == "sft":
            for flag, value in (
                ("--start_checkpoint", self.start_checkpoint),
                ("--grpo_args", self.grpo_args),
            ):
                if value:
                    raise UserError(f"{flag} is for a GRPO compare: add --trainer grpo, or drop {flag}.")
            return
        needs_labels = [m for m in self.methods if _base_name(m) in METHOD_FLAGS and _uses_task_objective(m)]
        if needs_labels:
            raise UserError(
                f"--methods {needs_labels}: the 'task' local objective needs labels and GRPO batches carry none; "
                "drop them (e.g. lopt, lopt_anchor, lopt_synth, freeze, lora)."
            )
        for flag, value in (("--train_file", self.train_file), ("--eval_file", self.eval_file)):
            if value is not None:
                raise UserError(
                    f"{flag}: a GRPO compare trains and scores on a built-in task (its rewards are the task's "
                    "scorer): drop it and name the task with --task."
                )
        if self.start_checkpoint is None:
            owned = [flag for flag in _START_OWNED_FLAGS if _has_flag(self.sft_args, flag)]
            if owned:
                raise UserError(
                    f"--sft_args sets {', '.join(owned)}: the start is `lopt sft --method e2e` on compare's task "
                    "and model; --sft_args may set its other flags (e.g. --max_steps, --learning_rate)."
                )
            return
        if self.sft_args:
            raise UserError(
                "--sft_args shapes the SFT start that compare makes, and --start_checkpoint is given: drop one."
            )
        if self.model_name_or_path is not None:
            raise UserError(
                "--start_checkpoint records the model it was trained from (its base): drop --model_name_or_path."
            )
        from lopt.builtin.bases import RUN_RECORDS
        from lopt.builtin.tasks import BUILTIN_TASKS
        from lopt.evaluation.evaluate import scoring_defaults

        records = os.path.join(os.path.expanduser(self.start_checkpoint), RUN_RECORDS)
        if not os.path.isfile(records):
            raise UserError(
                f"--start_checkpoint {self.start_checkpoint!r} has no {RUN_RECORDS}: give a checkpoint `lopt sft` "
                "wrote, or drop it to let compare make the start."
            )
        task = scoring_defaults(self.start_checkpoint).task
        if task not in BUILTIN_TASKS:
            raise UserError(
                f"--start_checkpoint {self.start_checkpoint!r} was not trained on a built-in task: give one that "
                "was (a GRPO compare rewards and scores the task's answers)."
            )
        if self.task is not None and self.task != task:
            raise UserError(
                f"--task {self.task!r}, but --start_checkpoint {self.start_checkpoint!r} was trained on {task!r}: "
                f"drop --task, or use --task {task}."
            )
        with open(records) as f:
            self.model_name_or_path = json.load(f).get(
                "model_name_or_path"
            )  # the start's base (None: built-in)
        self.task = task

    @property
    def base(self):
        """The base compare trains from (lopt.builtin.bases.base_of)."""
        from lopt.builtin.bases import base_of

        return base_of(self.model_name_or_path)

    def learning_rates_of(self, name: str) -> list[float]:
        """The lr grid of one method: its own (exact name, else base name), else --learning_rates, else one lr."""
        grid = self.method_learning_rates.get(name) or self.method_learning_rates.get(_base_name(name))
        return list(dict.fromkeys(grid or self.learning_rates or [_learning_rate(self)]))  # once each

    def points_of(self, name: str) -> list[tuple[float, int]]:
        """(lr, max_steps) of every point of one method, in a fixed order."""
        return [(lr, steps) for lr in self.learning_rates_of(name) for steps in self.max_steps]


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _task(spec: CompareSpec) -> str | None:
    """The built-in task compare trains and scores on: --task, else the model's default (successor for the built-in
    model, extract for a real base); None for the user's data (--train_file)."""
    if spec.train_file is not None:
        return None
    return spec.task or spec.base.default_task


def _world_knowledge_on(spec: CompareSpec) -> bool:
    return spec.world_knowledge if spec.world_knowledge is not None else spec.base.probe == "world"


def _base_name(name: str) -> str:
    """The recipe of a method name: "lopt_task@0.3+b6" -> "lopt_task"."""
    return name.split("@", 1)[0].split("+b", 1)[0]


def _memory_name(name: str) -> str:
    """The name without its "@r" (the early lr does not change memory): the key of its activation peak."""
    return _base_name(name) + (f"+b{b}" if (b := _boundary(name)) is not None else "")


def _lr_k1_ratio(name: str) -> float | None:
    """The r of "method@r", None without a suffix."""
    if "@" not in name:
        return None
    text = name.split("@", 1)[1].split("+b", 1)[0]
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not ratio > 0 or not METHOD_FLAGS[_base_name(name)][1].startswith("lopt"):
        raise UserError(f"--methods {name!r}: '@r' takes a ratio r > 0 and applies to LoPT methods only.")
    return ratio


def _boundary(name: str) -> int | None:
    """The N of "method+bN" (the one boundary of a two-block method: its later block starts at layer N)."""
    if "+b" not in name:
        return None
    text = name.split("+b", 1)[1].split("@", 1)[0]
    command = METHOD_FLAGS[_base_name(name)]
    flags = dict(zip(command[::2], command[1::2]))
    two_blocks = flags["--method"] == "freeze" or flags.get("--num_blocks") == "2"
    if not text.isdigit() or int(text) < 1 or not two_blocks:
        raise UserError(
            f"--methods {name!r}: '+bN' takes a layer N >= 1 and applies to freeze and the two-block LoPT methods."
        )
    return int(text)


def _method_flags(name: str, lr: float) -> list[str]:
    flags = list(METHOD_FLAGS[_base_name(name)])
    if (boundary := _boundary(name)) is not None:
        flags += ["--boundaries", str(boundary)]
    if _is_lopt(name):  # always explicit, so a name means the same recipe whatever `lopt sft`'s default is
        ratio = _lr_k1_ratio(name) or 1.0
        flags += ["--lr_k1", f"{ratio * lr:.10g}"]
    return flags


def _learning_rate(spec: CompareSpec) -> float:
    """The lr without a sweep: --learning_rate in sft_args (grpo_args), else `lopt sft`'s (`lopt grpo`'s) default for
    this model and task."""
    import argparse

    from trl import GRPOConfig, SFTConfig

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--learning_rate", type=float, default=None)
    known, _ = parser.parse_known_args(spec.grpo_args if spec.trainer == "grpo" else spec.sft_args)
    if known.learning_rate is not None:
        return known.learning_rate
    default = (GRPOConfig if spec.trainer == "grpo" else SFTConfig).learning_rate
    return spec.base.recipe(spec.trainer, _task(spec)).values.get("learning_rate", default)


def _uses_task_objective(name: str) -> bool:
    """Whether a method's local objective has the "task" term (the batch's next-token loss: SFT only)."""
    flags = METHOD_FLAGS[_base_name(name)]
    objective = flags[flags.index("--aux_objective") + 1] if "--aux_objective" in flags else ""
    return "task" in objective.split("+")


def _is_lopt(name: str) -> bool:
    return METHOD_FLAGS[_base_name(name)][1].startswith("lopt")
