"""`lopt plan --gpu_memory`: every method and setting whose planned step peak fits that memory per GPU, fastest
first, and, for a model that fits nowhere at --num_gpus, how many GPUs each method needs under FSDP2.

The peaks are the plan's (lopt.experiments.plan_step). The step times are planned from FLOP counts, not measured:
each method's floating-point operations per token against E2E's without checkpointing at the same shape.

* A matrix multiply costs 2 FLOPs per weight per token forward; its backward 2x that for a trained weight (the
  input's and the weight's gradients), 1x for a frozen one that still passes a gradient (LoRA's base weights, its
  LM head), nothing where no gradient flows (freeze's first half). The weights per layer are the plan's own
  parameter counts (norms counted as matmuls: negligible).
* Causal attention: 2 * seq * (heads x head_dim) FLOPs per token and layer forward (QK^T and AV over seq / 2 keys on
  average), 2x that backward wherever the backward passes.
* The LM head: 2 * vocab * hidden forward. LoPT adds its aux heads (their parameters: the plan's count above E2E's).
* Checkpointing a layer recomputes its forward once in the backward (every layer: about 1.33x; the earliest N of L:
  about 1 + N / 3L); freeze recomputes only its trained half.
Not counted: the optimizer step (so "+oib" changes no time), communication (DDP's all-reduce, FSDP's all-gathers and
reduce-scatters), elementwise work, and how well each kernel runs (LoRA's small adapter matmuls run below their FLOPs).
"""

from __future__ import annotations

from lopt.experiments.bench import config_of
from lopt.experiments.plan_step import (
    GB,
    OIB,
    SELECTIVE_GC_METHODS,
    StepCount,
    count_step,
    parse_method,
    step_peak,
)

MAX_GPUS = 64  # the GPU-count search for a model that fits nowhere stops here
PARALLEL_NAMES = {"single": "1 GPU", "ddp": "DDP", "fsdp": "FSDP"}


def trains(method: str) -> str:
    """What a method trains, in words (the quality side is the evidence's, not the plan's)."""
    bench = config_of(parse_method(method).bench)
    if bench.backward is not None:
        return f"all weights, {bench.k} blocks with local losses"
    return {
        "e2e": "all weights, end-to-end",
        "freeze": "second half + LM head",
        "lora": "LoRA adapters",
    }[bench.method]


def step_flops(config, method: str, seq_len: int, e2e: StepCount, count: StepCount) -> float:
    """Planned FLOPs per token of one training step of `method` (forward, backward, recomputation), see the module
    docstring; `e2e` and `count` are the plan's step counts of e2e and of `method` at this shape."""
    from lopt.engine.config import LoPTConfig

    bench = config_of(parse_method(method).bench)
    depth = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer = 2 * e2e.layer_params + 2 * seq_len * heads * head_dim  # one layer's forward: matmuls + attention
    head = 2 * config.vocab_size * config.hidden_size
    recomputed = 0 if not bench.gc else (depth if bench.gc_layers is None else bench.gc_layers)
    if bench.method == "lora" and bench.backward is None:
        adapters = 2 * count.layer_trainable
        attention = layer - 2 * e2e.layer_params
        forward = depth * (layer + adapters) + head
        # backward: the frozen weights pass the input's gradient (1x), adapters and attention 2x, the head 1x
        backward = depth * (2 * e2e.layer_params + 2 * adapters + 2 * attention) + head
        return forward + backward + recomputed * (layer + adapters)
    if bench.method == "freeze" and bench.backward is None:
        trained = depth - LoPTConfig(num_blocks=2).block_ranges(depth)[-1][0]
        return depth * layer + 2 * trained * layer + 3 * head + min(recomputed, trained) * layer
    aux = 2 * (count.params - e2e.params)  # LoPT's aux heads (0 for e2e), each applied to every token once
    return 3 * (depth * layer + head + aux) + recomputed * layer


def _peak(config, name, plan, layer_act, parallel, num_gpus):
    count = count_step(config, parse_method(name).bench, plan["batch_size"], plan["seq_len"], plan["dtype"])
    return step_peak(count, name, plan["dtype"], layer_act, parallel, num_gpus)["peak"], count


def _selective(config, plan: dict, row: dict, sibling: dict | None, parallel: str, budget: int):
    """For a row with every layer checkpointed (e2e or lora) that fits where its sibling without checkpointing
    does not: the fewest earliest layers, "+gcN", whose planned step peak fits (None if none under all of them)."""
    parsed = parse_method(row["method"])
    base = parsed.bench.split("+")[0]
    if base not in SELECTIVE_GC_METHODS or not row["gc"] or row["gc_layers"] is not None or sibling is None:
        return None
    if sibling["total"][parallel] <= budget or row["total"][parallel] > budget:
        return None
    for n in range(1, config.num_hidden_layers):
        name = f"{base}{'+' + OIB if parsed.oib else ''}+gc{n}"
        peak, count = _peak(config, name, plan, row["layer_act_bytes"], parallel, plan["num_gpus"])
        if peak <= budget:
            return name, peak, count
    return None


def fit_listing(config, plan: dict) -> dict:
    """Every (method, parallelism) of `plan` (made with gpu_memory) whose step peak fits, plus for e2e and lora
    the fewest earliest checkpointed layers that fit, each with its planned step time against E2E without
    checkpointing, fastest first; and where nothing fits, the GPUs each method needs under FSDP."""
    budget, num_gpus = plan["gpu_memory"], plan["num_gpus"]
    shape = (plan["batch_size"], plan["seq_len"], plan["dtype"])
    e2e = count_step(config, "e2e", *shape)
    base_flops = step_flops(config, "e2e", plan["seq_len"], e2e, e2e)

    def ratio(name: str, count: StepCount) -> float:
        return step_flops(config, name, plan["seq_len"], e2e, count) / base_flops

    by_name = {row["method"]: row for row in plan["rows"]}
    listed, skipped_oib = [], False
    for row in plan["rows"]:
        parsed = parse_method(row["method"])
        count = count_step(config, parsed.bench, *shape)
        # lopt refuses the optimizer step in the backward with several processes
        if parsed.oib and num_gpus > 1:
            skipped_oib = True
            continue
        sibling = by_name.get(row["method"].replace("+gc", "")) if row["gc"] else None
        for parallel in plan["parallels"]:
            entry = {"parallel": parallel, "trains": trains(row["method"])}
            if row["total"][parallel] <= budget:
                peak = row["total"][parallel]
                listed.append({**entry, "method": row["method"], "label": row["label"], "peak": peak,
                               "time_ratio": ratio(row["method"], count)})  # fmt: skip
            selective = _selective(config, plan, row, sibling, parallel, budget)
            if selective is not None:
                name, peak, selective_count = selective
                label = f"{parse_method(name).label} of {config.num_hidden_layers}"
                listed.append({**entry, "method": name, "label": label, "peak": peak,
                               "time_ratio": ratio(name, selective_count)})  # fmt: skip
    order = {"single": 0, "ddp": 1, "fsdp": 2}  # at equal time DDP first: FSDP adds all-gathers
    listed.sort(key=lambda r: (round(r["time_ratio"], 6), order[r["parallel"]], r["peak"]))
    needed = []
    if not listed:
        for row in plan["rows"]:
            parsed = parse_method(row["method"])
            count = count_step(config, parsed.bench, *shape)
            gpus = None
            if not parsed.oib:
                gpus = gpus_needed(count, row["method"], plan["dtype"], row["layer_act_bytes"], budget)
            needed.append({"method": row["method"], "label": row["label"], "oib": parsed.oib, "gpus": gpus,
                           "time_ratio": ratio(row["method"], count)})  # fmt: skip
        needed.sort(key=lambda r: (r["oib"], r["gpus"] is None, r["gpus"] or 0, round(r["time_ratio"], 6)))
    return {"gpu_memory": budget, "num_gpus": num_gpus, "rows": listed, "gpus_needed": needed,
            "skipped_oib": skipped_oib}  # fmt: skip


def gpus_needed(
    count: StepCount, method: str, dtype: str, layer_act: int, budget: int, limit: int = MAX_GPUS
):
    """The fewest GPUs (2..limit) at which `method`'s planned per-GPU step peak under FSDP fits `budget`, else
    None."""
    for n in range(2, limit + 1):
        if step_peak(count, method, dtype, layer_act, "fsdp", n)["peak"] <= budget:
            return n
    return None


def format_fit(fit: dict, plan: dict) -> str:
    """The listing (or the GPU counts), with what its numbers are and where the quality side is."""
    n, memory = fit["num_gpus"], fit["gpu_memory"] / GB
    shape = f"micro-batch {plan['batch_size']} x seq {plan['seq_len']}, {plan['dtype']}"
    lines = []
    if fit["rows"]:
        lines.append(f"Fits {memory:g} GB per GPU on {n} GPU{'s' * (n > 1)} ({shape}), fastest first:")
        header = ["method", "parallel", "step peak GB", "planned time x E2E", "trains"]
        cells = [
            [
                r["label"],
                _parallel(r["parallel"], n),
                f"{r['peak'] / GB:.2f}",
                f"{r['time_ratio']:.2f}",
                r["trains"],
            ]
            for r in fit["rows"]
        ]
    else:
        lines.append(
            f"Nothing fits {memory:g} GB per GPU on {n} GPU{'s' * (n > 1)} ({shape}). GPUs each method needs "
            f"under FSDP (the fewest from 2 to {MAX_GPUS} at which its planned per-GPU step peak fits):"
        )
        header = ["method", "GPUs under FSDP", "planned time x E2E", "trains"]
        cells = [
            [r["label"], _gpus(r), f"{r['time_ratio']:.2f}", trains(r["method"])] for r in fit["gpus_needed"]
        ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)] if cells else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip() for c in cells]
    lines.append("")
    lines.append(
        "* planned time x E2E: FLOPs per step against E2E without checkpointing at the same micro-batch, from "
        "FLOP counts (see lopt.experiments.plan_fit), not measured on a GPU; the optimizer step, communication "
        "and kernel efficiency are not counted (LoRA's small adapter matmuls run slower than their FLOPs say)."
    )
    if fit["skipped_oib"]:
        lines.append(
            "* not listed: +oib rows (lopt runs the optimizer step in the backward on one GPU only)."
        )
    lines.append(
        "* quality: the methods train different things (trains); what each has cost in accuracy and retention "
        "in our runs is in README.md (Verdict) and docs/EVIDENCE.md."
    )
    return "\n".join(lines)


def _parallel(parallel: str, num_gpus: int) -> str:
    return PARALLEL_NAMES[parallel] + ("" if parallel == "single" else f" x{num_gpus}")


def _gpus(row: dict) -> str:
    if row["oib"]:
        return "1 GPU only (+oib)"
    return f"does not fit at {MAX_GPUS}" if row["gpus"] is None else str(row["gpus"])
