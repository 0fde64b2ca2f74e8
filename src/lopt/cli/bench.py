"""`lopt bench`: E2E vs LoPT (joint k=2, local k=2, local k=4), with and without gradient checkpointing.

Prints one table: peak bytes saved for backward, peak process memory, median step time, each with its ratio
to E2E, and the issue's targets as PASS/MISS. See lopt.bench for how each number is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lopt import bench


def add_parser(parser: argparse.ArgumentParser) -> None:
    d = bench.BenchSpec.__dataclass_fields__
    g = parser.add_argument_group("model (Llama-shaped, random weights)")
    g.add_argument("--num_layers", type=int, default=d["num_layers"].default, help="(default: %(default)s)")
    g.add_argument("--hidden_size", type=int, default=d["hidden_size"].default, help="(default: %(default)s)")
    g.add_argument(
        "--intermediate_size", type=int, default=d["intermediate_size"].default, help="(default: %(default)s)"
    )
    g.add_argument("--num_heads", type=int, default=d["num_heads"].default, help="(default: %(default)s)")
    g.add_argument("--vocab_size", type=int, default=d["vocab_size"].default, help="(default: %(default)s)")
    g = parser.add_argument_group("data and repeats (random tokens, same seed and weights for every config)")
    g.add_argument("--seq_len", type=int, default=d["seq_len"].default, help="(default: %(default)s)")
    g.add_argument("--batch_size", type=int, default=d["batch_size"].default, help="(default: %(default)s)")
    g.add_argument(
        "--steps", type=int, default=d["steps"].default, help="timed steps per config (default: %(default)s)"
    )
    g.add_argument(
        "--warmup",
        type=int,
        default=d["warmup"].default,
        help="untimed steps per config (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=d["seed"].default, help="(default: %(default)s)")
    g = parser.add_argument_group("run")
    g.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=d["dtype"].default, help="(default: %(default)s)"
    )
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument(
        "--configs",
        nargs="+",
        default=list(bench.DEFAULT_CONFIGS),
        metavar="CONFIG",
        help=f"subset to run (space or comma separated; default: all) from: {', '.join(bench.CONFIGS)}",
    )
    g.add_argument(
        "--peak_memory",
        choices=["auto", "off"],
        default="auto",
        help="auto: peak RSS of a fresh process per config on CPU, allocator peak on CUDA; off: skip",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--json", metavar="OUT.json", help="also write every measurement to this file")
    g.add_argument("--markdown", action="store_true", help="print the table as markdown")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    configs = [c for item in args.configs for c in item.split(",") if c]
    if configs == ["all"]:
        configs = list(bench.DEFAULT_CONFIGS)
    spec = bench.BenchSpec(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_heads=args.num_heads,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        peak_memory=args.peak_memory,
        threads=args.threads,
    )
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = bench.run_benchmark(spec, configs, log=log)
    targets = bench.check_targets(rows)
    print(bench.describe_spec(spec))
    print()
    print(bench.format_table(rows, markdown=args.markdown))
    print()
    print(bench.format_targets(targets))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"spec": vars(spec), "rows": rows, "targets": targets}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0
