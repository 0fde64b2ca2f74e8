"""`lopt bench --activation_budget`: the race at a fixed activation budget. Per method, the fastest setting
(checkpointing off, on every layer, or for E2E on the fewest earliest layers that fit; a micro-batch with gradient
accumulation to the same global batch) whose measured activation peak fits; every method's best against E2E's best,
the fastest exact one (E2E trains what the others approximate: LoPT's local objective, a frozen half, LoRA's
low-rank update).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from lopt.experiments.bench import (
    CONFIGS,
    MB,
    BenchSpec,
    Runner,
    _sync,
    build_base_model,
    make_batch,
    training_loss,
)
from lopt.experiments.bench_report import _fmt, _fmt_mb, gc_text
from lopt.experiments.meter import SavedTensorMeter

RACE_METHODS = ("e2e", "lopt-k2", "lopt-k4", "freeze", "lora")
RACE_SPEEDUP_TARGET = 1.15  # the goal: LoPT's tokens/s >= 1.15x E2E's best setting that fits
AUTO_BUDGET_FRACTION = 0.6  # auto budget: 0.6 x E2E's no-GC activation peak at micro-batch 1


def _micro_batches(batch_size: int) -> list[int]:
    return [m for m in range(1, batch_size + 1) if batch_size % m == 0]


def accumulated_step(runner: Runner, input_ids: torch.Tensor, micro_batch: int) -> None:
    """One optimizer step on the global batch, as `micro_batch`-row slices with gradient accumulation."""
    chunks = input_ids.split(micro_batch)
    scale = 1.0 / len(chunks)
    if runner.backward is not None:
        runner.model.loss_scale = scale  # LoPT's local backward scales its early gradients like the task's
    for chunk in chunks:
        (training_loss(runner.model, chunk, runner.head) * scale).backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)


def budget_race(
    spec: BenchSpec,
    budget_mb: float | None = None,
    methods: Sequence[str] = RACE_METHODS,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Per method, the fastest setting whose activation peak fits the budget: GC on or off, micro-batch m dividing
    spec.batch_size with gradient accumulation to the same global batch. Every (method, GC, m) is metered; the
    largest fitting m per (method, GC) is timed, all candidates interleaved in one run (round r runs each once).

    budget_mb None: AUTO_BUDGET_FRACTION x E2E's no-GC peak at micro-batch 1, so E2E needs checkpointing (or
    nothing fits it) while LoPT k=2 fits without it at micro-batch 1.
    """
    log = log or (lambda msg: None)
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        return _budget_race(spec, budget_mb, list(methods), log)
    finally:
        torch.set_num_threads(threads)


def _budget_race(spec: BenchSpec, budget_mb: float | None, methods: list[str], log) -> dict:
    if "e2e" not in methods:
        raise ValueError("the budget race needs e2e among its methods: its speed is the reference.")
    if spec.steps < 1:
        raise ValueError("--activation_budget times the settings: --steps must be >= 1.")
    base = build_base_model(spec)
    batch = make_batch(spec)
    runners = {}
    peaks: dict[tuple[str, bool, int], int] = {}
    for method in methods:
        for use_gc in (False, True):
            name = method + ("+gc" if use_gc else "")
            runner = runners[(method, use_gc)] = Runner(name, spec, base)
            for m in _micro_batches(spec.batch_size):
                gc.collect()
                with SavedTensorMeter() as meter:
                    runner.forward_backward(batch[:m])
                runner.optimizer.zero_grad(set_to_none=True)
                peaks[(method, use_gc, m)] = meter.peak
            log(f"[race] {name}: peaks " + ", ".join(
                f"m={m} {peaks[(method, use_gc, m)] / MB:.1f} MB" for m in _micro_batches(spec.batch_size)))  # fmt: skip
    auto = budget_mb is None
    budget = int(AUTO_BUDGET_FRACTION * peaks[("e2e", False, 1)]) if auto else int(budget_mb * MB)

    candidates = []
    for (method, use_gc), runner in runners.items():
        fitting = [m for m in _micro_batches(spec.batch_size) if peaks[(method, use_gc, m)] <= budget]
        if fitting:
            candidates.append({"method": method, "gc": use_gc, "micro_batch": max(fitting), "runner": runner})
    candidates += _selective_candidates(spec, base, batch, budget, peaks, log)
    del base
    times: dict[int, list[float]] = {i: [] for i in range(len(candidates))}
    for i in range(spec.warmup + spec.steps):
        for j in range(len(candidates)):
            index = (i + j) % len(candidates)
            cand = candidates[index]
            _sync(spec.device)
            t0 = time.perf_counter()
            accumulated_step(cand["runner"], batch, cand["micro_batch"])
            _sync(spec.device)
            if i >= spec.warmup:
                times[index].append(time.perf_counter() - t0)
        log(f"[race] round {i + 1}/{spec.warmup + spec.steps}" + (" (warmup)" if i < spec.warmup else ""))
    rows = []
    for index, cand in enumerate(candidates):
        median = statistics.median(times[index])
        rows.append({
            "method": cand["method"], "label": CONFIGS[cand["method"]].label, "gc": cand["gc"],
            "gc_layers": cand.get("gc_layers"), "exact": cand["method"] == "e2e",
            "micro_batch": cand["micro_batch"], "accumulation": spec.batch_size // cand["micro_batch"],
            "act_peak_bytes": peaks[(cand["method"], cand.get("gc_layers") or cand["gc"], cand["micro_batch"])],
            "step_times": times[index], "median_step_s": median, "tokens_per_s": spec.tokens_per_step / median,
        })  # fmt: skip
    best = {}
    for row in rows:
        if row["method"] not in best or row["tokens_per_s"] > best[row["method"]]["tokens_per_s"]:
            best[row["method"]] = row
    for row in rows:
        row["best"] = best[row["method"]] is row
        ref = best.get("e2e")
        row["speed_ratio"] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    return {
        "budget_bytes": budget,
        "auto_budget": auto,
        "global_batch": spec.batch_size,
        "peaks": [
            {"method": m, "gc": g, "micro_batch": mb, "act_peak_bytes": v}
            for (m, g, mb), v in peaks.items()
            if isinstance(g, bool)
        ],
        "selective_peaks": [
            {"method": m, "gc_layers": g, "micro_batch": mb, "act_peak_bytes": v}
            for (m, g, mb), v in peaks.items()
            if not isinstance(g, bool)
        ],
        "rows": rows,
        "e2e_needs_gc": not any(peaks[("e2e", False, m)] <= budget for m in _micro_batches(spec.batch_size)),
        "lopt_fits_without_gc": {
            m: any(peaks[(m, False, mb)] <= budget for mb in _micro_batches(spec.batch_size))
            for m in methods
            if m.startswith("lopt")
        },
    }


def _selective_candidates(spec: BenchSpec, base, batch, budget: int, peaks: dict, log) -> list[dict]:
    """E2E with the earliest N layers checkpointed: per micro-batch where no checkpointing does not fit and every
    layer does, the fewest layers that fit. Each layer checkpointed saves about the same (E2E's layers are alike),
    so N starts where the peaks without and with checkpointing put it, and grows until the metered peak fits."""
    layers = spec.num_layers
    out, runners = [], {}
    for m in _micro_batches(spec.batch_size):
        none, every = peaks[("e2e", False, m)], peaks[("e2e", True, m)]
        if none <= budget or every > budget or layers < 2:
            continue
        n = max(1, min(layers - 1, -(-(none - budget) * layers // (none - every))))
        while n < layers:
            name = f"e2e+gc{n}"
            runner = runners.get(n) or Runner(name, spec, base)
            gc.collect()
            with SavedTensorMeter() as meter:
                runner.forward_backward(batch[:m])
            runner.optimizer.zero_grad(set_to_none=True)
            peaks[("e2e", n, m)] = meter.peak
            log(f"[race] {name}: m={m} {meter.peak / MB:.1f} MB")
            if meter.peak <= budget:
                runners[n] = runner
                out.append({"method": "e2e", "gc": True, "gc_layers": n, "micro_batch": m, "runner": runner})
                break
            n += 1
    return out


def race_targets(race: dict) -> list[dict]:
    """PASS/MISS: the budget is one where E2E needs GC and LoPT does not; LoPT's best >= 1.15x E2E's best."""
    best = {row["method"]: row for row in race["rows"] if row["best"]}
    out = [
        {
            "target": "the budget needs GC for E2E and not for LoPT k=2 or k=4",
            "value": None,
            "status": "PASS"
            if race["e2e_needs_gc"] and any(race["lopt_fits_without_gc"].values())
            else "MISS",
        }
    ]
    for method in race["lopt_fits_without_gc"]:
        row = best.get(method)
        value = None if row is None or "e2e" not in best else row["speed_ratio"]
        status = "n/a" if value is None else ("PASS" if value >= RACE_SPEEDUP_TARGET else "MISS")
        text = f"{CONFIGS[method].label} tokens/s >= {RACE_SPEEDUP_TARGET:.2f}x E2E's best at the budget"
        out.append({"target": text, "value": value, "status": status})
    return out


def format_race(race: dict, markdown: bool = False) -> str:
    header = [
        "method",
        "GC",
        "micro-batch x accum.",
        "act. peak MB",
        "median step s",
        "tokens/s",
        "x E2E best",
        "exact",
        "",
    ]
    cells = [
        [
            row["label"], gc_text(row), f"{row['micro_batch']} x {row['accumulation']}",
            _fmt_mb(row["act_peak_bytes"]), f"{row['median_step_s']:.3f}", f"{row['tokens_per_s']:.0f}",
            _fmt(row["speed_ratio"], ".2f"), "yes" if row["exact"] else "no", "best" if row["best"] else "",
        ]
        for row in race["rows"]
    ]  # fmt: skip
    budget = f"{race['budget_bytes'] / MB:.1f} MB" + (
        f" (auto: {AUTO_BUDGET_FRACTION} x E2E's no-GC peak at micro-batch 1)" if race["auto_budget"] else ""
    )
    notes = [
        f"activation budget {budget}; global batch {race['global_batch']} per optimizer step for every setting.",
        "Per method and GC setting, the largest micro-batch whose measured activation peak fits; E2E also with the "
        "fewest earliest layers checkpointed that fit, per micro-batch (GC N layers); all timed interleaved in one "
        "run (median step = forward+backward of every micro-batch + AdamW step).",
        "x E2E best = tokens/s / E2E's fastest fitting setting, the fastest exact one; best = the method's fastest.",
        "exact: the gradient of the full model on the task (E2E, any checkpointing). LoPT trains its early blocks "
        "on a local objective, freeze trains the second half only, LoRA a low-rank update: what each costs in "
        "accuracy and retention is measured by `lopt compare` (docs/EVIDENCE.md), not here.",
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
    else:
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(x.ljust(w) for x, w in zip(c, widths)) for c in cells]
    lines += [""] + [("- " if markdown else "* ") + n for n in notes]
    lines += ["", "LoPT's goals against E2E:"]
    for t in race_targets(race):
        value = "" if t["value"] is None else f": {t['value']:.2f}x"
        lines.append(f"  [{t['status']:>4}] {t['target']}{value}")
    return "\n".join(lines)
