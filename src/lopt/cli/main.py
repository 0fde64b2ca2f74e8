"""`lopt` command line: one module per subcommand, each with `add_parser(subparsers)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module under lopt.cli; imported lazily so `lopt --help` stays fast.
COMMANDS = {
    "sft": "Post-train a causal LM with LoPT (or a baseline) on SFT data.",
    "bench": "Measure activation memory, peak memory and step time of E2E vs LoPT.",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lopt", description="LoPT: local-learning post-training for HF models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"lopt.cli.{name}")
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(f"lopt.cli.{args.command}")
    try:
        return module.run(args) or 0
    except (ValueError, TypeError, FileNotFoundError) as err:
        # User errors (UserError, config validation, unsupported models, missing files) are one line, exit 2.
        # LOPT_DEBUG=1 shows the traceback.
        if os.environ.get("LOPT_DEBUG"):
            raise
        print(f"lopt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
