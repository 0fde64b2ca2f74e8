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
            bench_report.format_whole_step(rows, planned_step_bytes(spec, rows, log), markdown=args.markdown)
        )
    if spec.model is not None and spec.num_layers < spec.full_num_layers:
        print()
        print(full_depth_table(spec, rows, log))
    if args.json:
        atomic_write_json(args.json, {"spec": vars(spec), "rows": rows, "targets": targets})
        print(f"\nwrote {args.json}")
    return 0


def planned_step_bytes(spec: bench.BenchSpec, rows: list[dict], log=None) -> dict[str, int | None]:
    """lopt plan's whole-step total (single GPU) for each measured config at the measured depth; None where the
    planner does not plan that config (not in its PLAN_METHODS), and nothing in bfloat16, where its precision is not
    what bench trains (the plan keeps fp32 master weights and AdamW state, bench trains bf16 weights directly)."""
    from lopt.experiments import plan

    if spec.dtype != "float32":
        return {}
    out: dict[str, int | None] = {}
    for row in rows:
        name = row["name"]
        selective = bench.config_of(name).gc_layers is not None
        if name not in plan.PLAN_METHODS and not selective:  # not planned (yet): no figure beside it
            out[name] = None
            continue
        try:
            planned = plan.make_plan(
                spec.model_config(), spec.seq_len, spec.batch_size, spec.dtype, methods=[name]
            )
        except (KeyError, ValueError, NotImplementedError) as err:  # a config the planner does not know (yet)
            if log:
                log(f"[bench] lopt plan has no figure for {name}: {err}")
            out[name] = None
            continue
        out[name] = planned["rows"][0]["total"]["single"]
    return out


def full_depth_table(spec: bench.BenchSpec, rows: list[dict], log=None) -> str:
    """--num_layers cut the depth: lopt plan's figure at the measured depth (it must equal the measurement)
    and at the model's full depth, with E2E's per-layer and fixed (embedding, LM head, loss) terms."""
    from lopt.experiments import plan
    from lopt.experiments.shapes import load_shape

    cut, full = spec.model_config(), load_shape(spec.model)
    lines = [
        f"Full depth ({spec.full_num_layers} layers) from lopt plan, checked against the measurement at "
        f"{spec.num_layers} layers:",
        "| config | measured MB | plan MB (same depth) | plan MB (full depth) | x E2E | per layer MB | fixed MB |",
        "|---|---|---|---|---|---|---|",
    ]
    full_bytes = {}
    for row in rows:
        config = bench.config_of(row["name"])
        if config.aux_objective != "recon":
            continue  # the anchor's frozen copy is not planned
        if log:
            log(f"[bench] planning {row['name']} at {spec.num_layers} and {spec.full_num_layers} layers")
        name = row["name"].replace("+oib", "")  # the step in the backward changes no activation
        same = plan.activation_bytes(cut, name, spec.batch_size, spec.seq_len, spec.dtype)
        at_full = plan.activation_bytes(full, name, spec.batch_size, spec.seq_len, spec.dtype)
        full_bytes[row["name"]] = at_full
        per_layer = fixed = "—"
        if config.backward is None:  # E2E: affine in depth, so two shallow steps give both terms
            one = plan.activation_bytes(
                plan.with_depth(full, 1), name, spec.batch_size, spec.seq_len, spec.dtype
            )
            two = plan.activation_bytes(
                plan.with_depth(full, 2), name, spec.batch_size, spec.seq_len, spec.dtype
            )
            per_layer, fixed = f"{(two - one) / bench.MB:.1f}", f"{(2 * one - two) / bench.MB:.1f}"
        row.update(plan_same_depth_bytes=same, plan_full_depth_bytes=at_full)
        e2e = "e2e" + ("-hf" if config.head == "hf" else "") + ("+gc" if config.gc else "")
        ratio = at_full / full_bytes[e2e] if e2e in full_bytes else None
        lines.append(
            f"| {row['label']}{' + GC' if config.gc else ''} | {row['act_peak_bytes'] / bench.MB:.1f} | "
            f"{same / bench.MB:.1f} | {at_full / bench.MB:.1f} | {'—' if ratio is None else f'{ratio:.2f}'} | "
            f"{per_layer} | {fixed} |"
        )
    worst = max(
        (
            abs(r["plan_same_depth_bytes"] - r["act_peak_bytes"]) / r["act_peak_bytes"]
            for r in rows
            if "plan_same_depth_bytes" in r
        ),
        default=0.0,
    )
    verdict = "PASS" if worst <= 0.01 else "MISS"
    lines.append(
        f"\n[{verdict}] plan == measured at {spec.num_layers} layers within 1%: largest difference {worst:.2%}"
    )
    return "\n".join(lines)


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
