"""The README stays a front page, and what it shows works: its size, its two set-up commands (the ones CI and
scripts/ run), its code (imports that resolve, flags the parsers accept), and every relative link in it and in docs/."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_BYTES = 12_000
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def commands(block: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if line:
            found.append(" ".join(line.split()))
    return found


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, (
        f"README.md is {size} bytes, over {MAX_README_BYTES}: move details into docs/ and link them"
    )


def quickstart_commands() -> list[str]:
    """The commands of the README's first shell block that runs scripts/: the set-up commands."""
    for block in code_blocks(README.read_text(encoding="utf-8"), "bash"):
        if "bash scripts/" in block:
            return commands(block)
    raise AssertionError("README.md has no ```bash block with the `bash scripts/...` set-up commands")


def test_setup_commands_are_the_ones_ci_and_scripts_run():
    setup = quickstart_commands()
    assert len(setup) == 2, (
        f"the README's quick start should show two commands (main job, tests), not {setup}"
    )
    main_job, tests = setup
    ci = [c for c in commands((ROOT / ".ci" / "run").read_text()) if c.startswith("bash ")]
    assert ci == [tests], f".ci/run runs {ci}; the README's test command is {tests!r}"
    for command in setup:
        script = ROOT / shlex.split(command)[1]
        assert command.startswith("bash scripts/") and script.is_file(), f"{command!r}: no such script"
    # The main job's script names that command in its header, so the two cannot drift apart unnoticed.
    header = (ROOT / shlex.split(main_job)[1]).read_text().splitlines()[:5]
    assert any(f"`{main_job}`" in line for line in header), (
        f"{shlex.split(main_job)[1]} does not name the README's main job `{main_job}` in its header"
    )
    words = shlex.split(main_job)
    if words[1] == "scripts/lopt.sh":
        from lopt.cli.main import COMMANDS

        assert words[2] in COMMANDS, f"{main_job!r}: {words[2]!r} is not a lopt command"


def test_readme_python_names_exist():
    """Every `from lopt... import X` and `lopt.X` in the README's Python blocks exists."""
    blocks = code_blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks, "README.md shows no Python"
    checked = 0
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "lopt":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), (
                        f"README: `from {node.module} import {alias.name}` fails"
                    )
                    checked += 1
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "lopt"
            ):
                assert hasattr(importlib.import_module("lopt"), node.attr), (
                    f"README: `lopt.{node.attr}` does not exist"
                )
                checked += 1
    assert checked >= 3


# Pages whose shell blocks must run as written today (EVIDENCE.md keeps commands as they were run).
GUIDES = [
    "README.md",
    "docs/TRAINING.md",
    "docs/COMPARE.md",
    "docs/BENCHMARKS.md",
    "docs/DISTRIBUTED.md",
]


@pytest.mark.parametrize("guide", GUIDES)
def test_documented_lopt_flags_exist(guide):
    """Every `lopt COMMAND --flag` in a guide's shell blocks is a flag of that command's parser."""
    from lopt.cli.reference import command_parsers

    parsers = command_parsers()
    checked = 0
    for block in code_blocks((ROOT / guide).read_text(encoding="utf-8"), "bash"):
        for command in commands(block):
            words = shlex.split(command)
            for i, word in enumerate(words[:-1]):
                title = f"lopt {words[i + 1]}"
                if Path(word).name == "lopt" and title in parsers:
                    known = {flag for action in parsers[title]._actions for flag in action.option_strings}
                    for flag in (w.split("=")[0] for w in words[i + 2 :] if w.startswith("--")):
                        assert flag in known, f"{guide}: `{title}` has no flag {flag}"
                        checked += 1
    if guide == "README.md":
        assert checked >= 10


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    text = FENCE.sub("", markdown.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        anchor = github_anchor(heading)
        found.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    """Files and images a page links exist, and so do the headings its #anchors name."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no file {linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: " + "; ".join(broken)


def test_anchor_rule():
    assert github_anchor("`lopt plan`: memory for any size, without allocating it") == (
        "lopt-plan-memory-for-any-size-without-allocating-it"
    )
    assert (
        github_anchor("An earlier run (3 seeds × 300 steps, lr 1e-3)")
        == "an-earlier-run-3-seeds--300-steps-lr-1e-3"
    )
    assert (
        github_anchor("Activation memory at the Qwen2.5-0.5B shape")
        == "activation-memory-at-the-qwen25-05b-shape"
    )
