"""`lopt` command line, one module per subcommand.

The training commands (sft, grpo, dpo) parse their own flags with TRL's parser (`lopt.cli.parser`): each module has
`make_parser()` and `main(argv)`. The others (compare, eval, bench) have `add_parser(subparser)` and `run(args)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lopt.training.launch import (
    LaunchRequired,
    is_lost_peer,
    launch_local,
    record_rank_error,
    wait_after_lost_peer,
    world_size,
)

# Commands parsed by TRL's parser: their modules are imported only when run, so `lopt --help` stays fast.
TRAINING_COMMANDS = {"sft", "grpo", "dpo"}
# subcommand -> module under lopt.cli; imported lazily so `lopt --help` stays fast.
COMMANDS = {
    "sft": "Post-train a causal LM with LoPT (or a baseline) on SFT data.",
    "grpo": "On-policy GRPO with LoPT (or a baseline) and verifiable rewards.",
    "dpo": "Direct Preference Optimization with LoPT (or a baseline) on preference pairs.",
    "compare": "Train every method side by side; report memory, time, accuracy and retention.",
    "eval": "Score a checkpoint: held-out task accuracy and retention perplexity.",
    "bench": "Measure activation memory, peak memory and step time of E2E vs LoPT.",
    "plan": "Plan the memory of E2E vs LoPT for any model size and GPU count, without allocating it.",
    "download": "Convert a real pretrained base (e.g. smollm2-135m) once into lopt's cache; print its path.",
}


def make_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="lopt", description="LoPT: local-learning post-training for HF models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    subparsers = {}
    for name, help_text in COMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name not in TRAINING_COMMANDS:
            importlib.import_module(f"lopt.cli.{name}").add_parser(subparsers[name])
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINING_COMMANDS:
        command = argv[0]
        try:
            return _run_user_facing(
                command, lambda: importlib.import_module(f"lopt.cli.{command}").main(argv[1:])
            )
        except LaunchRequired as launch:  # e.g. `lopt sft --block_parallel` started as one process
            return launch_local(launch.nproc, ["-m", "lopt", *argv])
    # The other commands have no --config: YAML recipes belong to the training commands (TRL's parser).
    parser, _ = make_parser()
    args = parser.parse_args(argv)
    # What the user typed, for a command that records how its output was made (compare's results.json).
    args.argv = list(argv)
    module = importlib.import_module(f"lopt.cli.{args.command}")
    return _run_user_facing(args.command, lambda: module.run(args))


def _run_user_facing(command: str, run) -> int:
    """User errors (UserError, config validation, unsupported models, missing files) are one line, exit 2.
    LOPT_DEBUG=1 shows the traceback."""
    try:
        return run() or 0
    except (ValueError, TypeError, FileNotFoundError) as err:
        if os.environ.get("LOPT_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        line = f"lopt {command}: error: {message}"
        print(line, file=sys.stderr, flush=True)
        record_rank_error(line)  # under torchrun: the launcher's report names this line
        return 2
    except RuntimeError as err:
        if world_size() <= 1 or not is_lost_peer(err) or os.environ.get("LOPT_DEBUG"):
            raise
        rank = os.environ.get("RANK", "?")
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(
            f"lopt {command}: error: rank {rank} lost contact with another rank, which stopped first (the launcher "
            f"names it and its error) [{first}]",
            file=sys.stderr,
            flush=True,
        )
        wait_after_lost_peer()  # let the launcher see the failing rank first; it stops this one
        return 1


if __name__ == "__main__":
    sys.exit(main())
