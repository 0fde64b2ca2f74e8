"""Choices on validation, numbers from test: each method's point chosen on validation accuracy, within a retention
budget, at an accuracy target or by steps to a target; and the accuracy/retention front the plots draw (no choice is
made from it).
"""

from __future__ import annotations

import math


def points_of(results: dict, name: str) -> list[dict]:
    return [p for p in results["points"] if p["method"] == name]


# --- choices on validation, numbers from test --------------------------------------------------------------------
def rise(point: dict, side: str = "test") -> float | None:
    """Retention-perplexity rise as a fraction of the base model's (0.25 = +25%), on the test or validation side."""
    prefix = "" if side == "test" else "validation_"
    ppl, base = point.get(f"{prefix}retention_ppl"), point.get(f"{prefix}retention_ppl_before")
    return None if ppl is None or not base else (ppl - base) / base


def _validation_rank(point: dict) -> tuple:
    """Higher validation accuracy first; ties go to the smaller validation retention rise."""
    accuracy = point.get("validation_task_accuracy")
    r = rise(point, "validation")
    return (-(accuracy if accuracy is not None else -1.0), r if r is not None else math.inf)


def select_on_validation(points: list[dict]) -> dict | None:
    """The point with the best validation accuracy: no test number takes part in the choice."""
    return min(points, key=_validation_rank) if points else None


def accuracy_at_retention(points: list[dict], budget: float) -> dict | None:
    """Among points whose *validation* retention rise is within budget, the one with the best *validation*
    accuracy; the report states its test accuracy and test rise."""
    fits = [p for p in points if (r := rise(p, "validation")) is not None and r <= budget]
    return select_on_validation(fits)


def retention_at_accuracy(points: list[dict], target: float) -> dict | None:
    """Among points whose *validation* accuracy reaches the target, the one with the smallest *validation*
    retention rise; the report states its test rise and test accuracy."""
    reach = [p for p in points if (p.get("validation_task_accuracy") or 0.0) >= target]
    ranked = [p for p in reach if rise(p, "validation") is not None]
    return min(ranked, key=lambda p: rise(p, "validation")) if ranked else None


def steps_to_accuracy(points: list[dict], target: float) -> dict | None:
    """The point with the fewest steps (then the least compute) whose validation accuracy reaches the target."""
    reach = [p for p in points if (p.get("validation_task_accuracy") or 0.0) >= target]
    return min(reach, key=lambda p: (p["max_steps"], p.get("compute_s", 0.0))) if reach else None


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both test accuracy (higher) and test retention rise (lower), by rise.

    A description of what the runs reached, drawn in the plot; no setting is chosen from it."""
    scored = [p for p in points if p.get("task_accuracy") is not None and rise(p) is not None]
    front, best = [], -1.0
    for p in sorted(scored, key=lambda p: (rise(p), -p["task_accuracy"])):
        if p["task_accuracy"] > best:
            front.append(p)
            best = p["task_accuracy"]
    return front
