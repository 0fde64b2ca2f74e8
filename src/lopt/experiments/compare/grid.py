"""Fair learning-rate grids: a method chosen at an edge of its grid has not been shown its best rate, so `lopt
compare` extends that edge, a factor GRID_FACTOR at a time, until the rate chosen on validation is interior or
`--extend_grid` extra rates are spent. A method still at an edge afterwards is marked in the report.

Only validation numbers take part (`select_on_validation` on seed 0's runs, the ones every point has first); a
method run at one rate is the user's fixed choice, not a grid, and is marked as untuned rather than extended.
"""

from __future__ import annotations

from collections.abc import Callable

from lopt.experiments.compare.select import select_on_validation

GRID_FACTOR = 3.0


def grid_edge(grid: list[float], chosen_lr: float) -> str | None:
    """ "low" or "high" when `chosen_lr` is the smallest or largest rate of a grid of 2+ rates, else None."""
    if len(grid) < 2:
        return None
    if chosen_lr == min(grid):
        return "low"
    if chosen_lr == max(grid):
        return "high"
    return None


def next_rate(grid: list[float], edge: str) -> float:
    """The rate one step past `edge`: GRID_FACTOR below the lowest, or above the highest (3 significant digits)."""
    lr = min(grid) / GRID_FACTOR if edge == "low" else max(grid) * GRID_FACTOR
    return float(f"{lr:.3g}")


def extend_grids(spec, first_seed_points: Callable[[str], list[dict] | None]) -> dict[str, list[float]]:
    """Extends every edge-chosen grid of `spec` in place (spec.method_learning_rates) and returns the rates added per
    method. `first_seed_points(name)` gives seed 0's results at every point of the method's current grid (dicts with
    learning_rate and the validation numbers), running what is missing; None when it cannot (past --time_limit, or
    under --report_only without those runs): the extension stops there."""
    added: dict[str, list[float]] = {}
    for name in spec.methods:
        for added_so_far in range(spec.extend_grid + 1):
            points = first_seed_points(name)  # runs the rate added last
            if not points or added_so_far == spec.extend_grid:
                break
            grid = spec.learning_rates_of(name)
            edge = grid_edge(grid, select_on_validation(points)["learning_rate"])
            if edge is None:
                break
            lr = next_rate(grid, edge)
            spec.method_learning_rates[name] = sorted([*grid, lr])
            added.setdefault(name, []).append(lr)
    return added
