"""`lopt eval`: task accuracy (greedy, exact match on held-out rows) and retention (held-out perplexity), as JSON."""

from __future__ import annotations

import argparse
import json


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model_name_or_path", default=None, help="Checkpoint to score. Default: the built-in model."
    )
    parser.add_argument("--trust_remote_code", action="store_true")
    g = parser.add_argument_group("task data (default: the built-in task's held-out split)")
    g.add_argument(
        "--train_file", default=None, help="Rows with prompt + answer, in any format `lopt sft` reads."
    )
    g.add_argument("--dataset_name", default=None)
    g.add_argument("--dataset_config", default=None)
    g.add_argument("--split", default="test")
    g.add_argument("--max_samples", type=int, default=200)
    g.add_argument("--max_new_tokens", type=int, default=32)
    g = parser.add_argument_group("retention")
    g.add_argument(
        "--retention_file",
        default=None,
        help="Plain-text file of pretraining-like text. Default: the built-in model's held-out split (built-in "
        "task only).",
    )
    g.add_argument("--retention_seq_len", type=int, default=256)
    parser.add_argument("--output_file", default=None, help="Also write the JSON here.")
    parser.add_argument("--no_progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lopt.evaluate import evaluate_checkpoint, load_task_rows, read_retention_file
    from lopt.io import atomic_write_json
    from lopt.loading import load_model_and_tokenizer

    rows, match = load_task_rows(
        args.train_file, args.dataset_name, args.dataset_config, args.split, args.max_samples
    )
    builtin_data = args.train_file is None and args.dataset_name is None
    retention = None
    if args.retention_file is not None:
        retention = read_retention_file(args.retention_file)
    elif builtin_data:
        from lopt.builtin import retention_texts

        retention = retention_texts()
    model, tokenizer, path = load_model_and_tokenizer(args.model_name_or_path, args.trust_remote_code)
    result = evaluate_checkpoint(
        model,
        tokenizer,
        rows,
        retention,
        match=match,
        max_new_tokens=args.max_new_tokens,
        retention_seq_len=args.retention_seq_len,
        progress=not args.no_progress,
    )
    result = {"model": path, **result}
    if args.output_file:
        atomic_write_json(args.output_file, result)
    print(json.dumps(result, indent=2))
    return 0
