"""`lopt eval`: task accuracy (greedy, exact match on held-out rows), retention (held-out perplexity) and, with
--lm_eval_tasks, lm-evaluation-harness tasks, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from lopt.errors import UserError


def add_parser(parser: argparse.ArgumentParser) -> None:
    from lopt.builtin.tasks import BUILTIN_TASKS

    parser.add_argument(
        "--model_name_or_path", default=None, help="Checkpoint to score. Default: the built-in model."
    )
    parser.add_argument("--trust_remote_code", action="store_true")
    g = parser.add_argument_group(
        "task data (default: the test split of the model's own task: the one a checkpoint of lopt sft/grpo/dpo was "
        "trained on, from its lopt_args.json; extract for a real base such as smollm2-135m; the built-in task for "
        "the built-in model)"
    )
    g.add_argument(
        "--task",
        default=None,
        choices=list(BUILTIN_TASKS),
        help="A built-in task's test split instead of the model's own (e.g. --task totals on a real base).",
    )
    g.add_argument(
        "--train_file", default=None, help="Rows with prompt + answer, in any format `lopt sft` reads."
    )
    g.add_argument("--dataset_name", default=None)
    g.add_argument("--dataset_config", default=None)
    g.add_argument("--split", default="test")
    g.add_argument("--max_samples", type=int, default=200)
    g.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="Default: 32, or the built-in task's own (extract: 64, totals: 48).",
    )
    g = parser.add_argument_group("retention")
    g.add_argument(
        "--retention_file",
        default=None,
        help="Plain-text file of pretraining-like text. Default: the built-in model's held-out split (built-in "
        "task only); English prose (CPython's pydoc topics) for a real base.",
    )
    g.add_argument("--retention_seq_len", type=int, default=256)
    add_lm_eval_args(parser)
    parser.add_argument("--output_file", default=None, help="Also write the JSON here.")
    parser.add_argument("--no_progress", action="store_true")


def add_lm_eval_args(parser: argparse.ArgumentParser, default_help: str = "Default: none.") -> None:
    """lm-evaluation-harness flags, shared with `lopt compare`."""
    from lopt.evaluation.lm_eval_tasks import INSTALL_HINT, KNOWLEDGE_TASK, WORLD_KNOWLEDGE_TASK

    g = parser.add_argument_group(f"lm-evaluation-harness (optional: {INSTALL_HINT})")
    g.add_argument(
        "--lm_eval_tasks",
        default=None,
        help="Comma-separated lm-eval tasks, groups or tags (e.g. hellaswag,arc_easy,mmlu), folders of task YAMLs "
        f"(local tasks), {KNOWLEDGE_TASK} (the built-in model's knowledge-retention probe) or {WORLD_KNOWLEDGE_TASK} "
        "(country facts a real base such as smollm2-135m knows, asked in its chat format). " + default_help,
    )
    g.add_argument(
        "--lm_eval_limit",
        type=float,
        default=None,
        help="Documents per task (lm-eval's --limit; a value below 1 is a fraction). Default: all (compare "
        "--quick: 100).",
    )
    g.add_argument(
        "--lm_eval_batch_size", default="16", help="lm-eval's --batch_size: a number, or 'auto' (GPU)."
    )


def lm_eval_options(args: argparse.Namespace) -> dict:
    """The lm-eval flags as `lopt.evaluation.lm_eval_tasks.run_lm_eval` keywords, checked before any model is loaded."""
    limit = args.lm_eval_limit
    if limit is not None and not limit > 0:
        raise ValueError(f"--lm_eval_limit {limit:g} must be > 0 (a count, or a fraction below 1).")
    batch_size = args.lm_eval_batch_size
    if not (batch_size.startswith("auto") or (batch_size.isdigit() and int(batch_size) > 0)):
        raise ValueError(f"--lm_eval_batch_size {batch_size!r} must be a positive integer or 'auto'.")
    return {
        "limit": int(limit) if limit is not None and limit >= 1 else limit,
        "batch_size": int(batch_size) if batch_size.isdigit() else batch_size,
    }


def run(args: argparse.Namespace) -> int:
    from lopt.builtin.tasks import task_max_new_tokens
    from lopt.data.loading import load_model_and_tokenizer
    from lopt.evaluation.evaluate import (
        evaluate_checkpoint,
        load_task_rows,
        read_retention_file,
        scoring_defaults,
    )
    from lopt.io import atomic_write_json

    lm_eval_tasks = None
    if args.lm_eval_tasks and args.lm_eval_tasks != "none":
        from lopt.evaluation.lm_eval_tasks import resolve_tasks

        lm_eval_kwargs = lm_eval_options(args)
        lm_eval_tasks = resolve_tasks(args.lm_eval_tasks)  # a bad flag fails now, not after the evaluation
    builtin_data = args.train_file is None and args.dataset_name is None
    if args.task is not None and not builtin_data:
        raise UserError(
            f"--task {args.task} and --train_file/--dataset_name are exclusive: give one source of rows."
        )
    task, base = None, None
    if builtin_data:  # the model's own task and base, from its records; said, since the user named none
        defaults = scoring_defaults(args.model_name_or_path)
        task, base = args.task or defaults.task, defaults.base
        scored = (
            f"scoring task {task}" if task else "no task accuracy (give --train_file to score held-out rows)"
        )
        print(f"lopt eval: {scored}: {'--task' if args.task else defaults.reason}", file=sys.stderr)
    rows, match = None, None
    if not builtin_data or task is not None:
        rows, match = load_task_rows(
            args.train_file, args.dataset_name, args.dataset_config, args.split, args.max_samples, task=task
        )
    retention = None
    if args.retention_file is not None:
        retention = read_retention_file(args.retention_file)
    elif builtin_data and base.retention == "corpus":
        from lopt.builtin.base import retention_texts

        retention = retention_texts()
    elif builtin_data:  # a real base, or any other language model: English prose
        from lopt.evaluation.world_knowledge import prose_texts

        retention = prose_texts()
    model, tokenizer, path = load_model_and_tokenizer(args.model_name_or_path, args.trust_remote_code)
    result = evaluate_checkpoint(
        model,
        tokenizer,
        rows,
        retention,
        match=match,
        max_new_tokens=args.max_new_tokens or (task_max_new_tokens(task) if task else 32),
        retention_seq_len=args.retention_seq_len,
        progress=not args.no_progress,
    )
    result = {"model": path, "task": task if builtin_data else "custom", **result}
    if lm_eval_tasks:
        from lopt.evaluation.lm_eval_tasks import run_lm_eval

        del model  # lm-eval loads the checkpoint itself
        result["lm_eval"] = run_lm_eval(
            path, lm_eval_tasks, trust_remote_code=args.trust_remote_code, **lm_eval_kwargs
        )
    if args.output_file:
        atomic_write_json(args.output_file, result)
    print(json.dumps(result, indent=2))
    return 0
