"""`lopt plan`: memory of one training step of E2E and LoPT (k=2, k=4; each with and without the optimizer step in
the backward, "+oib", and activation checkpointing, "+gc") for any model size, without allocating it.

Prints one table: activation bytes (a fake-tensor step through lopt bench's meter), and the step's peak: weights,
AdamW states, and the gradients and activations alive at the step's worst moment (named), on one GPU, or DDP and
FSDP over --num_gpus; with --gpu_memory what fits and the largest micro-batch at --seq_len, then a listing of
every method and setting that fits, fastest first by planned step time (FLOP counts, lopt.experiments.plan_fit),
or, where nothing fits, how many GPUs each method needs under FSDP. See lopt.experiments.plan for how each memory
number is computed.
"""

from __future__ import annotations

import argparse
import sys
import time

from lopt.experiments import plan, plan_fit
from lopt.experiments.shapes import load_shape, shape_names
from lopt.io import atomic_write_json


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME|config.json",
        help="a preset (" + ", ".join(shape_names()) + ") or a path to a Hugging Face config.json",
    )
    parser.add_argument(
        "--seq_len", type=int, default=4096, help="tokens per sequence (default: %(default)s)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=1, help="micro-batch per GPU (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype",
        choices=list(plan.PRECISIONS),
        default="bfloat16",
        help="training precision: bfloat16 (fp32 master weights and AdamW states) or float32 (default: %(default)s)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(plan.PLAN_METHODS),
        metavar="METHOD",
        help="space or comma separated; any of them with +oib (optimizer step in the backward) or +gc "
        "(activation checkpointing; e2e and lora also +gcN: the earliest N layers), and the other lopt bench "
        "configurations (default: %(default)s)",
    )
    parser.add_argument(
        "--num_gpus", type=int, default=1, help="data-parallel GPUs: DDP and FSDP (default: 1)"
    )
    parser.add_argument(
        "--gpu_memory",
        default=None,
        metavar="SIZE",
        help="memory per GPU, e.g. 80GB: what fits and its largest micro-batch, then every method and setting "
        "that fits, fastest first by planned FLOPs (or, if none fits, the GPUs each needs under FSDP)",
    )
    parser.add_argument("--json", metavar="OUT.json", help="also write the plan to this file")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    config = load_shape(args.model)
    methods = [m for item in args.methods for m in item.split(",") if m]
    gpu_memory = None if args.gpu_memory is None else plan.parse_memory(args.gpu_memory)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = plan.make_plan(
        config,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
        methods=methods,
        num_gpus=args.num_gpus,
        gpu_memory=gpu_memory,
        log=log,
    )
    result["model"] = args.model
    result["seconds"] = time.perf_counter() - start
    print(
        f"{args.model} ({config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}); micro-batch {args.batch_size} x seq {args.seq_len}, {args.dtype}; "
        f"planned in {result['seconds']:.1f} s"
    )
    print()
    print(plan.format_plan(result, markdown=args.markdown))
    if gpu_memory is not None:
        result["fit"] = plan_fit.fit_listing(config, result)
        print()
        print(plan_fit.format_fit(result["fit"], result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0
