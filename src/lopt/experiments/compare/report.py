"""report.md of a compare: each method at its setting chosen on validation, every point of a sweep, accuracy at matched
retention and retention at matched accuracy, and LoPT against e2e on each goal, with the numbers (met / MISSED).
"""

from __future__ import annotations

from lopt.experiments.compare.select import (
    accuracy_at_retention,
    points_of,
    retention_at_accuracy,
    rise,
    select_on_validation,
    steps_to_accuracy,
)
from lopt.experiments.compare.spec import _base_name, _is_lopt


def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def _method_table(names, columns, pick, describe, missing="—") -> list[str]:
    """A markdown table with a row per method and a cell per column: describe(pick(name, column index))."""
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in names:
        cells = [missing if (p := pick(name, i)) is None else describe(p) for i in range(len(columns))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def format_report(results: dict) -> str:
    if results["setup"].get("trainer") == "grpo":
        return format_grpo_report(results)
    methods = results["methods"]
    e2e = methods.get("e2e") or {}
    e2e_activation = e2e.get("activation_peak_bytes") or results.get("e2e_activation_peak_bytes")
    setup = results["setup"]
    spread = setup["seeds"] > 1
    lines = ["# lopt compare", "", *_setup_lines(setup)]
    lines += [
        "",
        "## Each method at its setting chosen on validation, reported on test",
        "",
        "| method | lr | steps | seeds | act. peak MB (x e2e) | peak mem MB | step s (x e2e) | tokens/s | "
        "task acc | retention ppl (before → after) | ppl rise (x e2e) | final task loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        act = m.get("activation_peak_bytes")  # None: not measured (--report_only)
        act_text = "—" if act is None else f"{act / 2**20:.1f} ({_fmt_ratio(_ratio(act, e2e_activation))})"
        time_ratio = _ratio(m.get("step_time_s"), e2e.get("step_time_s"))
        acc_text = _pct(m.get("task_accuracy"), m.get("task_accuracy_std") if spread else None)
        ppl = m.get("retention_ppl")
        ppl_text = "—" if ppl is None else f"{m['retention_ppl_before']:.1f} → {ppl:.1f}"
        if spread and ppl is not None and "retention_ppl_std" in m:
            ppl_text += f" ± {m['retention_ppl_std']:.1f}"
        rise_text = "—"
        if ppl is not None and e2e.get("retention_ppl") is not None:
            ppl_rise = ppl - m["retention_ppl_before"]
            rise_ratio = _ratio(ppl_rise, e2e["retention_ppl"] - m["retention_ppl_before"])
            rise_text = f"{ppl_rise:+.1f} ({_fmt_ratio(rise_ratio)})"
        lr_text = f"{m['learning_rate']:g}" if "learning_rate" in m else "—"
        lines.append(
            f"| {name} | {lr_text} | {m.get('max_steps', '—')} | {m.get('seeds', '—')} | "
            f"{act_text} | "
            f"{m.get('peak_memory_bytes', 0) / 2**20:.0f} | "
            f"{m.get('step_time_s', float('nan')):.3f} ({_fmt_ratio(time_ratio)}) | "
            f"{m.get('tokens_per_s', float('nan')):.0f} | {acc_text} | {ppl_text} | {rise_text} | "
            f"{m.get('final_task_loss', float('nan')):.3f} |"
        )
    lines += _grid_lines(methods)
    from lopt.evaluation.lm_eval_tasks import format_lm_eval_report
    from lopt.experiments.compare.world_knowledge import format_world_knowledge_report

    lines += ["", *format_lm_eval_report(results), *format_world_knowledge_report(results)]
    lines += ["", "## What the numbers show", "", *summarize(results), ""]
    if results.get("points"):
        lines += _sweep_sections(results)
    lines += [
        "Activation peak: bytes saved for backward during one training step on one batch (same meter as `lopt "
        "bench`; through TRL's fused LM head, as `lopt sft` trains). Peak memory: the training process's peak RSS (CPU) or "
        "max allocated (GPU). Step time and tokens/s: medians over logging intervals; compute = median step "
        "time x steps.",
        "",
        "![accuracy vs retention fronts](fronts.png) ![loss curves](loss_curves.png) "
        "![memory and time](memory_time.png) ![accuracy vs retention](accuracy_retention.png)",
        "",
    ]
    return "\n".join(lines)


def format_grpo_report(results: dict) -> str:
    """report.md of a GRPO compare (`--trainer grpo`): the common SFT start, then each method at its rate chosen on
    validation: test accuracy and its gain over the start, the reward curve's first and last logged window, knowledge
    kept against the base and against the start, the retention-perplexity rise, step time and peak memory."""
    import shlex

    setup, methods, start = results["setup"], results["methods"], results["start"]
    scores = start["scores"]
    made = start.get("command") is not None
    how = (
        f"made once by `python -m lopt {shlex.join([*start['command'], '--output_dir', start['path']])}`"
        if made
        else "given with --start_checkpoint"
    )
    grpo = [
        "grpo",
        "--model_name_or_path",
        start["path"],
        "METHOD FLAGS",
        "--learning_rate",
        "LR",
        "--seed",
        "S",
    ]
    grpo += ["--max_steps", "N", "--eval_samples", "0", "--no_progress", *setup.get("grpo_args", [])]
    lines = ["# lopt compare: GRPO from one SFT start", "", *_setup_lines(setup), ""]
    lines += [
        f"Every run starts from the same SFT checkpoint, `{start['path']}` (sha256 {start['digest'][:16]}), {how}; "
        f"each run is `python -m lopt {' '.join(grpo)}`, so the methods differ in the GRPO phase alone.",
        "",
        f"The start: test accuracy {_pct(scores.get('task_accuracy'))} (validation "
        f"{_pct(scores.get('validation_task_accuracy'))}), retention perplexity "
        + _number(scores.get("retention_ppl"))
        + f" (base {_number(results['before'].get('retention_ppl'))})"
        + (
            f", knowledge kept against the base {_pct(scores['knowledge_kept'])}"
            if scores.get("knowledge_kept") is not None
            else ""
        )
        + ".",
        "",
        "## Each method at its rate chosen on validation, reported on test",
        "",
        "| method | lr | steps | seeds | test acc | gain over start | val acc | reward first → last | "
        "knowledge kept: base / start | retention ppl rise: base / start | step s | peak mem MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(_grpo_cells(m, scores, setup["seeds"] > 1)) + " |")
    lines += _grid_lines(methods)
    if not any(m.get("knowledge_kept") is not None for m in methods.values()):
        lines += [
            "",
            "Knowledge kept: not scored (the world-knowledge probe runs on a real base, or with --world_knowledge "
            "on, and needs facts the base answers right).",
        ]
    from lopt.evaluation.lm_eval_tasks import format_lm_eval_report
    from lopt.experiments.compare.world_knowledge import format_world_knowledge_report

    lines += ["", *format_lm_eval_report(results), *format_world_knowledge_report(results)]
    lines += [
        "",
        "## Every (method, lr, steps) point",
        "",
        "Mean ± std over seeds. The validation column chooses; the others are the test side.",
        "",
        "| method | lr | steps | seeds | val acc | test acc | gain over start | reward first → last | "
        "knowledge kept: base / start | retention ppl rise: base / start | step s | peak mem MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        cells = _grpo_cells(p, scores, True)
        lines.append(
            f"| {p['method']} | {' | '.join(cells[:3])} | {cells[5]} | {' | '.join(cells[3:5])} | "
            f"{' | '.join(cells[6:])} |"
        )
    lines += [
        "",
        "Gain over start: test accuracy minus the start's, in points. Reward: the mean reward of the first and of "
        "the last logged window (`metrics.jsonl`). Knowledge kept: the share of the world-knowledge facts the base "
        "(the start) answers right that the run still answers right. Retention perplexity rise (English prose on a "
        "real base, held-out corpus documents on the built-in model): over the base's and over the start's, on the "
        "test half of the retention texts. Step time: median wall time per optimizer "
        "step over the logging windows after the first, generation included; peak memory: the training "
        "process's peak (max allocated on a GPU, peak RSS on a CPU), generation included.",
        "",
        "![reward curves](loss_curves.png) ![memory and time](memory_time.png) "
        "![accuracy vs retention fronts](fronts.png)",
        "",
    ]
    return "\n".join(lines)


def _grpo_cells(m: dict, start: dict, spread: bool) -> list[str]:
    """lr, steps, seeds, test acc, gain over start, val acc, reward, knowledge kept, ppl rise, step s, peak MB."""
    accuracy, start_accuracy = m.get("task_accuracy"), start.get("task_accuracy")
    gain = (
        "—" if accuracy is None or start_accuracy is None else f"{100 * (accuracy - start_accuracy):+.1f} pts"
    )
    first, last = m.get("reward_first"), m.get("reward_last")
    reward = "—" if first is None or last is None else f"{first:.3f} → {last:.3f}"
    kept = f"{_pct(m.get('knowledge_kept'))} / {_pct(m.get('knowledge_kept_vs_start'))}"
    ppl = m.get("retention_ppl")
    rises = [
        "—" if ppl is None or not before else f"{100 * (ppl - before) / before:+.0f}%"
        for before in (m.get("retention_ppl_before"), start.get("retention_ppl"))
    ]
    memory = m.get("peak_memory_bytes")
    return [
        f"{m['learning_rate']:g}",
        str(m.get("max_steps", "—")),
        str(m.get("seeds", "—")),
        _pct(accuracy, m.get("task_accuracy_std") if spread else None),
        gain,
        _pct(m.get("validation_task_accuracy")),
        reward,
        kept,
        " / ".join(rises),
        f"{m.get('step_time_s', float('nan')):.3f}",
        "—" if memory is None else f"{memory / 2**20:.0f}",
    ]


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _setup_lines(setup: dict) -> list[str]:
    """The model, data, budgets, seeds and machine, and how many planned runs finished."""
    steps = setup["steps"] if isinstance(setup["steps"], list) else [setup["steps"]]
    lines = [
        f"Model `{setup['model']}` ({setup['num_layers']} layers, vocab {setup['vocab_size']}), data: "
        f"{setup['data']}, step budgets {', '.join(map(str, steps))}, {setup['seeds']} seed(s), "
        f"{setup['device']}, torch {setup['torch']}, transformers {setup['transformers']}.",
    ]
    if "runs" in setup:
        finished = setup.get("runs_finished", setup["runs"])
        lines.append(
            f"{finished} of {setup['runs']} planned runs ({setup['runs_reused']} reused from earlier, finished "
            f"runs); scored on {setup['validation_rows']} validation and {setup['test_rows']} test rows."
        )
        if finished < setup["runs"]:
            lines.append(
                "**Not every planned run has finished** (a --time_limit stopped the sweep, or --report_only read it "
                "in progress): points show how many seeds they have; rerun the same command without either to "
                "finish it (finished runs are reused)."
            )
        if setup.get("methods_without_runs"):
            lines.append(f"No run finished for: {', '.join(setup['methods_without_runs'])}.")
    return lines


def _grid_lines(methods: dict) -> list[str]:
    """Each method's learning-rate grid (the rates that ran), the planned rates that did not, the rates compare added
    past an edge, and a plain mark on every method whose choice is still at an edge of its grid (its best rate may
    lie outside it) or that ran at one rate."""
    if not any("grid" in m for m in methods.values()):
        return []  # results written before compare extended grids
    lines = ["", "Learning-rate grids (choice on validation in bold):"]
    for name, m in methods.items():
        rates = ", ".join(f"**{lr:g}**" if lr == m["learning_rate"] else f"{lr:g}" for lr in m["grid"])
        text = f"- {name}: {rates}"
        if m["grid_added"]:
            text += f" (added past an edge: {', '.join(f'{lr:g}' for lr in m['grid_added'])})"
        if m.get("grid_not_run"):  # absent in results written before compare recorded it
            text += f" (planned, not run: {', '.join(f'{lr:g}' for lr in m['grid_not_run'])})"
        edge = m["grid_edge"]
        if edge == "one rate":
            text += ": **one rate, not tuned**"
        elif edge is not None:
            beyond = "lower" if edge == "low" else "higher"
            text += f": **chosen at the {edge} edge of its grid; a {beyond} rate may do better**"
        lines.append(text)
    return lines


def _pct(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def _rise_text(point: dict, side: str = "test") -> str:
    r = rise(point, side)
    return "—" if r is None else f"{100 * r:+.0f}%"


def _where(point: dict) -> str:
    return f"lr {point['learning_rate']:g}, {point['max_steps']} steps"


def _sweep_sections(results: dict) -> list[str]:
    """Every point; accuracy at matched retention; retention at matched accuracy; steps to an accuracy."""
    setup = results["setup"]
    names = list(results["methods"])
    lines = [
        "## Every (method, lr, steps) point",
        "",
        "Mean ± std over seeds. Validation columns choose, test columns report. Retention rise: perplexity rise "
        "over the base model's, in % of the base model's (validation and test use disjoint halves of the "
        "retention texts).",
        "",
        "| method | lr | steps | seeds | val acc | val rise | test acc | test ppl | test rise | step s | compute s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        ppl = p.get("retention_ppl")
        ppl_text = (
            "—"
            if ppl is None
            else f"{ppl:.1f}" + (f" ± {p['retention_ppl_std']:.1f}" if "retention_ppl_std" in p else "")
        )
        lines.append(
            f"| {p['method']} | {p['learning_rate']:g} | {p['max_steps']} | {p['seeds']} | "
            f"{_pct(p.get('validation_task_accuracy'), p.get('validation_task_accuracy_std'))} | "
            f"{_rise_text(p, 'validation')} | {_pct(p.get('task_accuracy'), p.get('task_accuracy_std'))} | "
            f"{ppl_text} | {_rise_text(p)} | {p.get('step_time_s', float('nan')):.3f} | "
            f"{p.get('compute_s', float('nan')):.1f} |"
        )
    budgets, targets = setup["retention_budgets"], setup["accuracy_targets"]
    steps = setup["steps"]
    lines += [
        "",
        "## Accuracy at matched retention",
        "",
        "For each retention budget (rise ≤ x% of the base model's perplexity), each method's run is chosen "
        "without looking at the test split: among its points whose *validation*-side retention rise fits the "
        "budget, the one with the best *validation* accuracy. The cell gives that point's *test* accuracy, its "
        "setting and its test-side rise. — : no point fits.",
        "",
    ]
    for label, pool_steps in [("any step budget", steps)] + (
        [(f"{s} steps", [s]) for s in steps] if len(steps) > 1 else []
    ):
        lines += [f"{label}:", ""]
        lines += _method_table(
            names,
            [f"rise ≤ {100 * b:.0f}%" for b in budgets],
            lambda name, i, pool_steps=pool_steps: accuracy_at_retention(
                [p for p in points_of(results, name) if p["max_steps"] in pool_steps], budgets[i]
            ),
            lambda p: f"{_pct(p.get('task_accuracy'))} ({_where(p)}; rise {_rise_text(p)})",
        )
        lines.append("")
    lines += [
        "## Retention at matched accuracy",
        "",
        "For each accuracy target, each method's point with the smallest *validation* retention rise among those "
        "whose *validation* accuracy reaches it; the cell gives that point's *test* rise and test accuracy.",
        "",
    ]
    target_columns = [f"val acc ≥ {100 * t:.0f}%" for t in targets]
    lines += _method_table(
        names,
        target_columns,
        lambda name, i: retention_at_accuracy(points_of(results, name), targets[i]),
        lambda p: f"rise {_rise_text(p)} ({_where(p)}; acc {_pct(p.get('task_accuracy'))})",
    )
    lines += [
        "",
        "## Steps and compute to reach a validation accuracy",
        "",
        "The smallest step budget at which some lr reaches the target on validation (mean over seeds); compute = "
        "median step time x steps on this machine. Budgets are separate runs, each with its own full schedule.",
        "",
    ]
    lines += _method_table(
        names,
        target_columns,
        lambda name, i: steps_to_accuracy(points_of(results, name), targets[i]),
        lambda p: f"{p['max_steps']} steps, {p['compute_s']:.1f} s (lr {p['learning_rate']:g})",
        missing="not reached",
    )
    lines += [
        "",
        "## LoPT against e2e, goal by goal (chosen on validation, stated on test)",
        "",
        *goals(results),
        "",
    ]
    return lines


def _lopt_variants(results: dict) -> list[str]:
    """LoPT methods that stand for the engine: lopt_joint has lopt's gradients, so it is not a variant."""
    return [n for n in results["methods"] if _is_lopt(n) and _base_name(n) != "lopt_joint"]


def goals(results: dict) -> list[str]:
    """LoPT's goals against e2e, each the measured comparison with its numbers and met / MISSED. The best LoPT variant at a budget is chosen
    from all LoPT methods' points on validation, exactly as each method's own point is."""
    setup = results["setup"]
    variants = _lopt_variants(results)
    if "e2e" not in results["methods"] or not variants:
        return ["- Needs e2e and at least one LoPT method."]
    e2e_points = points_of(results, "e2e")
    lopt_points = [p for n in variants for p in points_of(results, n)]
    out = []

    def check(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def versus(mine, theirs, what, better) -> str:
        if mine is None and theirs is None:
            return f"{what}: neither e2e nor LoPT has a point (n/a)."
        if theirs is None:
            return f"{what}: {_describe_point(mine)}; e2e has no point: met."
        if mine is None:
            return f"{what}: {_describe_point(theirs)}; no LoPT point: MISSED."
        return f"{what}: {_describe_point(mine)} vs {_describe_point(theirs)}: {check(better(mine, theirs))}."

    def within_2_points(mine, theirs):
        return 100 * (mine["task_accuracy"] - theirs["task_accuracy"]) >= -2

    steps = setup["steps"]
    for s in steps:
        for b in setup["retention_budgets"]:
            pick = [
                accuracy_at_retention([p for p in pts if p["max_steps"] == s], b)
                for pts in (lopt_points, e2e_points)
            ]
            out.append(
                "- "
                + versus(
                    *pick,
                    f"accuracy within 2 points of e2e at rise ≤ {100 * b:.0f}%, {s} steps",
                    within_2_points,
                )
            )
    if len(steps) > 1:
        for b in setup["retention_budgets"]:
            mine, theirs = accuracy_at_retention(lopt_points, b), accuracy_at_retention(e2e_points, b)
            line = versus(
                mine,
                theirs,
                f"the same with each at its own best step budget, rise ≤ {100 * b:.0f}%",
                within_2_points,
            )
            if mine is not None and theirs is not None:
                line += f" Compute: LoPT {mine['compute_s']:.1f} s, e2e {theirs['compute_s']:.1f} s."
            out.append("- " + line)
    for t in setup["accuracy_targets"]:
        pick = retention_at_accuracy(lopt_points, t), retention_at_accuracy(e2e_points, t)
        out.append(
            "- "
            + versus(
                *pick, f"retention rise ≤ e2e's at val acc ≥ {100 * t:.0f}%", lambda m, e: rise(m) <= rise(e)
            )
        )
    k4 = [p for n in variants if _base_name(n).startswith("lopt_k4") for p in points_of(results, n)]
    best = select_on_validation(k4)
    if best is not None:
        same = [
            p
            for p in e2e_points
            if (p["learning_rate"], p["max_steps"]) == (best["learning_rate"], best["max_steps"])
        ]
        if same and rise(best) is not None and rise(same[0]) is not None:
            out.append(
                f"- k=4 does not collapse (rise ≤ e2e's at the same lr and steps): {_describe_point(best)} vs "
                f"{_describe_point(same[0])}: {check(rise(best) <= rise(same[0]))}."
            )
        else:
            out.append(f"- k=4 does not collapse: no e2e run at {_where(best)} (n/a).")
        freeze = results["methods"].get("freeze")
        if freeze is not None and best.get("task_accuracy") is not None:
            out.append(
                f"- k=4 beats freeze on accuracy: {best['method']} {_pct(best['task_accuracy'])} vs freeze "
                f"{_pct(freeze.get('task_accuracy'))} ({_where(freeze)}): "
                f"{check(best['task_accuracy'] > (freeze.get('task_accuracy') or 0.0))}."
            )
    if _fewest_seeds(results) < 3:
        out.append("- Fewer than 3 seeds: these verdicts are not reliable.")
    return out


def _fewest_seeds(results: dict) -> int:
    """Seeds behind the least-seeded chosen point (a --time_limit can leave some points short)."""
    chosen = results["methods"].values()
    return min((m.get("seeds", results["setup"]["seeds"]) for m in chosen), default=0)


def _describe_point(p: dict) -> str:
    return f"{p['method']} ({_where(p)}) {_pct(p.get('task_accuracy'))}, rise {_rise_text(p)}"


def _fmt_ratio(ratio) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def summarize(results: dict) -> list[str]:
    """Plain statements of each method against e2e and its target ratio; whatever the numbers are."""
    methods = results["methods"]
    e2e = methods.get("e2e")
    if e2e is None:
        return ["No e2e run, so no ratios."]
    out = []

    def check(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for name, limit in (("lopt", 0.56), ("lopt_k4", 0.35)):
        r = _ratio(methods.get(name, {}).get("activation_peak_bytes"), e2e.get("activation_peak_bytes"))
        if r is not None:
            out.append(f"- {name} activation peak is {r:.2f}x e2e (target ≤ {limit}): {check(r <= limit)}.")
    r = _ratio(methods.get("lopt_joint", {}).get("activation_peak_bytes"), e2e.get("activation_peak_bytes"))
    if r is not None:
        out.append(
            f"- lopt_joint (the authors' single backward) activation peak is {r:.2f}x e2e: it saves no memory."
        )
    if "lopt" in methods:
        r = methods["lopt"]["step_time_s"] / e2e["step_time_s"]
        out.append(f"- lopt step time is {r:.2f}x e2e (target ≤ 1.0): {check(r <= 1.0)}.")
    freeze = methods.get("freeze")
    for name, m in methods.items():
        if not _is_lopt(name) or _base_name(name) == "lopt_joint":
            continue  # lopt_joint has lopt's gradients: its quality is lopt's
        parts = []
        if m.get("task_accuracy") is not None and e2e.get("task_accuracy") is not None:
            gap = 100 * (m["task_accuracy"] - e2e["task_accuracy"])
            parts.append(
                f"accuracy {100 * m['task_accuracy']:.1f}% ({gap:+.1f} points vs e2e, target within 2: {check(gap >= -2)}"
            )
            if freeze is not None and freeze.get("task_accuracy") is not None:
                parts[-1] += (
                    f"; freeze {100 * freeze['task_accuracy']:.1f}%, target above: {check(m['task_accuracy'] > freeze['task_accuracy'])}"
                )
            parts[-1] += ")"
        if m.get("retention_ppl") is not None and e2e.get("retention_ppl") is not None:
            before = m["retention_ppl_before"]
            rise, rise_e2e = m["retention_ppl"] - before, e2e["retention_ppl"] - before
            text = f"retention rise {rise:+.1f} vs e2e {rise_e2e:+.1f} (target ≤ half: {check(rise_e2e > 0 and rise <= rise_e2e / 2)})"
            if m["retention_ppl"] > 10 * before:
                text += f"; COLLAPSED (perplexity {m['retention_ppl']:.0f}, over 10x the base model's)"
            parts.append(text)
        if parts:
            out.append(f"- {name}: " + "; ".join(parts) + ".")
    if _fewest_seeds(results) < 3:
        out.append("- Fewer than 3 seeds: accuracy and retention differences are not reliable.")
    return out
