"""`lopt bench`: E2E vs LoPT (joint k=2, local k=2, local k=4), with and without gradient checkpointing.

Prints one table: peak bytes saved for backward, peak process memory, median step time, each with its ratio
to E2E, and each ratio against LoPT's goal for it (PASS/MISS); then the whole step part by part (weights, gradients, optimizer
states, activations, the step's peak) beside lopt plan's figure. See lopt.experiments.bench for how each number is
measured.
"""

from __future__ import annotations

import argparse
import sys

from lopt.experiments import bench, bench_race, bench_report
from lopt.experiments.shapes import shape_names
from lopt.io import atomic_write_json


def add_parser(parser: argparse.ArgumentParser) -> None:
    d = bench.BenchSpec.__dataclass_fields__
    g = parser.add_argument_group("model (random weights; Llama-shaped unless --model)")
    g.add_argument(
        "--model",
        default=None,
        metavar="NAME|config.json",
        help="a real architecture, no weights: a preset (" + ", ".join(shape_names()) + ") or a path to a "
        "Hugging Face config.json; replaces the shape flags below except --num_layers",
    )
    g.add_argument(
        "--num_layers",
        type=int,
        default=None,
        help="decoder layers (default: 16, or the model's full depth); with --model it cuts the depth, and the "
        "table adds lopt plan's full-depth figure",
    )
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
        "--steps",
        type=int,
        default=d["steps"].default,
        help="timed steps per config (default: %(default)s); 0: activation bytes only, one config in memory at a "
        "time (for real-size shapes on CPU)",
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
        help="subset to run (space or comma separated; default: every fused-head config; 'all' adds the plain HF "
        f"loss ones) from: {', '.join(bench.CONFIGS)}; +gcN in place of +gc checkpoints the earliest N layers only",
    )
    g.add_argument(
        "--peak_memory",
        choices=["auto", "off"],
        default="auto",
        help="auto: peak RSS of a fresh process per config on CPU, allocator peak on CUDA; off: skip",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument(
        "--activation_budget",
        default=None,
        metavar="MB|auto",
        help="instead of the table: for E2E, LoPT k=2 and k=4, freeze and LoRA, the fastest setting (GC off, on "
        "every layer, or for E2E on the fewest earliest layers that fit; micro-batch with gradient accumulation to "
        "--batch_size) whose activation peak fits MB; tokens/s as a ratio to E2E's best, one interleaved run. auto: "
        "0.6 x E2E's no-GC peak at micro-batch 1 (E2E needs GC, LoPT k=2 does not)",
    )
    g.add_argument("--json", metavar="OUT.json", help="also write every measurement to this file")
    g.add_argument("--markdown", action="store_true", help="print the table as markdown")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    configs = [c for item in args.configs for c in item.split(",") if c]
    if configs == ["all"]:
        configs = list(bench.CONFIGS)
    spec = bench.BenchSpec(
        model=args.model,
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
    if args.activation_budget is not None:
        return run_race(args, spec, log)
    rows = bench.run_benchmark(spec, configs, log=log)
    targets = bench.check_targets(rows)
    print(bench_report.describe_spec(spec))
    print()
    print(bench_report.format_table(rows, markdown=args.markdown))
    print()
    print(bench_report.format_targets(targets))
    if any(row.get("whole_step") for row in rows):
        print()
        print(
            bench_report.format_whole_step(
                rows, bench_report.planned_step_bytes(spec, rows, log), markdown=args.markdown
            )
        )
    if spec.model is not None and spec.num_layers < spec.full_num_layers:
        print()
        print(bench_report.full_depth_table(spec, rows, log))
    if args.json:
        atomic_write_json(args.json, {"spec": vars(spec), "rows": rows, "targets": targets})
        print(f"\nwrote {args.json}")
    return 0


def run_race(args: argparse.Namespace, spec: bench.BenchSpec, log) -> int:
    budget = args.activation_budget
    if budget != "auto":
        try:
            budget = float(budget)
        except ValueError:
            raise ValueError(f"--activation_budget {budget!r} must be a number of MB or auto.") from None
        if budget <= 0:
            raise ValueError(f"--activation_budget must be > 0 MB, got {budget}.")
    race = bench_race.budget_race(spec, None if budget == "auto" else budget, log=log)
    print(bench_report.describe_spec(spec))
    print()
    print(bench_race.format_race(race, markdown=args.markdown))
    if args.json:
        atomic_write_json(
            args.json, {"spec": vars(spec), "race": race, "targets": bench_race.race_targets(race)}
        )
        print(f"\nwrote {args.json}")
    return 0
