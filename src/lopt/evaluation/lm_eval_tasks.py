"""lm-evaluation-harness in `lopt eval` and `lopt compare`, and the built-in knowledge-retention task.

`run_lm_eval(checkpoint, tasks)` runs lm-eval's own Hugging Face model class (``"hf"``) on a checkpoint directory
through `lm_eval.simple_evaluate` and returns ``{task: {metric: value}}``.  ``tasks`` names lm-eval tasks, groups or
tags, directories of task YAMLs (local tasks), `KNOWLEDGE_TASK` or `WORLD_KNOWLEDGE_TASK` (a real base's knowledge
of the world, `lopt.evaluation.world_knowledge`; asked in the model's chat format).

`KNOWLEDGE_TASK` is a multiple-choice cloze over facts the built-in model was pretrained on (`lopt.builtin.knowledge`, probe
facts only, so no SFT task ever trains on them): given ``Module M``, ``def NAME:`` and the first sentence of NAME's
docstring up to its last word (the way the corpus presents them), which of four words about as frequent in the
corpus ends the sentence.  It is an ordinary lm-eval YAML task over a local JSONL file, written on first use next to the
cached built-in model, so it runs offline.

lm-eval is an optional dependency (``pip install 'lopt[eval]'``); everything here imports it lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopt.builtin.knowledge import knowledge_items
from lopt.errors import UserError
from lopt.evaluation.world_knowledge import WORLD_KNOWLEDGE_TASK, world_knowledge_task_dir
from lopt.io import cache_root, publish_directory

__all__ = [
    "CHAT_TASKS",
    "CompareLMEval",
    "KNOWLEDGE_TASK",
    "LMEvalTasks",
    "change_columns",
    "format_lm_eval_report",
    "headline_metric",
    "knowledge_task_dir",
    "require_lm_eval",
    "resolve_tasks",
    "run_lm_eval",
    "summarize_lm_eval",
]

KNOWLEDGE_TASK = "lopt_knowledge"
# Bump when the YAML changes; part of the task folder's name (with a hash of the items).
KNOWLEDGE_VERSION = "2"
INSTALL_HINT = "pip install 'lopt[eval]' (lm-eval>=0.4.13,<0.5)"
# lopt's own tasks written for chat models: lm-eval runs them with the model's chat template.
CHAT_TASKS = frozenset({WORLD_KNOWLEDGE_TASK})


def require_lm_eval():
    """The `lm_eval` module, or a one-line error saying how to install it."""
    try:
        import lm_eval
    except ImportError as err:
        raise UserError(
            f"--lm_eval_tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}."
        ) from err
    return lm_eval


# --- the built-in knowledge task ---------------------------------------------------------------------------------
_KNOWLEDGE_YAML = """\
# Written by lopt (lopt.evaluation.lm_eval_tasks): the missing last word of a docstring sentence the built-in model was
# pretrained on, among four words about as frequent.  Chance is 25%.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def knowledge_task_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the knowledge task's YAML and JSONL, written on first use next to the built-in model's cache.

    Written into a temporary folder and renamed into place, so a reader never sees half of it.
    """
    # The items depend on the installed standard library and on lopt.builtin.knowledge: the folder is named by their hash.
    jsonl = "".join(json.dumps(row) + "\n" for row in knowledge_items())
    digest = hashlib.sha256(jsonl.encode("utf-8")).hexdigest()[:12]
    final = cache_root(cache_dir) / "lm_eval_tasks" / f"{KNOWLEDGE_TASK}-v{KNOWLEDGE_VERSION}-{digest}"

    def write(folder: Path) -> None:
        (folder / f"{KNOWLEDGE_TASK}.jsonl").write_text(jsonl, encoding="utf-8")
        # lm-eval resolves data_files against the working directory, so the YAML names the final absolute path.
        data_file = json.dumps(str(final.resolve() / f"{KNOWLEDGE_TASK}.jsonl"))
        yaml = _KNOWLEDGE_YAML.format(task=KNOWLEDGE_TASK, data_file=data_file, version=KNOWLEDGE_VERSION)
        (folder / f"{KNOWLEDGE_TASK}.yaml").write_text(yaml, encoding="utf-8")

    return publish_directory(final, write, marker=f"{KNOWLEDGE_TASK}.yaml")


# --- running lm-eval ---------------------------------------------------------------------------------------------
@dataclass
class LMEvalTasks:
    """Parsed --lm_eval_tasks: the names lm-eval runs and a task index that knows them (built once: indexing
    lm-eval's own ~15k task YAMLs takes half a minute on a small CPU)."""

    text: str
    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager


def resolve_tasks(text: str) -> LMEvalTasks:
    """Parse ``--lm_eval_tasks``: comma-separated lm-eval task, group or tag names; `KNOWLEDGE_TASK`;
    `WORLD_KNOWLEDGE_TASK`; or folders of task YAMLs, each standing for every group defined there and every task
    none of those groups contains.

    Missing lm-eval, an unknown name or an empty folder is a one-line error.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise UserError(f"--lm_eval_tasks {text!r} names no task: give e.g. hellaswag,arc_easy or a folder.")
    names, folders, local = [], [], set()
    for entry in entries:
        if entry == KNOWLEDGE_TASK:
            entry = str(knowledge_task_dir())
        elif entry == WORLD_KNOWLEDGE_TASK:
            entry = str(world_knowledge_task_dir())
        if os.path.isdir(entry):
            found = _tasks_in_folder(TaskManager(include_path=entry, include_defaults=False))
            if not found:
                raise UserError(
                    f"--lm_eval_tasks folder {entry!r} defines no lm-eval task (no YAML with a 'task:' or "
                    "'group:' key)."
                )
            folders.append(entry)
            names.extend(found)
            local.update(found)
        elif os.path.sep in entry or entry.endswith((".yaml", ".yml")):
            raise UserError(
                f"--lm_eval_tasks {entry!r} is not a folder: give the folder that holds task YAMLs."
            )
        else:
            names.append(entry)
    # lm-eval's own tasks only when a name needs them.
    needs_defaults = any(n not in local for n in names)
    manager = TaskManager(include_path=folders or None, include_defaults=needs_defaults)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"--lm_eval_tasks: {', '.join(map(repr, unknown))} is not an lm-eval task, group or tag; "
            "`lm-eval ls tasks` lists them, or give a folder of task YAMLs."
        )
    return LMEvalTasks(text, list(dict.fromkeys(names)), manager)


def _tasks_in_folder(manager) -> list[str]:
    from lm_eval.tasks._index import Kind

    index = manager.task_index
    groups = [name for name, e in index.items() if e.kind == Kind.GROUP]
    in_groups = set()
    for name in groups:
        for child in index[name].cfg.get("task", []):
            in_groups.add(child.get("task") if isinstance(child, dict) else child)
    tasks = [
        name for name, e in index.items() if e.kind in (Kind.TASK, Kind.PY_TASK) and name not in in_groups
    ]
    return sorted(groups) + sorted(tasks)


def run_lm_eval(
    checkpoint: str | os.PathLike,
    tasks: str | LMEvalTasks,
    limit: float | None = None,
    batch_size: int | str = 16,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, dict[str, float | None]]:
    """lm-eval's HF model class on a checkpoint folder: ``{task or group: {metric: value}}`` for every task and
    group lm-eval reports (subtasks of a group included).

    Metric names drop lm-eval's ",none" filter suffix; other filters stay ("exact_match,strict-match").  Each entry
    also has ``"n"``, the number of documents scored.  ``limit`` caps documents per task (a float < 1 is a
    fraction), as lm-eval's own --limit.  `CHAT_TASKS` run with the model's chat template, every other task
    without (as lm-eval's own default).
    """
    lm_eval = require_lm_eval()
    import torch

    if isinstance(tasks, str):
        tasks = resolve_tasks(tasks)
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines drown lopt's own output
    lm = HFLM(
        pretrained=str(checkpoint),
        batch_size=batch_size,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        trust_remote_code=trust_remote_code,
    )
    results: dict[str, dict] = {}
    samples: dict[str, dict] = {}
    # One simple_evaluate per requested task, on the same loaded model.  In one call, lm-eval 0.4.13's
    # logits_cache mixes up two requests whose context + continuation are the same tokens split at different
    # points (seen here across two tasks: one got the other's log-likelihood).
    for name in tasks.names:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=tasks.manager,
            limit=limit,
            apply_chat_template=name in CHAT_TASKS,
            bootstrap_iters=1000,  # closed-form stderr for accuracies; a short bootstrap for other metrics
            log_samples=False,
        )
        results.update(out["results"])
        samples.update(out.get("n-samples", {}))
    scores: dict[str, dict] = {}
    for task, metrics in results.items():
        entry = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or not isinstance(value, (int, float, str)):
                continue
            metric = key.removesuffix(",none")
            entry[metric] = float(value) if isinstance(value, (int, float)) else None  # "N/A" stderr
        if task in samples:
            entry["n"] = samples[task]["effective"]
        scores[task] = entry
    return scores


def headline_metric(metrics: dict) -> str | None:
    """The metric a table shows for a task: the first one lm-eval reports (in its sorted order, so ``acc`` before
    ``acc_norm``), not a stderr."""
    for key, value in metrics.items():
        if key != "n" and "_stderr" not in key and value is not None:
            return key
    return None


# --- compare: one column per task, as a change from the base model -----------------------------------------------
class CompareLMEval:
    """lm-eval in `lopt compare`: scores the base model and every trained checkpoint, then adds per-method
    summaries to the results.

    ``tasks`` None means the default: `KNOWLEDGE_TASK` for the built-in model when lm-eval is installed (a note on
    stderr says how to get it otherwise), nothing for a user's model; "none" turns lm-eval off.
    """

    def __init__(self, tasks: str | None, builtin: bool, limit=None, batch_size: int | str = 16):
        self.limit, self.batch_size = limit, batch_size
        if tasks is None and builtin:
            try:
                require_lm_eval()
                tasks = KNOWLEDGE_TASK
            except UserError:
                print(
                    f"lopt compare: lm-eval is not installed, so the {KNOWLEDGE_TASK} retention column is left out "
                    f"({INSTALL_HINT}).",
                    file=sys.stderr,
                )
        self.tasks = resolve_tasks(tasks) if tasks and tasks != "none" else None

    def __call__(self, checkpoint) -> dict:
        """``{"lm_eval": {task: metrics}}`` for a checkpoint folder; ``{}`` when lm-eval is off."""
        if self.tasks is None:
            return {}
        return {"lm_eval": run_lm_eval(checkpoint, self.tasks, limit=self.limit, batch_size=self.batch_size)}

    def add_summaries(self, results: dict, runs: dict[str, list[dict]]) -> None:
        """``setup.lm_eval_tasks`` and, per method, ``lm_eval``: `summarize_lm_eval` of its runs."""
        if self.tasks is None:
            return
        results["setup"]["lm_eval_tasks"] = self.tasks.names
        for name, entry in results["methods"].items():
            entry["lm_eval"] = summarize_lm_eval(runs[name], results["before"])


def summarize_lm_eval(runs: list[dict], before: dict) -> dict:
    """Per task: the headline metric, its mean (and std) over seeds, the base model's value and the change."""
    out = {}
    for task, base in before.get("lm_eval", {}).items():
        metric = headline_metric(base)
        values = [
            r["lm_eval"][task][metric]
            for r in runs
            if r.get("lm_eval", {}).get(task, {}).get(metric) is not None
        ]
        if metric is None or not values:
            continue
        entry = {"metric": metric, "before": base[metric], "mean": statistics.fmean(values)}
        entry["change"] = entry["mean"] - entry["before"]
        if len(values) > 1:
            entry["std"] = statistics.stdev(values)
        out[task] = entry
    return out


def change_columns(results: dict, tasks: list[str] | None = None) -> list[str]:
    """The tasks a report shows: the requested ones (``setup.lm_eval_tasks``), not every subtask of a group."""
    shown = results.get("setup", {}).get("lm_eval_tasks") if tasks is None else tasks
    reported = results.get("before", {}).get("lm_eval", {})  # older results have none
    return [t for t in (shown or reported) if t in reported]


def format_lm_eval_report(results: dict) -> list[str]:
    """Markdown lines: one row per method, the retention-perplexity rise and one column per lm-eval task (change
    from the base model, in points); empty when no lm-eval task ran."""
    tasks = change_columns(results)
    if not tasks:
        return []
    before = results["before"]["lm_eval"]
    spread = results["setup"].get("seeds", 1) > 1
    header = ["method", "retention ppl rise"]
    for task in tasks:
        metric = headline_metric(before[task])
        header.append(f"{task} {metric} Δ (base {100 * before[task][metric]:.1f}%)")
    lines = [
        "## lm-eval tasks (change from the base model)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, m in results["methods"].items():
        ppl, ppl_before = m.get("retention_ppl"), m.get("retention_ppl_before")
        cells = [name, "—" if ppl is None or ppl_before is None else f"{ppl - ppl_before:+.1f}"]
        for task in tasks:
            entry = m.get("lm_eval", {}).get(task)
            if entry is None:
                cells.append("—")
                continue
            text = f"{100 * entry['change']:+.1f} ({100 * entry['mean']:.1f}%)"
            if spread and "std" in entry:
                text += f" ± {100 * entry['std']:.1f}"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_agreement(results, tasks)]
    if KNOWLEDGE_TASK in tasks:
        base = results["before"]["lm_eval"].get(KNOWLEDGE_TASK, {}).get("acc")
        note = f"- {KNOWLEDGE_TASK}: chance is 25% (four choices)"
        if base is not None and base < 0.375:  # under 1.5x chance
            note += f"; the base model's {100 * base:.1f}% is near it, so it cannot show much forgetting"
        lines.append(note + ".")
    lines.append("")
    return lines


def _agreement(results: dict, tasks: list[str]) -> list[str]:
    """Whether each task and retention perplexity agree on which method kept the most."""
    methods = results["methods"]
    by_ppl = [n for n, m in methods.items() if m.get("retention_ppl") is not None]
    if len(methods) < 2 or not by_ppl:
        return []
    kept_ppl = min(by_ppl, key=lambda n: methods[n]["retention_ppl"])
    out = []
    for task in tasks:
        scored = [n for n, m in methods.items() if task in m.get("lm_eval", {})]
        if not scored:
            continue
        kept_task = max(scored, key=lambda n: methods[n]["lm_eval"][task]["mean"])
        verdict = "agree" if kept_task == kept_ppl else "DISAGREE"
        out.append(
            f"- Which method kept the most: retention perplexity says {kept_ppl}, {task} says {kept_task} "
            f"({verdict})."
        )
    return out
