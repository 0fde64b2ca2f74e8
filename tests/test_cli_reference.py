"""docs/CLI.md is every `lopt` command's --help as the parsers render it now: a flag added, removed or re-documented
without regenerating the page fails here."""

from __future__ import annotations

import os
import re
import sys

import pytest

from lopt.cli import reference
from lopt.cli.main import COMMANDS

PAGE = reference.DEFAULT_PATH


def recorded_python(page: str) -> tuple[int, int] | None:
    pattern = re.escape(reference.PYTHON_LINE).replace(r"\{\}", r"(\d+)")
    found = re.search(pattern, page)
    return (int(found.group(1)), int(found.group(2))) if found else None


def test_cli_page_is_current():
    assert PAGE.is_file(), f"{PAGE} is missing: run `{reference.REGENERATE}`"
    page = PAGE.read_text(encoding="utf-8")
    recorded = recorded_python(page)
    if recorded is not None and recorded != sys.version_info[:2]:
        pytest.skip(
            f"docs/CLI.md was rendered with Python {recorded[0]}.{recorded[1]}; argparse lays out help "
            f"differently on {sys.version_info[0]}.{sys.version_info[1]}"
        )
    # Compare command by command, so the failure names the first command whose help changed.
    rendered = reference.render()
    for title in ["lopt"] + [f"lopt {name}" for name in COMMANDS]:
        assert section(rendered, title) == section(page, title), (
            f"docs/CLI.md is stale: `{title} --help` changed. Regenerate it with `{reference.REGENERATE}`"
        )
    assert rendered == page, f"docs/CLI.md is stale. Regenerate it with `{reference.REGENERATE}`"


def section(page: str, title: str) -> str | None:
    """The text block under `## title`, or None when the page has no such section."""
    found = re.search(rf"^## {re.escape(title)}\n\n```text\n(.*?)\n```$", page, flags=re.S | re.M)
    return found.group(1) if found else None


def test_every_command_and_flag_is_on_the_page():
    """The page covers every command, and the width is fixed: a terminal of any size renders the same page."""
    page = reference.render()
    for title, parser in reference.command_parsers().items():
        text = section(page, title)
        assert text is not None, f"no section for {title}"
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text, f"{title}: {flag} is not in its section"
        assert f"](#{reference.anchor(title)})" in page


def test_rendering_ignores_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = reference.render()
    monkeypatch.setenv("COLUMNS", "200")
    assert reference.render() == narrow
    assert max(len(line) for line in section(narrow, "lopt eval").splitlines()) > 40
    assert os.environ["COLUMNS"] == "200"  # restored after rendering


def test_write_flag(tmp_path, capsys):
    target = tmp_path / "CLI.md"
    assert reference.main(["--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == reference.render()
    assert reference.main([]) == 0
    assert capsys.readouterr().out == target.read_text(encoding="utf-8")
