#!/usr/bin/env python3
"""Re-lay src/lopt out as one subpackage per layer (issue 26, part 1).  Re-runnable on the newest main.

PENDING MIGRATION, not part of the product: it was written and checked on a clone of main (0db56a8) while other work
was still landing, and has not been run on main yet. Run it on a clean main, run the whole suite, commit the result
as one series, then delete this folder (ARCHITECTURE.md and importlinter.toml here are its inputs).

    python3 scripts/relayout/relayout.py REPO_ROOT [--venv REPO_ROOT/.venv] [--skip-format] [--skip-cli-doc]

What it does, in order (every step skips what is already done, so a second run changes nothing):
  1. moves each module of MODULE_MOVES to its new place (`git mv`; a plain move for a file git does not track yet)
     and writes the new packages' `__init__.py` (a docstring saying what the layer is);
  2. moves the code listed in SYMBOL_MOVES between modules (this breaks the import cycles, and splits compare, bench
     and block_parallel so no module is over 600 lines): the statements with their comments and decorators (and a
     `# ---` banner when its whole section goes), the imports they need, `__all__` entries, and an import back where
     the old module still uses a moved name;
  3. rewrites every reference to an old module path in src/, tests/, scripts/, docs/, README.md and pyproject.toml:
     `from lopt.x import a, b` (split by where each name now lives), `from lopt import x`, `import lopt.x`,
     `lopt.x.NAME` in code, strings and prose, `lopt/x.py` paths, and `alias.NAME` where `alias` is a module whose
     code was split (e.g. `builtin.task_answer` after `from lopt import builtin`);
  4. `lopt.__version__` lives in lopt/_version.py (config.py imported the root package: a cycle);
  5. adds the import-linter contracts to pyproject.toml and docs/ARCHITECTURE.md (from relayout-files/);
  6. `ruff check --fix --select I` (plus F401 on the files it changed) and `ruff format` on src and tests, then
     regenerates docs/CLI.md (the commands' help names module paths);
  7. prints any import cycle (grimp) and runs `lint-imports`; warns when a test patches a moved name that the old
     module calls through its own import; prints the line counts of the modules SYMBOL_MOVES wrote and warns for
     any module of src/ over MAX_LINES (600).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

NOTES = Path(__file__).resolve().parent
FILES = NOTES  # ARCHITECTURE.md and importlinter.toml, copied into the repo by the script

# ---------------------------------------------------------------------------------------------------------------
# The mapping.  Old module -> new module.  Modules not listed stay where they are: lopt (the public API),
# lopt.__main__, lopt.errors, lopt.io, lopt.cli.* (incl. download, reference), lopt.integrations.* (a public path).
# ---------------------------------------------------------------------------------------------------------------
MODULE_MOVES = {
    # engine: the LoPT step on any decoder (plain torch)
    "lopt.anchor": "lopt.engine.anchor",
    "lopt.architectures": "lopt.engine.architectures",
    "lopt.config": "lopt.engine.config",
    "lopt.distributed": "lopt.engine.distributed",
    "lopt.heads": "lopt.engine.heads",
    "lopt.lens": "lopt.engine.lens",
    "lopt.model": "lopt.engine.model",
    "lopt.optim": "lopt.engine.optim",
    # builtin: built-in and real bases, their corpora, facts and tasks
    "lopt.builtin": "lopt.builtin.base",
    "lopt.knowledge": "lopt.builtin.knowledge",
    "lopt.hub_bases": "lopt.builtin.hub_bases",
    "lopt.real_task": "lopt.builtin.real_task",
    "lopt.world_knowledge": "lopt.builtin.world_knowledge",
    # data: the user's rows and model in
    "lopt.data": "lopt.data.rows",
    "lopt.loading": "lopt.data.loading",
    # evaluation: scoring a model
    "lopt.evaluate": "lopt.evaluation.evaluate",
    "lopt.lm_eval_tasks": "lopt.evaluation.lm_eval_tasks",
    # training: what a training command runs besides the trainer
    "lopt.arguments": "lopt.training.arguments",
    "lopt.methods": "lopt.training.methods",
    "lopt.rewards": "lopt.training.rewards",
    "lopt.block_parallel": "lopt.training.block_parallel",
    "lopt.launch": "lopt.training.launch",
    # experiments: measuring methods against each other
    "lopt.compare": "lopt.experiments.compare.sweep",  # the rest of compare: SYMBOL_MOVES
    "lopt.bench": "lopt.experiments.bench",
    "lopt.plan": "lopt.experiments.plan",
    "lopt.shapes": "lopt.experiments.shapes",  # a package (its JSON files move with it)
}

PACKAGES = {
    "lopt.engine": "The LoPT step on any Hugging Face decoder, in plain torch: the config, the wrapped model and its "
    "hooks (model), where the blocks are (architectures), the local objectives (heads, lens, anchor), the optimizer "
    "groups (optim) and the FSDP2/DDP sync (distributed). Imports nothing else of lopt but errors and io.",
    "lopt.builtin": "Built-in bases and tasks, data only (no training code): the small pretrained base (presets, "
    "corpus, build and cache: base), its tasks (tasks) and facts (knowledge), real bases by short name (hub_bases) "
    "and their tasks.",
    "lopt.data": "What a run reads: the user's rows in any accepted format, tokenized with labels on the response "
    "only (rows), and the model and tokenizer, the user's or a built-in one (loading).",
    "lopt.evaluation": "Scoring a model: task accuracy and retention perplexity (evaluate), lm-evaluation-harness "
    "and the built-in knowledge probe (lm_eval_tasks).",
    "lopt.training": "What a training command runs around the trainer: flags and recipes (arguments), LoPT and the "
    "baselines (methods), GRPO rewards (rewards), block-parallel training (block_parallel, one rank's stage: "
    "block_stage) and the local multi-process launcher (launch).",
    "lopt.experiments": "Measuring methods against each other: `lopt compare` (compare/), memory and time (bench, its "
    "budget race: bench_race, its tables: bench_report), the saved-bytes meter they share (meter), whether a run "
    "fits (plan) and the model shapes they use (shapes).",
    "lopt.experiments.compare": "`lopt compare`: every method on the same model, data, step budgets and seeds. The "
    "sweep (sweep) runs every point of the settings (spec) as `lopt sft` runs (runs), chooses on validation "
    "(select), and writes report.md (report) and the plots (plots).",
}

# Code that moves between modules after the file moves, named by OLD module paths.  names: a list of top-level
# names ("?NAME": moved when the module has it, e.g. a name a branch not merged yet adds), or "tail:NAME" = from
# NAME's statement (and the comments above it) to the end of the file.  A name not listed stays where it is.
# Moves run in order: list the lowest module first (the one the others import), so moved code imports what it needs
# from where it already went; a moved statement takes the comments right above it, a `# ---` section banner too.
SYMBOL_MOVES = [
    # builtin <-> knowledge <-> lm_eval_tasks: the tasks (which read the facts) leave the base (which the facts read)
    ("lopt.builtin", "tail:TASK_NAME", "lopt.builtin.tasks"),
    # ... and the knowledge probe's items are built-in data, not lm-eval glue
    (
        "lopt.lm_eval_tasks",
        ["KNOWLEDGE_ITEMS", "_stable_int", "_CLOZE_WORD", "_MIN_WORD_COUNT", "_training_word_counts", "knowledge_items"],
        "lopt.builtin.knowledge",
    ),
    # the data layer does not score: the held-out accuracy of a built-in task is evaluation
    ("lopt.loading", ["builtin_task_accuracy"], "lopt.evaluation.evaluate"),
    # cli.common <-> cli.sft: making the built-in SFT checkpoint (by running sft) belongs to sft
    ("lopt.cli.common", ["starting_model", "builtin_sft_checkpoint"], "lopt.cli.sft"),
    # --- no module over 600 lines: each file one concern ----------------------------------------------------------
    # compare (1,345 lines) -> compare/ sweep (what stays), spec, runs, select, report, plots; imports point
    # sweep -> report | plots -> select, sweep -> runs -> spec (the contract "compare-parts" checks it)
    (
        "lopt.compare",
        [
            *("METHOD_FLAGS", "DEFAULT_METHODS", "RETENTION_BUDGETS", "ACCURACY_TARGETS", "_COMPARE_OWNED_FLAGS"),
            *("CompareSpec", "_has_flag", "?_is_real_base", "?_task", "?_world_knowledge_on", "_base_name"),
            *("_memory_name", "_lr_k1_ratio", "_boundary", "_method_flags", "_learning_rate", "_is_lopt"),
        ],
        "lopt.experiments.compare.spec",
    ),
    (
        "lopt.compare",
        [
            *("RUN_RECORD", "COMMAND_MARKER", "_read_json", "run_name", "finished_run", "_read_record"),
            *("_checkpoint_complete", "_evaluation_key", "evaluation_sets", "evaluate_model", "_sft_command"),
            *("_train", "_training_metrics", "activation_peak_bytes", "_one_batch"),
        ],
        "lopt.experiments.compare.runs",
    ),
    (
        "lopt.compare",
        [
            *("points_of", "rise", "_validation_rank", "select_on_validation", "accuracy_at_retention"),
            *("retention_at_accuracy", "steps_to_accuracy", "pareto_front"),
        ],
        "lopt.experiments.compare.select",
    ),
    (
        "lopt.compare",
        [
            *("_ratio", "_method_table", "format_report", "_pct", "_rise_text", "_where", "_sweep_sections"),
            *("_lopt_variants", "issue11_targets", "_fewest_seeds", "_describe_point", "_fmt_ratio", "summarize"),
        ],
        "lopt.experiments.compare.report",
    ),
    ("lopt.compare", ["write_plots", "_plot_fronts", "_save"], "lopt.experiments.compare.plots"),
    # bench (944) -> bench (configs, runners, the measurement), meter, bench_report, bench_race
    (
        "lopt.bench",
        ["_SavedBox", "_is_parameter", "SavedTensorMeter", "measure_saved_tensor_peak"],
        "lopt.experiments.meter",
    ),
    (
        "lopt.bench",
        ["COLUMNS", "_fmt", "_fmt_mb", "_table_cells", "format_table", "format_targets", "describe_spec"],
        "lopt.experiments.bench_report",
    ),
    (
        "lopt.bench",
        [
            *("RACE_METHODS", "RACE_SPEEDUP_TARGET", "AUTO_BUDGET_FRACTION", "_micro_batches", "accumulated_step"),
            *("budget_race", "_budget_race", "race_targets", "format_race"),
        ],
        "lopt.experiments.bench_race",
    ),
    # block_parallel (610) -> block_stage (one rank's stage) and block_parallel (the launch checks, run, save)
    (
        "lopt.block_parallel",
        [
            *("MAX_PENDING_SENDS", "_StopForward", "_PassThrough", "_layer_output_tuple_len", "make_aux_heads"),
            *("_in_backward_pass", "_to_wire", "BlockStage"),
        ],
        "lopt.training.block_stage",
    ),
]
MAX_LINES = 600  # a module longer than this is warned about at the end
# A new module's docstring: one paragraph (wrapped here), or text with its own line breaks (kept as written).
NEW_MODULE_DOCS = {
    "lopt.builtin.tasks": "The built-in tasks of the built-in base (`BUILTIN_TASKS`: successor, modules), with fixed "
    "train / validation / test splits, their exact-match metric and their GRPO and DPO views.",
    "lopt.experiments.compare.spec": "What a compare runs: the method names and the `lopt sft` flags of each "
    '(`METHOD_FLAGS`; "name@r" scales the early lr, "name+bN" moves the boundary), the default retention budgets '
    "and accuracy targets, and `CompareSpec`, the checked settings of one `lopt compare` call.",
    "lopt.experiments.compare.runs": "One run of a compare: its folder and `lopt sft` command, training it in a "
    "subprocess, reusing it when an earlier compare finished it (resume), scoring a model on the validation and "
    "the test side, and a method's activation peak on one training batch.",
    "lopt.experiments.compare.select": "Choices on validation, numbers from test: each method's point chosen on "
    "validation accuracy, within a retention budget, at an accuracy target or by steps to a target; and the "
    "accuracy/retention front the plots draw (no choice is made from it).",
    "lopt.experiments.compare.report": "report.md of a compare: each method at its setting chosen on validation, "
    "every point of a sweep, accuracy at matched retention and retention at matched accuracy, and plain "
    "statements against the issue's targets (met / MISSED).",
    "lopt.experiments.compare.plots": "The PNG plots of a compare: loss curves, memory and time, accuracy against "
    "retention, and every point's accuracy/retention front.",
    "lopt.experiments.meter": "The saved-bytes meter: the peak bytes autograd saves for backward "
    "(`SavedTensorMeter`, `measure_saved_tensor_peak`), the activation number of `lopt bench`, `lopt plan` and "
    "`lopt compare`.",
    "lopt.experiments.bench_report": "What `lopt bench` prints: the table of configurations, the targets as "
    "PASS/MISS and the line that describes the setup.",
    "lopt.experiments.bench_race": "`lopt bench --activation_budget`: the race at a fixed activation budget. Per "
    "method, the fastest setting (checkpointing on or off, a micro-batch with gradient accumulation to the same "
    "global batch) whose measured activation peak fits; LoPT's best against E2E's best.",
    "lopt.training.block_stage": """One rank's part of block-parallel LoPT (`BlockStage`, run by lopt.training.block_parallel): its
block, aux head, optimizer and schedule, the hidden states it receives and sends, and the assembly of the trained
model on rank 0.

How a rank runs "only its block" on an unchanged Hugging Face model: it calls the whole model's forward, but
  - decoder layers it does not own are replaced by pass-through modules that return their input in the layer's own
    output format (a tensor, or a tuple for e.g. Falcon: probed once with a two-token forward);
  - on ranks > 0 the layer just before the block returns the received hidden state instead (the block's input);
    the model is called with a zero `inputs_embeds` placeholder, so the embedding is not needed there;
  - on ranks < k-1 the layer just after the block raises a private exception carrying the block's output, which
    ends the forward (the final norm and LM head never run there).
The modules a rank does not own move to the meta device (no memory). At the end, rank 0 restores them and receives
the other ranks' tensors (send/recv of raw tensors in the state dict's order: no pickling): one whole model, which
lopt.training.block_parallel saves as a standard Hugging Face checkpoint.
""",
}

# Small edits by hand, applied after the moves and before the references are rewritten, so `old` is written in the old
# module names and `new` in the new ones: (file in the new layout, old text or regex, new text, is_regex).  An edit is
# skipped when `new` is already there; when `old` is not found either, a warning names it.
TEXT_PATCHES = [
    (
        "src/lopt/builtin/base.py",
        "Embedded default: a small, really-pretrained base model and a narrow SFT task.",
        "Embedded default: a small, really-pretrained base model (its narrow SFT tasks: lopt.builtin.tasks).",
        False,
    ),
    (
        "src/lopt/builtin/base.py",
        r"``builtin_task_rows\(split=.*?\n    The task's metric\.\n",
        "The built-in tasks (``BUILTIN_TASKS``, ``builtin_task_rows``, ``exact_match``) are in ``lopt.builtin.tasks``.\n",
        True,
    ),
    (
        "src/lopt/data/loading.py",
        "training rows, and the\nbuilt-in task's held-out score. Shared by",
        "and training rows.\nShared by",
        False,
    ),
    (  # the longer module path would push this trailing comment past the line length
        "src/lopt/training/block_parallel.py",
        "# one process per block: the CLI starts them (lopt.launch.launch_local)",
        "# one process per block: the CLI starts them (launch_local)",
        False,
    ),
    (
        "tests/test_bench.py",
        "# peak_memory=\"auto\": one `python -m lopt.bench --one` each",
        "# peak_memory=\"auto\": one `--one` process each",
        False,
    ),
    (
        "docs/DEVELOPMENT.md",
        r"Layout, top-down:.*?\(tested\)\.\n",
        "Layout: one subpackage per layer (engine, integrations, builtin, data, evaluation, training, experiments, cli), "
        "each\nimporting only the layers below it; `lint-imports` checks it, lazy imports included. "
        "[ARCHITECTURE.md](ARCHITECTURE.md)\nhas the layers, the way of one `lopt sft` call and where to add an "
        "architecture, an objective, a task or a command.\n",
        True,
    ),
    (  # the meter, the tables and the race left bench
        "src/lopt/experiments/bench.py",
        "Importable API (`lopt compare` reuses the meter):\n"
        "    SavedTensorMeter, measure_saved_tensor_peak(fn) -> int\n"
        "    BenchSpec, run_benchmark(spec, configs) -> list[dict], check_targets(rows) -> list[dict]\n"
        "    format_table(rows, markdown=False) -> str, format_targets(targets) -> str\n",
        "Importable API: BenchSpec, run_benchmark(spec, configs) -> list[dict], check_targets(rows) -> list[dict].\n"
        "The meter is lopt.experiments.meter (shared with `lopt plan` and `lopt compare`), the tables\n"
        "lopt.experiments.bench_report, the race at a fixed activation budget lopt.experiments.bench_race.\n",
        False,
    ),
    (  # how a rank runs only its block went to block_stage's docstring, with the code
        "src/lopt/training/block_parallel.py",
        r'How a rank runs "only its block" on an unchanged Hugging Face model:.*?Hugging Face checkpoint\.\n',
        "One rank's stage (its block, the pass-throughs that stand in for the other layers, the sends and the final\n"
        "assembly) is lopt.training.block_stage.BlockStage; this module checks the launch, runs it and saves.\n",
        True,
    ),
    (  # compare's banners: the evaluation one goes with the evaluation code, the sweep's results get theirs
        "src/lopt/experiments/compare/sweep.py",
        r"# --- evaluation: every model on the validation and the test side -*\n",
        "# --- results.json: every point's mean over seeds, each method's point chosen on validation ----------------------\n",
        True,
    ),
    (
        "src/lopt/experiments/compare/runs.py",
        r"\n\n\ndef evaluation_sets\(",
        "\n\n\n# --- evaluation: every model on the validation and the test side ------------------------------------------------\ndef evaluation_sets(",
        True,
    ),
    (
        "src/lopt/experiments/compare/runs.py",
        r"\n\n\ndef _sft_command\(",
        "\n\n\n# --- training: one `lopt sft` subprocess per run, its metrics, a method's activation peak -----------------------\ndef _sft_command(",
        True,
    ),
    (  # what stays of bench's "output" section: the fresh-process entry point
        "src/lopt/experiments/bench.py",
        r"# --- output -*\n",
        "# --- one configuration in a fresh process (`run_benchmark` starts it) --------------------------------\n",
        True,
    ),
    (
        "scripts/test.sh",
        ".venv/bin/ruff format --check src tests\n",
        ".venv/bin/ruff format --check src tests\n.venv/bin/lint-imports --no-cache  # the layers (docs/ARCHITECTURE.md)\n",
        False,
    ),
]

TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".yaml", ".yml", ".cfg", ".ini"}
TEXT_DIRS = ("src", "tests", "scripts", "docs")
ROOT_FILES = ("pyproject.toml", "README.md")


def log(msg: str) -> None:
    print(f"relayout: {msg}", file=sys.stderr)


def die(msg: str) -> None:
    log(f"ERROR: {msg}")
    sys.exit(1)


# --- paths ------------------------------------------------------------------------------------------------------
def module_file(root: Path, dotted: str) -> Path:
    """src/lopt/a/b.py, or the package folder src/lopt/a/b when there is one."""
    base = root / "src" / Path(*dotted.split("."))
    return base if base.is_dir() and (base / "__init__.py").exists() else base.with_suffix(".py")


def module_source(root: Path, dotted: str) -> Path:
    path = module_file(root, dotted)
    return path / "__init__.py" if path.is_dir() else path


def scan_modules(root: Path) -> set[str]:
    out = set()
    for path in (root / "src" / "lopt").rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root / "src").with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out.add(".".join(parts))
    return out


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=check)


def is_tracked(root: Path, path: Path) -> bool:
    return git(root, "ls-files", "--error-unmatch", str(path.relative_to(root)), check=False).returncode == 0


CREATED: list[Path] = []  # new files, `git add`ed at the end


def write_new(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    CREATED.append(path)


# --- step 1: files ----------------------------------------------------------------------------------------------
def move_files(root: Path) -> None:
    for pkg, doc in PACKAGES.items():
        init = root / "src" / Path(*pkg.split(".")) / "__init__.py"
        if not init.exists():
            body = _wrap_doc(doc)
            write_new(init, f'"""{body}"""\n')
    for old, new in MODULE_MOVES.items():
        old_path = root / "src" / Path(*old.split("."))
        # a module file first: lopt/builtin.py next to the new package lopt/builtin/
        old_path = old_path.with_suffix(".py") if old_path.with_suffix(".py").exists() else old_path
        if old_path.is_dir() and not (old_path / "__init__.py").exists():
            old_path = old_path.with_suffix(".py")
        if old_path.is_dir() and old_path.name in new.split(".")[:-1]:
            continue  # the new package of that name (e.g. lopt/builtin/), the module already moved
        new_path = root / "src" / Path(*new.split("."))
        new_path = new_path if old_path.is_dir() or new_path.is_dir() else new_path.with_suffix(".py")
        if not old_path.exists():
            if not new_path.exists():
                log(f"skip {old}: not in this checkout")
            continue
        if new_path.exists():
            die(f"{old_path} and {new_path} both exist: merge them by hand, then run again")
        new_path.parent.mkdir(parents=True, exist_ok=True)
        if is_tracked(root, old_path):
            git(root, "mv", str(old_path.relative_to(root)), str(new_path.relative_to(root)))
        else:
            shutil.move(old_path, new_path)
            log(f"moved untracked {old_path.relative_to(root)} (git add it)")
        if old_path.is_dir():  # left behind: only __pycache__
            shutil.rmtree(old_path, ignore_errors=True)
        log(f"{old} -> {new}")


def _wrap_doc(text: str, width: int = 116) -> str:
    if "\n" in text:  # laid out by hand
        return text
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines) + ("\n" if len(lines) > 1 else "")


# --- step 2: code between modules -------------------------------------------------------------------------------
MOVED: dict[tuple[str, str], str] = {}  # (old module, name) -> new module


def defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def top_level_names(text: str) -> set[str]:
    names = set()
    for node in ast.parse(text).body:
        names |= defined_names(node)
    return names


def bound_names(text: str) -> set[str]:
    """Every name the module binds at top level, imports included."""
    names = top_level_names(text)
    for node in ast.parse(text).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def used_names(text: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}


def stmt_start(node: ast.stmt) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def import_statements(text: str) -> list[ast.stmt]:
    return [n for n in ast.parse(text).body if isinstance(n, (ast.Import, ast.ImportFrom))]


def insert_after_imports(text: str, lines: list[str]) -> str:
    """Adds import lines after the module's last top-level import (or its docstring)."""
    if not lines:
        return text
    tree = ast.parse(text)
    after = 0
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            after = node.end_lineno
        elif after == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            after = node.end_lineno  # the docstring
        else:
            if after:
                break
    src = text.splitlines(keepends=True)
    return "".join(src[:after]) + "".join(line + "\n" for line in lines) + "".join(src[after:])


def import_line_for(node: ast.stmt, alias: ast.alias) -> str:
    name = f"{alias.name} as {alias.asname}" if alias.asname else alias.name
    if isinstance(node, ast.Import):
        return f"import {name}"
    return f"from {'.' * node.level}{node.module or ''} import {name}"


def set_all(text: str, update) -> str:
    """Rewrites `__all__ = [...]` with update(list) (no-op when the module has none)."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            old = [e.value for e in node.value.elts]
            new = update(old)
            if new == old:
                return text
            lines = text.splitlines(keepends=True)
            body = "__all__ = [\n" + "".join(f'    "{n}",\n' for n in new) + "]\n"
            return "".join(lines[: node.lineno - 1]) + body + "".join(lines[node.end_lineno :])
    return text


def get_all(text: str) -> list[str] | None:
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [e.value for e in node.value.elts]
    return None


BACK_IMPORTED: dict[str, tuple[str, str]] = {}  # a moved name the old module still uses -> (that module, new one)
SPLIT_FILES: set[Path] = set()  # the modules SYMBOL_MOVES wrote


def section_statements(text: str) -> dict[int, set[int]]:
    """Line of each `# ---` banner at the top level -> the first lines of its section's statements (up to the next
    banner)."""
    lines = text.splitlines()
    banners = [i for i, line in enumerate(lines, 1) if line.startswith("# ---")]
    body = ast.parse(text).body
    out = {}
    for k, line in enumerate(banners):
        end = banners[k + 1] if k + 1 < len(banners) else len(lines) + 1
        out[line] = {n.lineno for n in body if line < stmt_start(n) < end}
    return out


def move_symbols(root: Path) -> None:
    for old_src, spec, dst in SYMBOL_MOVES:
        src_new = MODULE_MOVES.get(old_src, old_src)
        src_path, dst_path = module_source(root, src_new), module_source(root, dst)
        if not src_path.exists():
            die(f"{src_new} ({src_path}) missing: cannot move {spec} to {dst}")
        src_text = src_path.read_text()
        dst_text = dst_path.read_text() if dst_path.exists() else None
        tree = ast.parse(src_text)
        body = tree.body
        tail = spec.startswith("tail:") if isinstance(spec, str) else False
        if tail:
            first = spec.removeprefix("tail:")
            index = next((i for i, n in enumerate(body) if first in defined_names(n)), None)
            if index is None:
                if dst_text is None:
                    die(f"{first} is in neither {src_new} nor {dst}: update SYMBOL_MOVES")
                for name in top_level_names(dst_text):
                    MOVED[(old_src, name)] = dst
                log(f"{dst}: already split from {src_new}")
                continue
            chosen = body[index:]
            start = (body[index - 1].end_lineno + 1) if index else 1
        else:
            optional = {n[1:] for n in spec if n.startswith("?")}
            names = {n.removeprefix("?") for n in spec}
            chosen = [n for n in body if defined_names(n) & names]
            for node in chosen:
                if not defined_names(node) <= names:
                    die(f"{src_new}: statement at line {node.lineno} also defines {defined_names(node) - names}")
            found = set().union(*(defined_names(n) for n in chosen)) if chosen else set()
            held = names & top_level_names(dst_text) if dst_text is not None else set()
            for name in held:  # moved by an earlier run
                MOVED[(old_src, name)] = dst
            if not found:
                if dst_text is not None and names - optional <= held:
                    log(f"{dst}: already holds {sorted(held)}")
                    continue
                die(f"{sorted(names)} not found in {src_new} nor {dst}: update SYMBOL_MOVES")
            if names - found - held - optional:
                log(f"WARNING {src_new}: {sorted(names - found - held - optional)} not found; moving {sorted(found)}")
        lines = src_text.splitlines(keepends=True)
        spans = []
        if tail:
            while start <= len(lines) and not lines[start - 1].strip():
                start += 1
            spans.append((start, len(lines)))
        else:
            sections = section_statements(src_text)
            chosen_lines = {n.lineno for n in chosen}
            for node in chosen:
                begin = stmt_start(node)
                while begin > 1:
                    above = lines[begin - 2]
                    if not above.strip().startswith("#"):
                        break
                    # a `# ---` banner goes along when its whole section does (the same destination)
                    if above.startswith("# ---") and not sections.get(begin - 1, {0}) <= chosen_lines:
                        break
                    begin -= 1
                spans.append((begin, node.end_lineno))
        moved_names = set().union(*(defined_names(n) for n in chosen))
        moved = ""
        for k, (a, b) in enumerate(spans):
            if k:
                gap = lines[spans[k - 1][1] : a - 1]
                moved += "".join(gap) if all(not g.strip() for g in gap) else "\n\n"
            moved += "".join(lines[a - 1 : b]).rstrip("\n") + "\n"
        drop = {i for a, b in spans for i in range(a, b + 1)}
        remaining = "".join(line for i, line in enumerate(lines, 1) if i not in drop)
        remaining = re.sub(r"^# ---[^\n]*\n\s*(?=# ---|\Z)", "", remaining, flags=re.M)  # a banner left with nothing
        remaining = re.sub(r"^(# --- \w[^\n]*\n)\n+", r"\1", remaining, flags=re.M)  # and right above what it heads
        remaining = re.sub(r"\n{4,}", "\n\n\n", remaining)
        if dst_text is None and not tail:  # a new module's docstring says what it is: no `# --- x ---` on top
            moved = re.sub(r"\A# --- \w[^\n]*\n", "", moved)

        moved = drop_self_imports(moved, dst, (dst_text and top_level_names(dst_text) or set()) | moved_names)
        used = used_names(moved)
        # imports the moved code needs: the source's own top-level imports it uses, and what stays in the source
        dst_bound = bound_names(dst_text) if dst_text else set()
        needed = []
        for node in import_statements(src_text):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            for alias in node.names:
                bound = (alias.asname or alias.name).split(".")[0]
                if bound in used and bound not in dst_bound:
                    needed.append(import_line_for(node, alias))
                    dst_bound.add(bound)
        from_src = sorted((used & top_level_names(remaining)) - dst_bound)
        if from_src:  # the old path: a name a later move takes elsewhere is then imported from there
            needed.append(f"from {old_src} import {', '.join(from_src)}")
        src_all = get_all(src_text) or []
        exported = [n for n in src_all if n in moved_names]
        if dst_text is None:
            doc = _wrap_doc(NEW_MODULE_DOCS.get(dst, f"Moved from {src_new}."))
            head = f'"""{doc}"""\n\nfrom __future__ import annotations\n\n' + "".join(f"{x}\n" for x in needed)
            if exported:
                head += "\n__all__ = [\n" + "".join(f'    "{n}",\n' for n in exported) + "]\n"
            dst_text = head + "\n\n" + moved
        else:
            dst_text = insert_after_imports(dst_text, needed).rstrip("\n") + "\n\n\n" + moved
            if exported:
                dst_text = set_all(dst_text, lambda names: names + [n for n in exported if n not in names])
        # the source keeps using some moved names: import them back
        still = sorted(used_names(remaining) & moved_names)
        if still:
            remaining = insert_after_imports(remaining, [f"from {dst} import {', '.join(still)}"])
            for name in still:
                BACK_IMPORTED[name] = (src_new, dst)
        remaining = set_all(remaining, lambda names: [n for n in names if n not in moved_names])
        ast.parse(remaining), ast.parse(dst_text)
        src_path.write_text(remaining)
        CHANGED.append(src_path)
        if dst_path.exists():
            dst_path.write_text(dst_text)
            CHANGED.append(dst_path)
        else:
            write_new(dst_path, dst_text)
        SPLIT_FILES.update({src_path, dst_path})
        for name in moved_names:
            MOVED[(old_src, name)] = dst
        log(f"moved {len(moved_names)} names {src_new} -> {dst}")


def drop_self_imports(code: str, dst: str, dst_names: set[str]) -> str:
    """Lazy imports inside moved code that now import from its own module: dropped (and `mod.x` -> `x`)."""
    old_dst = {o for o, n in MODULE_MOVES.items() if n == dst}
    selves = {dst} | old_dst
    parent, base = dst.rsplit(".", 1)

    def from_import(match: re.Match) -> str:
        mod, names = match["mod"], match["names"].strip().strip("()")
        items = [x.strip() for x in names.replace("\n", " ").split(",") if x.strip()]
        if mod in selves or any(resolve_any(mod, i.split(" as ")[0]) == dst for i in items):
            keep = [i for i in items if resolve_any(mod, i.split(" as ")[0]) != dst and i.split(" as ")[0] not in dst_names]
            return f"{match['i']}from {mod} import {', '.join(keep)}\n" if keep else "\0"
        return match.group(0)

    code = re.sub(
        r"^(?P<i>[ \t]*)from[ \t]+(?P<mod>lopt(?:\.\w+)*)[ \t]+import[ \t]+(?P<names>\([^)]*\)|[^\n]*)\n",
        from_import,
        code,
        flags=re.M,
    )
    # a removed import that stood alone (after a docstring or a blank line) takes its blank line with it
    code = re.sub(r'((?:"""|\n)[ \t]*\n)\0[ \t]*\n', r"\1", code)
    code = code.replace("\0", "")
    pattern = rf"^[ \t]*from[ \t]+{re.escape(parent)}[ \t]+import[ \t]+{re.escape(base)}[ \t]*\n"
    if re.search(pattern, code, flags=re.M):
        code = re.sub(pattern, "", code, flags=re.M)
        code = re.sub(rf"(?<![\w.]){re.escape(base)}\.(?=[A-Za-z_])", "", code)
    return code


def apply_text_patches(root: Path) -> None:
    for rel, old, new, is_regex in TEXT_PATCHES:
        path = root / rel
        if not path.exists():
            log(f"WARNING: {rel} missing: edit not applied ({old[:50]!r})")
            continue
        text = path.read_text()
        if new in text:
            continue
        found = re.search(old, text, flags=re.S) if is_regex else (old in text)
        if not found:
            log(f"WARNING: {rel}: {old[:60]!r} not found: edit it by hand")
            continue
        text = re.sub(old, lambda _: new, text, count=1, flags=re.S) if is_regex else text.replace(old, new, 1)
        path.write_text(text)
        CHANGED.append(path)


# --- step 3: references -----------------------------------------------------------------------------------------
NEW_MODULES: set[str] = set()
SPLIT = set()  # old modules some of whose names moved elsewhere


def default_new(old: str) -> str:
    return MODULE_MOVES.get(old, old)


def resolve(old: str, name: str) -> str:
    return MOVED.get((old, name), default_new(old))


def resolve_any(mod: str, name: str) -> str:
    """Where `name` of module `mod` (an old or a new path) lives now."""
    if mod in MODULE_MOVES or mod in SPLIT:
        return resolve(mod, name)
    return mod


def is_submodule(old: str, name: str) -> bool:
    return f"{old}.{name}" in NEW_MODULES


def old_modules() -> list[str]:
    return sorted(set(MODULE_MOVES) | SPLIT, key=len, reverse=True)


def python_names(text: str) -> set[str]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


# `from lopt.x import ...` at a line's start, or inline: in `code`, in a "string" of Python code, after "; ".
FROM_RE = re.compile(
    r"(?P<i>^[ \t]*|(?<=[`\"'])|(?<=; ))from[ \t]+(?P<mod>lopt(?:\.\w+)*)[ \t]+import[ \t]+"
    r"(?P<names>\((?:[^()])*?\)|[^\n`#;\"']*?)(?P<c>[ \t]*#[^\n]*)?(?=[`;\"']|$)",
    re.M,
)
IMPORT_RE = re.compile(r"^(?P<i>[ \t]*)import[ \t]+(?P<mods>lopt\.[\w.]+(?:[ \t]+as[ \t]+\w+)?)[ \t]*$", re.M)


def split_items(names: str) -> list[tuple[str, str | None]]:
    names = names.strip()
    if names.startswith("("):
        if "#" in names:
            log(f"WARNING: comments inside {names[:60]!r}... are dropped")
            names = "\n".join(line.split("#")[0] for line in names.splitlines())
        names = names[1:-1]
    items = []
    for part in names.replace("\n", " ").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, alias = part.partition(" as ")
        items.append((name.strip(), alias.strip() or None))
    return items


def fmt_item(name: str, alias: str | None) -> str:
    return f"{name} as {alias}" if alias and alias != name else name


def rewrite_alias_attrs(text: str) -> str:
    """`builtin.task_answer` where `builtin` is an old module whose names went to several modules."""
    bindings = []  # (old module, alias, the import line, indent)
    for m in FROM_RE.finditer(text):
        for name, alias in split_items(m["names"]):
            full = f"{m['mod']}.{name}"
            if full in SPLIT:
                bindings.append((full, alias or name, m.group(0), m["i"]))
    for m in re.finditer(r"^(?P<i>[ \t]*)import[ \t]+(?P<mod>lopt[\w.]*)[ \t]+as[ \t]+(?P<a>\w+)[ \t]*$", text, re.M):
        if m["mod"] in SPLIT:
            bindings.append((m["mod"], m["a"], m.group(0), m["i"]))
    if not bindings:
        return text
    names_in_file = python_names(text)
    additions: dict[str, list[str]] = {}
    for old, alias, end, indent in bindings:
        targets: dict[str, str] = {}

        def alias_for(target: str) -> str:
            if target not in targets:
                base = target.rsplit(".", 1)[1]
                name = base if base not in names_in_file else f"{alias}_{base}"
                targets[target] = name
                parent = target.rsplit(".", 1)[0]
                additions.setdefault(end, []).append(f"{indent}from {parent} import {fmt_item(base, name)}")
                names_in_file.add(name)
            return targets[target]

        def attr(match: re.Match) -> str:
            target = resolve(old, match["n"])
            if target == default_new(old):
                return match.group(0)
            return f"{alias_for(target)}.{match['n']}"

        def string_attr(match: re.Match) -> str:
            target = resolve(old, match["n"])
            if target == default_new(old):
                return match.group(0)
            return f"{match['f']}({alias_for(target)}, {match['q']}{match['n']}{match['q']}"

        a = re.escape(alias)
        text = re.sub(rf"(?<![\w.]){a}\.(?P<n>[A-Za-z_]\w*)", attr, text)
        text = re.sub(
            rf"(?P<f>\b(?:setattr|getattr|hasattr|delattr|monkeypatch\.setattr|monkeypatch\.delattr))\(\s*{a}\s*,\s*"
            rf"(?P<q>[\"'])(?P<n>\w+)(?P=q)",
            string_attr,
            text,
        )
    for line_text, lines in additions.items():  # after the binding's import line (found again: offsets moved)
        at = text.index(line_text) + len(line_text)
        text = text[:at] + "".join("\n" + line for line in lines) + text[at:]
    return text


def rewrite_import_statements(text: str) -> str:
    """`import lopt.x [as y]`."""

    def repl(m: re.Match) -> str:
        mod, _, alias = m["mods"].partition(" as ")
        mod, alias = mod.strip(), alias.strip()
        if mod not in MODULE_MOVES:
            return m.group(0)
        new = default_new(mod)
        if alias:
            return f"{m['i']}import {new} as {alias}"
        extra = sorted(
            {resolve(mod, n) for n in re.findall(rf"(?<![\w.]){re.escape(mod)}\.(\w+)", text) if not is_submodule(mod, n)}
            - {new}
        )
        return "\n".join(f"{m['i']}import {x}" for x in [new, *extra])

    return IMPORT_RE.sub(repl, text)


def rewrite_from_imports(text: str) -> str:
    def repl(m: re.Match) -> str:
        mod, indent, comment = m["mod"], m["i"], m["c"] or ""
        items = split_items(m["names"])
        groups: dict[str, list[str]] = {}
        if mod == "lopt":
            for name, alias in items:
                full = f"lopt.{name}"
                if full in MODULE_MOVES:
                    parent, base = default_new(full).rsplit(".", 1)
                    groups.setdefault(f"{parent}\0{base}", []).append(fmt_item(base, alias or name))
                else:
                    groups.setdefault("lopt", []).append(fmt_item(name, alias))
        elif mod in MODULE_MOVES or mod in SPLIT:
            for name, alias in items:
                target = mod if is_submodule(mod, name) else resolve(mod, name)
                groups.setdefault(target, []).append(fmt_item(name, alias))
        else:
            return m.group(0)
        if list(groups) == [mod]:
            return m.group(0)
        line_mode = m.start() == 0 or m.string[m.start() - 1] == "\n" or indent != ""
        sep = "\n" + indent if line_mode else "; "
        out = []
        for key, names in groups.items():
            target = key.split("\0")[0]
            out.append(f"from {target} import {', '.join(names)}")
        return indent + sep.join(out) + comment

    return FROM_RE.sub(repl, text)


def rewrite_dotted(text: str) -> str:
    alternation = "|".join(re.escape(m) for m in old_modules())
    pattern = re.compile(rf"(?<![\w.])(?P<old>{alternation})(?P<rest>\.[A-Za-z_]\w*)?(?!\w)")

    def repl(m: re.Match) -> str:
        old, rest = m["old"], m["rest"]
        if rest:
            name = rest[1:]
            if is_submodule(old, name):
                return m.group(0)
            return resolve(old, name) + rest
        new = default_new(old)
        return old if new.startswith(old + ".") else new

    return pattern.sub(repl, text)


def rewrite_paths(text: str) -> str:
    for old, new in sorted(MODULE_MOVES.items(), key=lambda kv: len(kv[0]), reverse=True):
        old_rel, new_rel = old.replace(".", "/"), new.replace(".", "/")
        text = re.sub(rf"(?<![\w.]){re.escape(old_rel)}\.py(?!\w)", f"{new_rel}.py", text)
        if old == "lopt.shapes":
            text = re.sub(rf"(?<![\w.]){re.escape(old_rel)}(?=/|\b)(?![\w.])", new_rel, text)
    return text


def rewrite_text(path: Path, text: str) -> str:
    if path.suffix == ".py":
        text = rewrite_alias_attrs(text)
    text = rewrite_import_statements(text)
    text = rewrite_from_imports(text)
    text = rewrite_dotted(text)
    text = rewrite_paths(text)
    return text


def text_files(root: Path):
    for name in ROOT_FILES:
        if (root / name).is_file():
            yield root / name
    for top in TEXT_DIRS:
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield path


CHANGED: list[Path] = []
BEFORE: dict[Path, str] = {}  # a changed file's text before the rewrite


def rewrite_references(root: Path) -> None:
    for path in text_files(root):
        text = path.read_text()
        new = rewrite_text(path, text)
        if new != text:
            BEFORE.setdefault(path, text)
            path.write_text(new)
            CHANGED.append(path)
    log(f"rewrote references in {len(CHANGED)} files")


# --- step 4: version --------------------------------------------------------------------------------------------
def move_version(root: Path) -> None:
    init = root / "src" / "lopt" / "__init__.py"
    version_file = root / "src" / "lopt" / "_version.py"
    text = init.read_text()
    m = re.search(r'^__version__ = "([^"]+)"\n', text, re.M)
    if m:
        if not version_file.exists():
            write_new(version_file, f'"""The package version (read by lopt and its config files)."""\n\n__version__ = "{m[1]}"\n')
        init.write_text(text.replace(m.group(0), "from lopt._version import __version__\n"))
        CHANGED.append(init)
    for path in (root / "src" / "lopt").rglob("*.py"):
        if path.name == "__init__.py" and path.parent.name == "lopt":
            continue
        text = path.read_text()
        new = re.sub(r"from lopt import __version__\b", "from lopt._version import __version__", text)
        if new != text:
            path.write_text(new)
            CHANGED.append(path)


# --- step 5: contract and doc -----------------------------------------------------------------------------------
def add_contract_and_doc(root: Path) -> None:
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    if "[tool.importlinter]" not in text:
        pyproject.write_text(text.rstrip("\n") + "\n\n" + (FILES / "importlinter.toml").read_text())
        log("pyproject.toml: import-linter contracts added")
    doc = root / "docs" / "ARCHITECTURE.md"
    if not doc.exists() and (FILES / "ARCHITECTURE.md").exists():
        write_new(doc, (FILES / "ARCHITECTURE.md").read_text())
        log("docs/ARCHITECTURE.md written")


# --- step 6/7: tools --------------------------------------------------------------------------------------------
def run_tool(cmd: list[str], root: Path, env=None) -> int:
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    out = (proc.stdout + proc.stderr).strip()
    if out:
        print(out[-4000:], file=sys.stderr)
    return proc.returncode


def check_patched_names(root: Path) -> None:
    """A test that patches a moved name where it now lives misses the old module's own import of it."""
    patch = re.compile(r"setattr\(\s*(?:[\"'](?P<path>[\w.]+)\.|[\w.]+\s*,\s*[\"'])(?P<name>\w+)[\"']")
    for path in sorted((root / "tests").rglob("*.py")):
        for m in patch.finditer(path.read_text()):
            if m["name"] in BACK_IMPORTED:
                user, home = BACK_IMPORTED[m["name"]]
                log(
                    f"WARNING {path.relative_to(root)}: patches {m['name']} ({home}), which {user} calls through its "
                    "own import: patch it there too"
                )


def report_sizes(root: Path) -> None:
    """Line counts of the modules SYMBOL_MOVES wrote; a warning for any module of the package over MAX_LINES."""
    for path in sorted(p for p in SPLIT_FILES if p.exists()):
        log(f"{len(path.read_text().splitlines()):5d} lines  {path.relative_to(root)}")
    for path in sorted((root / "src").rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            log(f"WARNING {path.relative_to(root)}: {n} lines, over {MAX_LINES}: split it where its concern splits")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--venv", type=Path, help="venv with ruff, the project's dependencies and import-linter")
    parser.add_argument("--skip-format", action="store_true")
    parser.add_argument("--skip-cli-doc", action="store_true")
    args = parser.parse_args()
    root = args.root.resolve()
    if not (root / "src" / "lopt" / "__init__.py").exists():
        die(f"{root} is not a lopt checkout")
    venv = args.venv or (root / ".venv")
    bin_ = venv / "bin"

    for old, _, _ in SYMBOL_MOVES:
        SPLIT.add(old)
    move_files(root)
    NEW_MODULES.update(scan_modules(root))
    move_symbols(root)
    NEW_MODULES.update(scan_modules(root))
    apply_text_patches(root)
    rewrite_references(root)
    move_version(root)
    add_contract_and_doc(root)

    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    ruff = str(bin_ / "ruff") if (bin_ / "ruff").exists() else "ruff"
    if not args.skip_format:
        changed_py = sorted({str(p) for p in CHANGED + CREATED if p.suffix == ".py" and p.exists()})
        if changed_py:
            run_tool([ruff, "check", "--fix", "--select", "F401", "--quiet", *changed_py], root)
        run_tool([ruff, "check", "--fix", "--select", "I", "--quiet", "src", "tests", "scripts"], root)
        run_tool([ruff, "format", "--quiet", "src", "tests"], root)
        changed_scripts = [p for p in changed_py if "/scripts/" in p]
        if changed_scripts:
            run_tool([ruff, "format", "--quiet", *changed_scripts], root)
    python = str(bin_ / "python") if (bin_ / "python").exists() else sys.executable
    if not args.skip_cli_doc and (root / "src/lopt/cli/reference.py").exists():
        if run_tool([python, "-m", "lopt.cli.reference", "--write"], root, env) != 0:
            log("WARNING: could not regenerate docs/CLI.md")
    if CREATED and (root / ".git").exists():
        git(root, "add", *[str(p.relative_to(root)) for p in CREATED if p.exists()], check=False)
    check = (
        "import grimp, sys\n"
        "g = grimp.build_graph('lopt', cache_dir=None)\n"
        "mods = sorted(g.modules)\n"
        "bad = [(a, b) for a in mods for b in sorted(g.find_modules_directly_imported_by(a)) if b in mods "
        "and g.find_shortest_chain(importer=b, imported=a)]\n"
        "print('import cycles:', bad or 'none')\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run_tool([python, "-c", check], root, env)
    lint = bin_ / "lint-imports"
    if lint.exists():
        run_tool([str(lint), "--no-cache"], root, env)
    def wrapped(text: str) -> list[int]:
        return [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"^\s*\)+\s+# ", line)]

    for path, before in sorted(BEFORE.items()):
        if path.suffix == ".py" and path.exists() and len(wrapped(path.read_text())) > len(wrapped(before)):
            lines = wrapped(path.read_text())
            log(f"WARNING: {path.relative_to(root)}:{lines}: a trailing comment ruff had to wrap? shorten it")
    check_patched_names(root)
    report_sizes(root)
    log("done: review `git status` and `git diff`, run the tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
