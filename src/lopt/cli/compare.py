"""`lopt compare`: every method on the same model, data, budget and seeds; results.json, report.md, plots.

With --learning_rates and several --max_steps it is a sweep: every method at every (lr, steps) point, each
method's setting chosen on validation and reported on test, accuracy-vs-retention fronts, and resume (finished
runs in --output_dir are reused).
"""

from __future__ import annotations

import argparse
import shlex


def add_parser(parser: argparse.ArgumentParser) -> None:
    from lopt.builtin.tasks import BUILTIN_TASKS
    from lopt.cli.eval import add_lm_eval_args
    from lopt.experiments.compare.spec import (
        ACCURACY_TARGETS,
        DEFAULT_GRPO_METHODS,
        DEFAULT_METHODS,
        METHOD_FLAGS,
        RETENTION_BUDGETS,
        TRAINERS,
    )

    parser.add_argument(
        "--trainer",
        choices=TRAINERS,
        default="sft",
        help="sft: every method is a `lopt sft` run from the base. grpo: every method is a `lopt grpo` run from one "
        "common SFT checkpoint of the task (made once with `lopt sft --method e2e` and --sft_args, kept in "
        "OUTPUT_DIR/start, or --start_checkpoint), so the methods differ in the RL phase alone.",
    )
    parser.add_argument(
        "--start_checkpoint",
        default=None,
        metavar="PATH",
        help="--trainer grpo: start every run from this checkpoint (one `lopt sft` wrote: its task and base are in "
        "its records) instead of the SFT run compare makes.",
    )
    parser.add_argument(
        "--grpo_args",
        default="",
        help='--trainer grpo: extra `lopt grpo` flags for every run, e.g. "--num_generations 4 --logging_steps 1".',
    )

    parser.add_argument(
        "--methods",
        default=None,
        help=f"Comma-separated, from {', '.join(METHOD_FLAGS)}; 'name@r' trains a LoPT method's early group at "
        f"r x the learning rate. Default {','.join(DEFAULT_METHODS)} (--trainer grpo: "
        f"{','.join(DEFAULT_GRPO_METHODS)}).",
    )
    parser.add_argument(
        "--lr_k1_ratios",
        default=None,
        help="Learning-rate study, e.g. 1,0.3,0.1: adds lopt@r for each ratio r != 1 (lr_k1 = r x lr).",
    )
    parser.add_argument(
        "--learning_rates",
        default=None,
        help="Sweep, e.g. 1e-4,3e-4,1e-3: every method at every rate (a LoPT 'name@r' trains its early group at "
        "r x each rate). Default: --learning_rate in --sft_args, else `lopt sft`'s default.",
    )
    parser.add_argument(
        "--method_learning_rates",
        action="append",
        default=[],
        metavar="NAME=LR,LR,...",
        help="A method's own grid, e.g. lora=1e-3,3e-3,1e-2 (LoRA usually needs ~10x the full-fine-tuning rate); "
        "NAME is a --methods entry or its base name. Repeat the flag for more methods.",
    )
    parser.add_argument("--seeds", type=int, default=None, help="Default 3 (1 with --quick).")
    parser.add_argument(
        "--max_steps",
        default=None,
        help="Step budgets, e.g. 300,900: one separate run per budget (each with `lopt sft`'s full schedule over "
        "its own budget). Default 300, the built-in sft budget (100 quick).",
    )
    parser.add_argument(
        "--eval_samples",
        type=int,
        default=None,
        help="Validation and test rows scored, each. Default 300 (100 quick).",
    )
    parser.add_argument(
        "--task",
        default=None,
        choices=list(BUILTIN_TASKS),
        help="A built-in task (passed to `lopt sft --task`). Default: successor for the built-in model, extract for a "
        "real base (e.g. --model_name_or_path smollm2-135m).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, short budget: a smoke run, not evidence."
    )
    parser.add_argument(
        "--model_name_or_path",
        default=None,
        help="Default: the built-in model and task. A real base (smollm2-135m) trains on its built-in task and is "
        "also scored on world knowledge kept and code perplexity (--world_knowledge); a user model needs "
        "--train_file.",
    )
    parser.add_argument("--train_file", default=None)
    parser.add_argument(
        "--eval_file", default=None, help="Test rows with answers: the task accuracy the report states."
    )
    parser.add_argument(
        "--validation_file",
        default=None,
        help="Validation rows with answers (disjoint from --eval_file): what a sweep's choices use.",
    )
    parser.add_argument(
        "--retention_file",
        default=None,
        help="Plain text for retention perplexity (documents split by blank lines; alternate documents go to "
        "the validation and the test side).",
    )
    parser.add_argument(
        "--retention_budgets",
        default=",".join(f"{b:g}" for b in RETENTION_BUDGETS),
        help="Retention-perplexity rises, as fractions of the base model's, for 'accuracy at matched retention'.",
    )
    parser.add_argument(
        "--accuracy_targets",
        default=",".join(f"{t:g}" for t in ACCURACY_TARGETS),
        help="Validation accuracies for 'retention at matched accuracy' and 'steps to reach an accuracy'.",
    )
    parser.add_argument(
        "--sft_args",
        default="",
        help='Extra `lopt sft` flags for every run, e.g. "--lr_k1 1e-4". --trainer grpo: the flags of the one SFT '
        'start run, e.g. "--max_steps 60 --learning_rate 1e-4".',
    )
    add_lm_eval_args(
        parser,
        default_help="Default: lopt_knowledge for the built-in model (when lm-eval is installed), none for a user's "
        "model; 'none' turns it off. Scored on the base model and after every run.",
    )
    parser.add_argument(
        "--world_knowledge",
        choices=("auto", "on", "off"),
        default="auto",
        help="Score knowledge kept (the share of the country questions the base answers right that each trained "
        "model still answers right, lopt.evaluation.world_knowledge) and code perplexity, with prose as the retention text. "
        "auto: on for a real base, off otherwise.",
    )
    parser.add_argument(
        "--output_dir",
        default="runs/compare",
        help="Finished runs already in it (same command, complete outputs) are reused: rerun to resume.",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Runs at once, each in its own worker process (training and scoring). On a GPU a small model leaves "
        "it mostly idle, so several runs share it well; on a CPU, 1 uses every core.",
    )
    parser.add_argument(
        "--extend_grid",
        type=int,
        default=None,
        help="When a method's rate chosen on validation is the lowest or highest of its grid (2+ rates), run up to "
        "this many more rates past that edge (3x apart) until the choice is interior; the report marks a method "
        "still at an edge. Default 2 (0 with --quick; 0: the grids as given).",
    )
    parser.add_argument(
        "--time_limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="No new run starts after this many seconds; the report covers the runs that finished (say how many), "
        "and seeds beyond the first go first to the settings the report reads. Rerun without it to complete.",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Train and score nothing: rebuild the report from the finished runs in --output_dir (e.g. of a sweep "
        "that was stopped); every rate with a finished run of a method's command joins its grid. Needs the "
        "compare_base.json an earlier compare wrote there.",
    )
    parser.add_argument("--no_progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lopt.cli.eval import lm_eval_options
    from lopt.experiments.compare.spec import DEFAULT_GRPO_METHODS, DEFAULT_METHODS, CompareSpec
    from lopt.experiments.compare.sweep import run_compare

    lm_eval = lm_eval_options(args)
    default_methods = DEFAULT_GRPO_METHODS if args.trainer == "grpo" else DEFAULT_METHODS
    methods = args.methods if args.methods is not None else ",".join(default_methods)
    spec = CompareSpec(
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        seeds=args.seeds if args.seeds is not None else (1 if args.quick else 3),
        max_steps=(
            _numbers("--max_steps", args.max_steps, int)
            if args.max_steps is not None
            else [100 if args.quick else 300]
        ),
        learning_rates=_numbers("--learning_rates", args.learning_rates) if args.learning_rates else None,
        method_learning_rates=_method_grids(args.method_learning_rates),
        eval_samples=args.eval_samples if args.eval_samples is not None else (100 if args.quick else 300),
        task=args.task,
        model_name_or_path=args.model_name_or_path,
        train_file=args.train_file,
        eval_file=args.eval_file,
        validation_file=args.validation_file,
        retention_file=args.retention_file,
        sft_args=shlex.split(args.sft_args),
        trainer=args.trainer,
        start_checkpoint=args.start_checkpoint,
        grpo_args=shlex.split(args.grpo_args),
        output_dir=args.output_dir,
        progress=not args.no_progress,
        lr_k1_ratios=_numbers("--lr_k1_ratios", args.lr_k1_ratios) if args.lr_k1_ratios else None,
        retention_budgets=tuple(_numbers("--retention_budgets", args.retention_budgets)),
        lm_eval_tasks=args.lm_eval_tasks,
        lm_eval_limit=lm_eval["limit"] if lm_eval["limit"] is not None else (100 if args.quick else None),
        lm_eval_batch_size=lm_eval["batch_size"],
        world_knowledge={"auto": None, "on": True, "off": False}[args.world_knowledge],
        accuracy_targets=tuple(_numbers("--accuracy_targets", args.accuracy_targets)),
        jobs=args.jobs,
        time_limit=args.time_limit,
        extend_grid=args.extend_grid if args.extend_grid is not None else (0 if args.quick else 2),
        report_only=args.report_only,
        command=getattr(args, "argv", None),
    )
    run_compare(spec)
    with open(f"{spec.output_dir}/report.md") as f:
        print(f.read())
    return 0


def _numbers(flag: str, text: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag} {text!r} must be comma-separated numbers, e.g. {flag} 1e-4,3e-4.")
    return values


def _method_grids(entries: list[str]) -> dict[str, list[float]]:
    grids = {}
    for entry in entries:
        name, sep, rates = entry.partition("=")
        if not sep or not name.strip():
            raise ValueError(
                f"--method_learning_rates {entry!r} must be NAME=LR,LR,..., e.g. lora=1e-3,3e-3,1e-2."
            )
        grids[name.strip()] = _numbers(f"--method_learning_rates {name.strip()}=", rates)
    return grids
