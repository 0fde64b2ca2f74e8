"""What `lopt compare` adds on a real base: the world-knowledge probe and the code perplexity of every run
(`CompareWorldKnowledge`), their means over seeds at every point (`add_world_knowledge`), their report section and
the knowledge-kept front plot.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import statistics
from collections.abc import Callable, Sequence

from lopt.evaluation.world_knowledge import (
    PERPLEXITY_SEQ_LEN,
    _items_digest,
    accuracy_by_type,
    base_world_knowledge,
    code_texts,
    kept_by_type,
    world_knowledge_answers,
    world_knowledge_items,
)

__all__ = [
    "CompareWorldKnowledge",
    "add_world_knowledge",
    "format_world_knowledge_report",
    "knowledge_front",
    "plot_knowledge_fronts",
]


# --- lopt compare on a real base -------------------------------------------------------------------------------------
class CompareWorldKnowledge:
    """The probe and the code perplexity in `lopt compare`: made once per process (the parent and every --jobs
    worker), like `lopt.evaluation.lm_eval_tasks.CompareLMEval`.

    The base is scored on every item once (`base_world_knowledge`, cached per checkpoint); a trained model only on
    the items the base answered right, which is all `knowledge_kept` reads.  Code perplexity is scored on both halves
    of `code_texts` (alternate pieces), as compare scores retention: ``validation_code_ppl`` and ``code_ppl``.
    Disabled, it adds nothing to any record.
    """

    def __init__(self, enabled: bool, base_path: str | os.PathLike | None = None):
        self.enabled, self.base_path = enabled, base_path
        self.items = world_knowledge_items() if enabled else []
        code = code_texts() if enabled else []
        self.code = {"validation_": code[0::2], "": code[1::2]}
        self._base_correct: list[bool] | None = None

    @property
    def key(self) -> str | None:
        """What a run is scored on (part of compare's evaluation key); None when disabled."""
        if not self.enabled:
            return None
        text = json.dumps([_items_digest(self.items), self.code, PERPLEXITY_SEQ_LEN])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def _code_perplexity(self, model, tokenizer) -> dict:
        from lopt.evaluation.evaluate import perplexity

        return {
            f"{side}code_ppl": perplexity(model, tokenizer, texts, seq_len=PERPLEXITY_SEQ_LEN)
            for side, texts in self.code.items()
        }

    def base_correct(self, model=None, tokenizer=None) -> list[bool]:
        if self._base_correct is None:
            self._base_correct = base_world_knowledge(model, tokenizer, self.base_path, self.items)
        return self._base_correct

    def measure_base(self, model, tokenizer) -> dict:
        """The base's record entries: ``world_knowledge`` (items, accuracy overall and per type) and its code
        perplexity on both halves."""
        if not self.enabled:
            return {}
        correct = self.base_correct(model, tokenizer)
        summary = {
            "items": len(self.items),
            "known": sum(correct),
            "accuracy": sum(correct) / max(len(correct), 1),
            "by_type": accuracy_by_type(self.items, correct),
            "items_by_type": dict(collections.Counter(item["type"] for item in self.items)),
        }
        return {"world_knowledge": summary, **self._code_perplexity(model, tokenizer)}

    def kept(self, model, tokenizer) -> float | None:
        """The share of the items this probe's base (here: the model it was made with) answers right that `model`
        still answers right; None when disabled or when the base answers none (a GRPO run against its SFT start)."""
        if not self.enabled:
            return None
        known = [item for item, ok in zip(self.items, self.base_correct()) if ok]
        return sum(world_knowledge_answers(model, tokenizer, known)) / len(known) if known else None

    def __call__(self, model, tokenizer) -> dict:
        """A trained model's record entries: ``knowledge_kept``, ``knowledge_kept_by_type`` and its code
        perplexity."""
        if not self.enabled:
            return {}
        known = [item for item, ok in zip(self.items, self.base_correct()) if ok]
        if not known:  # e.g. the built-in model with --world_knowledge on: nothing to keep, so no share
            return {"knowledge_kept": None, **self._code_perplexity(model, tokenizer)}
        still = world_knowledge_answers(model, tokenizer, known)
        return {
            "knowledge_kept": sum(still) / len(still),
            "knowledge_kept_by_type": kept_by_type(known, [True] * len(known), still),
            **self._code_perplexity(model, tokenizer),
        }


# Per-run entries averaged per (method, lr, steps) point by `add_world_knowledge`.
# knowledge_kept_vs_start: a GRPO run's share of what its SFT start answers right (lopt.experiments.compare.start).
_POINT_METRICS = ("knowledge_kept", "knowledge_kept_vs_start", "code_ppl", "validation_code_ppl")


def add_world_knowledge(results: dict, runs: dict[tuple, list[dict]]) -> None:
    """Adds to every point of compare's results (the chosen ones are among them) the mean and std over seeds of
    ``knowledge_kept`` and the code perplexities (and each seed's, in its ``per_seed``), the per-type kept shares
    (mean), and the base's code perplexity as ``code_ppl_before``; nothing when the base was not probed."""
    if "world_knowledge" not in results["before"]:
        return
    before = results["before"]
    for point in results["points"]:
        point_runs = runs.get((point["method"], point["learning_rate"], point["max_steps"]), [])
        for key in _POINT_METRICS:
            values = [r[key] for r in point_runs if r.get(key) is not None]
            if values:
                point[key] = statistics.fmean(values)
                if len(values) > 1:
                    point[f"{key}_std"] = statistics.stdev(values)
        # Each seed's own values too, so results.json alone gives every spread (the run folders may be gone).
        by_seed = {r.get("seed"): r for r in point_runs}
        for entry in point.get("per_seed", []):
            run = by_seed.get(entry.get("seed"), {})
            # knowledge_kept_vs_start only where a GRPO run measured it (an SFT compare's records keep their shape).
            entry.update(
                {
                    key: run.get(key)
                    for key in _POINT_METRICS
                    if key != "knowledge_kept_vs_start" or key in run
                }
            )
        by_type: dict[str, list[float]] = {}
        for r in point_runs:
            for name, value in r.get("knowledge_kept_by_type", {}).items():
                by_type.setdefault(name, []).append(value)
        if by_type:
            point["knowledge_kept_by_type"] = {name: statistics.fmean(v) for name, v in by_type.items()}
        point["code_ppl_before"] = before.get("code_ppl")
        point["validation_code_ppl_before"] = before.get("validation_code_ppl")


def _rise(point: dict, key: str) -> float | None:
    value, base = point.get(key), point.get(f"{key}_before")
    return None if value is None or not base else (value - base) / base


def _pct(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def format_world_knowledge_report(results: dict) -> list[str]:
    """Markdown lines: the base's accuracy per question type, then per method (at its point chosen on validation)
    task accuracy, knowledge kept overall and per type, and the prose and code perplexity rises; empty when the
    probe did not run."""
    base = results.get("before", {}).get("world_knowledge")
    methods = results.get("methods", {})
    if base is None or not methods:
        return []
    types = list(base["by_type"])
    per_type = ", ".join(
        f"{name} {_pct(base['by_type'][name])} of {base['items_by_type'].get(name, '?')}" for name in types
    )
    lines = [
        "## World knowledge kept (real base)",
        "",
        f"The base answers {base['known']} of {base['items']} country questions right ({_pct(base['accuracy'])}: "
        f"{per_type}; greedy, strict prefix match, `lopt.evaluation.world_knowledge`). Knowledge kept: the share of those "
        "the trained model still answers right (100% = nothing forgotten). Perplexity rises are over the base's, "
        "on the test halves of CPython's pydoc topics (prose, the retention column above) and of standard-library "
        "source (code).",
        "",
        "| method | lr | steps | task acc | knowledge kept | "
        + " | ".join(f"kept: {name}" for name in types)
        + " | prose ppl rise | code ppl rise |",
        "|---|---|---|---|---|" + "---|" * len(types) + "---|---|",
    ]
    spread = results.get("setup", {}).get("seeds", 1) > 1
    for name, m in methods.items():
        kept = _pct(m.get("knowledge_kept"), m.get("knowledge_kept_std") if spread else None)
        by_type = m.get("knowledge_kept_by_type", {})
        prose, code = _rise(m, "retention_ppl"), _rise(m, "code_ppl")
        cells = [
            name,
            f"{m['learning_rate']:g}" if "learning_rate" in m else "—",
            str(m.get("max_steps", "—")),
            _pct(m.get("task_accuracy"), m.get("task_accuracy_std") if spread else None),
            kept,
            *(_pct(by_type.get(t)) for t in types),
            "—" if prose is None else f"{100 * prose:+.0f}%",
            "—" if code is None else f"{100 * code:+.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![task accuracy vs knowledge kept](knowledge_fronts.png)", ""]
    return lines


def knowledge_front(points: Sequence[dict]) -> list[dict]:
    """The points no other point beats on both test task accuracy and knowledge kept (both higher), by kept."""
    scored = [p for p in points if p.get("task_accuracy") is not None and p.get("knowledge_kept") is not None]
    front, best = [], -1.0
    for p in sorted(scored, key=lambda p: (-p["knowledge_kept"], -p["task_accuracy"])):
        if p["task_accuracy"] > best:
            front.append(p)
            best = p["task_accuracy"]
    return front


def plot_knowledge_fronts(results: dict, colors: dict, markers: dict, save: Callable) -> None:
    """knowledge_fronts.png: test task accuracy against knowledge kept for every (method, lr, steps) point, each
    method's front as a line; ``save(fig, name)`` writes it.  Nothing when the probe did not run."""
    import matplotlib.pyplot as plt

    points = [p for p in results.get("points", []) if p.get("knowledge_kept") is not None]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in results["methods"]:
        own = [p for p in points if p["method"] == name and p.get("task_accuracy") is not None]
        if not own:
            continue
        ax.scatter(
            [100 * p["knowledge_kept"] for p in own],
            [100 * p["task_accuracy"] for p in own],
            marker=markers[name],
            color=colors[name],
            alpha=0.6,
        )
        front = knowledge_front(own)
        ax.plot(
            [100 * p["knowledge_kept"] for p in front],
            [100 * p["task_accuracy"] for p in front],
            marker=markers[name],
            color=colors[name],
            label=name,
        )
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set(
        xlabel="knowledge kept (% of the facts the base answers right that the model still answers right)",
        ylabel="task accuracy on test (%)",
        title="Task accuracy vs world knowledge kept: every (lr, steps) point, each method's front as a line",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    save(fig, "knowledge_fronts.png")
