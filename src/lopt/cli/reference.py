"""The command-line reference (docs/CLI.md): every `lopt` command's --help, rendered from the parsers themselves.

    python -m lopt.cli.reference            # print the markdown
    python -m lopt.cli.reference --write    # rewrite docs/CLI.md (tests/test_cli_reference.py fails when it is stale)

The help is wrapped at a fixed width, whatever the terminal, so the page is the same on every machine with the
same Python minor version (argparse's layout changes between versions, and the page records the one it used).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lopt.cli.main import COMMANDS, TRAINING_COMMANDS, make_parser

# argparse wraps help at $COLUMNS - 2 characters.
COLUMNS = 100
# docs/CLI.md of a source checkout (src/lopt/cli/reference.py -> the repository root).
DEFAULT_PATH = Path(__file__).resolve().parents[3] / "docs" / "CLI.md"
REGENERATE = "python -m lopt.cli.reference --write"
PYTHON_LINE = "Rendered with Python {}.{}"


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """'lopt' and every 'lopt COMMAND' -> the parser that reads its flags, in the order `lopt --help` lists them."""
    main_parser, subparsers = make_parser()
    parsers = {"lopt": main_parser}
    for name in COMMANDS:
        if name in TRAINING_COMMANDS:  # TRL's parser, built by the command's module (main.py only names it)
            parsers[f"lopt {name}"] = importlib.import_module(f"lopt.cli.{name}").make_parser()
        else:
            parsers[f"lopt {name}"] = subparsers[name]
    return parsers


@contextlib.contextmanager
def fixed_terminal() -> Iterator[None]:
    """A fixed help width and no colour (Python 3.14's argparse colours help for terminals), restored after."""
    wanted = {"COLUMNS": str(COLUMNS), "NO_COLOR": "1", "PYTHON_COLORS": "0"}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def anchor(title: str) -> str:
    """GitHub's anchor for a heading `lopt sft`: lower case, spaces to hyphens."""
    return title.lower().replace(" ", "-")


def render() -> str:
    """The whole page: a header, a table of contents, then each command's --help in a text block."""
    with fixed_terminal():
        helps = {title: parser.format_help() for title, parser in command_parsers().items()}
    lines = [
        "# lopt command-line reference",
        "",
        f"Every command's `--help`, generated from the parsers by `{REGENERATE}`; do not edit by hand.",
        f"{PYTHON_LINE.format(*sys.version_info[:2])}, at {COLUMNS} columns. The training commands (`sft`, `grpo`, "
        "`dpo`) take every field of TRL's config as a flag, and `--config recipe.yaml` as `trl sft` does.",
        "",
    ]
    for title in helps:
        lines.append(f"- [`{title}`](#{anchor(title)})")
    for title, text in helps.items():
        lines += ["", f"## {title}", "", "```text", text.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lopt.cli.reference", description="Render every lopt command's --help as markdown."
    )
    parser.add_argument(
        "--write",
        nargs="?",
        const=str(DEFAULT_PATH),
        default=None,
        metavar="PATH",
        help=f"write the page to PATH (default {DEFAULT_PATH}) instead of printing it",
    )
    args = parser.parse_args(argv)
    page = render()
    if args.write is None:
        sys.stdout.write(page)
    else:
        Path(args.write).write_text(page, encoding="utf-8")
        print(f"wrote {args.write} ({len(page.encode())} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
