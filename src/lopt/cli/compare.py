"""`lopt compare`: every method on the same model, data, budget and seeds; results.json, report.md, plots."""

from __future__ import annotations

import argparse
import shlex


def add_parser(parser: argparse.ArgumentParser) -> None:
    from lopt.cli.eval import add_lm_eval_args
    from lopt.compare import DEFAULT_METHODS, METHOD_FLAGS

    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"Comma-separated, from {', '.join(METHOD_FLAGS)}; 'name@r' trains a LoPT method's early group at "
        "r x the learning rate.",
    )
    parser.add_argument(
        "--lr_k1_ratios",
        default=None,
        help="Learning-rate study, e.g. 1,0.3,0.1: adds lopt@r for each ratio r != 1 (lr_k1 = r x lr).",
    )
    parser.add_argument("--seeds", type=int, default=None, help="Default 3 (1 with --quick).")
    parser.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="Training steps per run. Default 300, the built-in sft budget (100 quick).",
    )
    parser.add_argument(
        "--eval_samples", type=int, default=None, help="Held-out rows scored. Default 300 (100 quick)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, short budget: a smoke run, not evidence."
    )
    parser.add_argument("--model_name_or_path", default=None, help="Default: the built-in model and task.")
    parser.add_argument("--train_file", default=None)
    parser.add_argument("--eval_file", default=None, help="Held-out rows with answers, for task accuracy.")
    parser.add_argument("--retention_file", default=None, help="Plain text for retention perplexity.")
    parser.add_argument(
        "--sft_args", default="", help='Extra `lopt sft` flags for every run, e.g. "--lr_k1 1e-4".'
    )
    add_lm_eval_args(
        parser,
        default_help="Default: lopt_knowledge for the built-in model (when lm-eval is installed), none for a user's "
        "model; 'none' turns it off. Scored on the base model and after every run.",
    )
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--no_progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lopt.cli.eval import lm_eval_options
    from lopt.compare import CompareSpec, run_compare

    lm_eval = lm_eval_options(args)

    spec = CompareSpec(
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        seeds=args.seeds if args.seeds is not None else (1 if args.quick else 3),
        max_steps=args.max_steps if args.max_steps is not None else (100 if args.quick else 300),
        eval_samples=args.eval_samples if args.eval_samples is not None else (100 if args.quick else 300),
        model_name_or_path=args.model_name_or_path,
        train_file=args.train_file,
        eval_file=args.eval_file,
        retention_file=args.retention_file,
        sft_args=shlex.split(args.sft_args),
        output_dir=args.output_dir,
        progress=not args.no_progress,
        lr_k1_ratios=_ratios(args.lr_k1_ratios),
        lm_eval_tasks=args.lm_eval_tasks,
        lm_eval_limit=lm_eval["limit"] if lm_eval["limit"] is not None else (100 if args.quick else None),
        lm_eval_batch_size=lm_eval["batch_size"],
    )
    run_compare(spec)
    with open(f"{spec.output_dir}/report.md") as f:
        print(f.read())
    return 0


def _ratios(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(
            f"--lr_k1_ratios {text!r} must be comma-separated numbers, e.g. 1,0.3,0.1."
        ) from None
