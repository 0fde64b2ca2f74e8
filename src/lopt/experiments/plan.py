"""`lopt plan`: the memory of one training step for any model size, without allocating it: weights, gradients,
optimizer states, activations and the step's peak, per configuration, at full depth.

How each number is made (the fake-tensor step, depth, states, the step's worst moment) is in
lopt.experiments.plan_step; what fits a GPU and how fast, fastest first, in lopt.experiments.plan_fit.

Importable API: activation_bytes(config, method, batch_size, seq_len, dtype) -> int,
step_peak(count, method, precision, layer_act) -> dict, make_plan(config, seq_len, ...) -> dict,
format_plan(plan) -> str.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Sequence

from lopt.experiments.bench import MB, config_of
from lopt.experiments.plan_step import (  # noqa: F401  (re-exported: the plan's API)
    GB,
    OIB,
    PLAN_METHODS,
    PRECISIONS,
    Method,
    StepCount,
    activation_bytes,
    count_step,
    fake_step,
    layer_act_bytes,
    layer_method,
    parse_method,
    state_bytes,
    step_moments,
    step_peak,
    with_depth,
)


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '141 GB', '24000MB' -> bytes (GB and GiB both mean 2**30: GPU sizes are quoted in GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match or not (match.group(2) or match.group(3)) or float(match.group(1)) <= 0:
        raise ValueError(
            f"--gpu_memory {text!r} is not a size: write a positive number with a unit, e.g. 80GB or 24000MB."
        )
    value, unit = float(match.group(1)), match.group(2).upper()
    return int(value * 1024 ** "BKMGT".index(unit or "B"))


MICRO_BATCH_LIMIT = (
    64  # the search stops here (reported as ">= 64"): the fake head's chunk loop grows with it
)


def _largest_micro_batch(act: Callable[[int], int], budget: int, limit: int = MICRO_BATCH_LIMIT) -> int:
    """The largest micro-batch (up to `limit`) whose bytes `act(b)`, nondecreasing in b, fit `budget` (0 if none):
    a first probe where the affine guess from 1 and 2 puts it, then a bisection (a step's peak need not be affine
    in the micro-batch: gradients can be its worst moment at small ones, activations at large ones)."""
    if act(1) > budget:
        return 0
    slope = max(1, act(2) - act(1))
    fits, too_big = 1, None  # act(fits) <= budget < act(too_big)
    probe = min(limit, 1 + (budget - act(1)) // slope)
    while too_big is None:
        if probe > fits and act(probe) > budget:
            too_big = probe
        elif probe >= limit:
            return limit
        else:
            fits, probe = max(fits, probe), min(limit, 2 * max(fits, probe))
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        fits, too_big = (middle, too_big) if act(middle) <= budget else (fits, middle)
    return fits


def make_plan(
    config,
    seq_len: int,
    batch_size: int = 1,
    dtype: str = "bfloat16",
    methods: Sequence[str] = PLAN_METHODS,
    num_gpus: int = 1,
    gpu_memory: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Per method: activation bytes (this dtype), per-GPU states for both precisions and the step's peak (this dtype)
    on one GPU, or DDP and FSDP over `num_gpus`; with `gpu_memory`, what fits and the largest micro-batch at this
    sequence length."""
    log = log or (lambda msg: None)
    parsed = [parse_method(m) for m in methods]  # unknown names: a ValueError before any work
    if seq_len < 2 or batch_size < 1 or num_gpus < 1:
        raise ValueError("--seq_len must be >= 2, --batch_size and --num_gpus >= 1.")
    if dtype not in PRECISIONS:
        raise ValueError(f"--dtype must be one of {list(PRECISIONS)}, got {dtype!r}.")
    parallels = ["single"] if num_gpus == 1 else ["ddp", "fsdp"]
    counts: dict[tuple[str, int], StepCount] = {}  # (bench config, micro-batch): "+oib" shares its fake steps
    layer_acts: dict[tuple[str, int], int] = {}

    def count_of(bench: str, micro_batch: int) -> StepCount:
        if (bench, micro_batch) not in counts:
            counts[bench, micro_batch] = count_step(config, bench, micro_batch, seq_len, dtype)
            gc.collect()
        return counts[bench, micro_batch]

    def layer_act_of(micro_batch: int, method: str) -> int:
        key = (layer_method(method), micro_batch)
        if key not in layer_acts:
            layer_acts[key] = layer_act_bytes(config, micro_batch, seq_len, dtype, key[0])
        return layer_acts[key]

    rows = []
    for method in parsed:
        count = count_of(method.bench, batch_size)
        layer_act = layer_act_of(batch_size, method.name)
        row = {
            "method": method.name,
            "label": method.label,
            "oib": method.oib,
            "gc": config_of(method.bench).gc,
            "gc_layers": count.gc_layers,
            "act_bytes": count.act_bytes,
            "phase_act_bytes": list(count.phase_act),
            "layer_act_bytes": layer_act,
            "params": count.params,
            "trainable": count.trainable,
            "tied": count.tied,
        }
        for precision in PRECISIONS:
            for parallel in parallels:
                row[f"{precision}/{parallel}"] = state_bytes(count, precision, parallel, num_gpus)
        row["step"] = {p: step_peak(count, method.name, dtype, layer_act, p, num_gpus) for p in parallels}
        row["total"] = {p: s["peak"] for p, s in row["step"].items()}
        log(
            f"[plan] {method.name}: activations {count.act_bytes / MB:.1f} MB, step peak "
            f"{row['total'][parallels[0]] / MB:.1f} MB ({row['step'][parallels[0]]['moment']})"
        )
        if gpu_memory is not None:
            row["fits"] = {p: total <= gpu_memory for p, total in row["total"].items()}
            row["max_micro_batch"] = {}
            for p, step in row["step"].items():
                persistent = step["weights"] + step["optimizer"] + step["gathered"]

                def alive(micro_batch: int, method=method, p=p) -> int:
                    s = step_peak(
                        count_of(method.bench, micro_batch),
                        method.name,
                        dtype,
                        layer_act_of(micro_batch, method.name),
                        p,
                        num_gpus,
                    )
                    return s["grads"] + s["act"]

                budget = gpu_memory - persistent
                row["max_micro_batch"][p] = 0 if budget <= 0 else _largest_micro_batch(alive, budget)
        rows.append(row)
    _add_ratios(rows, parallels)
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "dtype": dtype,
        "num_gpus": num_gpus,
        "gpu_memory": gpu_memory,
        "parallels": parallels,
        "rows": rows,
    }


def _add_ratios(rows: list[dict], parallels: list[str]) -> None:
    """Activations against e2e with the same checkpointing; the step's peak against e2e (same checkpointing, no
    +oib) and, for +oib rows, against e2e+oib (same checkpointing)."""
    e2e = {}
    for row in rows:
        bench = config_of(parse_method(row["method"]).bench)
        if (
            bench.backward is None
            and bench.method == "e2e"
            and bench.head == "fused"
            and bench.gc_layers is None
        ):
            e2e[row["gc"], row["oib"]] = row
    for row in rows:
        gc = row["gc"] and row.get("gc_layers") is None  # "+gcN" against e2e without checkpointing
        plain, oib = e2e.get((gc, False)), e2e.get((gc, True))
        row["act_ratio"] = row["act_bytes"] / plain["act_bytes"] if plain else None
        p = parallels[0]
        row["total_ratio"] = row["total"][p] / plain["total"][p] if plain else None
        row["total_ratio_oib"] = row["total"][p] / oib["total"][p] if oib and row["oib"] else None


def _micro_batch_text(value: int) -> str:
    return f">= {value}" if value >= MICRO_BATCH_LIMIT else str(value)


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.2f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def format_plan(plan: dict, markdown: bool = False) -> str:
    """One row per method: activations, the step's peak and what it is made of (one GPU), or states and step peak
    per parallelism (N GPUs), and with --gpu_memory fit / largest micro-batch."""
    parallels, n = plan["parallels"], plan["num_gpus"]
    names = {"single": "1 GPU", "ddp": f"DDP x{n}", "fsdp": f"FSDP x{n}"}
    rows = plan["rows"]
    with_oib = any(row["total_ratio_oib"] is not None for row in rows)
    header = ["method", "act. GB", "x E2E"]
    if parallels == ["single"]:
        header += ["weights GB", "AdamW GB", "grads GB", "act. at peak GB", "step peak GB", "x E2E"]
        header += ["x E2E+OiB"] if with_oib else []
        header += ["worst moment"]
    else:
        for p in parallels:
            header += [f"{names[p]}: weights+AdamW GB", f"{names[p]}: step peak GB"]
    if plan["gpu_memory"] is not None:
        header += [f"{names[p]}: max micro-batch" for p in parallels]
    cells = []
    for row in rows:
        line = [row["label"], _gb(row["act_bytes"]), _ratio(row["act_ratio"])]
        fits = {
            p: "" if plan["gpu_memory"] is None else (" fits" if row["fits"][p] else " no") for p in parallels
        }
        if parallels == ["single"]:
            step = row["step"]["single"]
            line += [_gb(step["weights"]), _gb(step["optimizer"]), _gb(step["grads"]), _gb(step["act"])]
            line += [_gb(step["peak"]) + fits["single"], _ratio(row["total_ratio"])]
            line += [_ratio(row["total_ratio_oib"])] if with_oib else []
            line += [step["moment"]]
        else:
            for p in parallels:
                step = row["step"][p]
                persistent = step["weights"] + step["optimizer"] + step["gathered"]
                line += [_gb(persistent), _gb(step["peak"]) + fits[p]]
        if plan["gpu_memory"] is not None:
            line += [_micro_batch_text(row["max_micro_batch"][p]) for p in parallels]
        cells.append(line)
    dtype = plan["dtype"]
    precision = (
        "bf16 weights and gradients, fp32 master weights + AdamW m, v (16 B/param)"
        if dtype == "bfloat16"
        else "fp32 weights, gradients, AdamW m, v (16 B/param)"
    )
    notes = [
        f"act. = peak bytes saved for backward of one step at micro-batch {plan['batch_size']} x seq "
        f"{plan['seq_len']} in {dtype} (TRL fused LM head; fake-tensor step through lopt bench's meter); x E2E: "
        "against E2E with the same checkpointing.",
        f"states: {precision}; a tied embedding and LM head once (LoPT keeps the tie), LoPT's aux heads included.",
        "step peak = weights + AdamW states + what is alive at the step's worst moment: the gradients (all the "
        "step wrote so far; with opt. in bwd only the block, or parameter, being stepped and a tied matrix) and "
        "the activations (that backward's, plus one recomputed layer under GC). x E2E: against E2E with the same "
        "checkpointing"
        + ("; x E2E+OiB: against E2E with the optimizer in the backward." if with_oib else "."),
        "FSDP: states / N plus the gathered working set (root unit, two layers' weights, one layer's gradient).",
        "not included: optimizer temporaries, autograd's transient buffers, allocator fragmentation, CUDA context.",
    ]
    if plan["gpu_memory"] is not None:
        notes.append(
            f"fits / no: step peak <= --gpu_memory {plan['gpu_memory'] / GB:.0f} GB; max micro-batch: the largest "
            f"micro-batch at seq {plan['seq_len']} whose step peak fits (0: none; the search stops at "
            f"{MICRO_BATCH_LIMIT})."
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines + [""] + [f"- {x}" for x in notes])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))
    return "\n".join(lines + [""] + [f"* {x}" for x in notes])
