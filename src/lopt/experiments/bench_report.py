"""What `lopt bench` prints: the table of configurations, each goal as PASS/MISS, the line that describes the setup,
and lopt plan's figures beside the measurements (`planned_step_bytes` for the whole step; `full_depth_table` for a
cut depth, with its PASS/MISS check that plan and measurement agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lopt.experiments.bench import MB, BenchSpec, config_of

COLUMNS = (
    "config", "GC", "act. peak MB", "x E2E", "x E2E no-GC", "peak mem MB", "x E2E",
    "median step s", "x E2E", "tokens/s", "ref. copy MB",
)  # fmt: skip


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _fmt_mb(nbytes: int | None) -> str:
    if nbytes is None:
        return "—"
    # more decimals below 10 MB, so the tiny test models stay readable
    return f"{nbytes / MB:.1f}" if nbytes >= 10 * MB else f"{nbytes / MB:.3f}"


def _table_cells(rows: list[dict]) -> list[list[str]]:
    cells = []
    for row in rows:
        cells.append([
            row["label"],
            gc_text(row),
            _fmt_mb(row["act_peak_bytes"]),
            _fmt(row.get("act_ratio"), ".2f"),
            _fmt(row.get("act_ratio_vs_e2e_nogc"), ".2f"),
            _fmt_mb(row.get("peak_mem_bytes")),
            _fmt(row.get("peak_mem_ratio"), ".2f"),
            _fmt(row.get("median_step_s"), ".3f"),
            _fmt(row.get("time_ratio"), ".2f"),
            _fmt(row.get("tokens_per_s"), ".0f"),
            _fmt_mb(row.get("reference_bytes")) if row.get("reference_bytes") else "—",
        ])  # fmt: skip
    return cells


def gc_text(row: dict) -> str:
    """The GC column: yes (every layer), N layers (selective), no."""
    if not row["gc"]:
        return "no"
    return "yes" if row.get("gc_layers") is None else f"{row['gc_layers']} layers"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """One row per configuration; ratios are to E2E with the same checkpointing setting unless marked."""
    cells = _table_cells(rows)
    kinds = {row.get("peak_mem_kind") for row in rows} - {None}
    mem_note = {
        "rss_fresh_process": "peak mem = peak RSS of a fresh process per config minus its RSS before the first "
        "step (2 steps; includes gradients and AdamW state; glibc's mmap threshold fixed at 64 KiB, so freed "
        "tensors leave the RSS)",
        "cuda_allocated": "peak mem = torch.cuda.max_memory_allocated during a step minus memory allocated "
        "before it (includes gradients)",
    }
    footer = [
        "act. peak = peak bytes saved for backward over forward+backward (saved_tensors_hooks), each storage "
        "counted once while saved; parameters (and views of them, leaf tensors requiring grad) excluded.",
        "LM head: TRL's fused head (add_fused_lm_head, fused_lm_head=True: chunked log-probs, no [B, T, V] "
        "logits), as lopt sft trains; rows marked (HF loss) use the model's own loss over full logits, and "
        "their ratios are to E2E (HF loss).",
        "ref. copy = the anchor's frozen copy of the pretrained early weights (extra weight memory, outside "
        "peak mem, which is measured from after the model is built).",
        "GC rows: each checkpointed layer's saved input is counted; the tensors recomputed during the "
        "backward (one layer at a time) go through the checkpoint's own hooks and are not (peak mem sees them).",
        *(mem_note[k] for k in sorted(kinds)),
        "x E2E = ratio to E2E with the same GC setting; x E2E no-GC = activation ratio to E2E without GC. "
        "Step = forward + backward + AdamW step + zero_grad; median over interleaved rounds (each round runs "
        "every config once); its x E2E is the median of per-round ratios, so load drift between rounds cancels.",
    ]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines + [""] + [f"- {f}" for f in footer])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]

    def fmt_row(c: Sequence[str]) -> str:  # labels left-aligned, numbers right-aligned
        return "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))

    lines = [fmt_row(COLUMNS), "  ".join("-" * w for w in widths), *map(fmt_row, cells)]
    return "\n".join(lines + [""] + [f"* {f}" for f in footer])


def format_targets(targets: list[dict]) -> str:
    lines = ["LoPT's goals against E2E:"]
    for t in targets:
        value = "—" if t["value"] is None else f"{t['value']:.2f}x"
        extra = ""
        if t.get("peak_mem_ratio") is not None:
            extra = f"  (peak process memory: {t['peak_mem_ratio']:.2f}x)"
        lines.append(f"  [{t['status']:>4}] {t['target']}: {value}{extra}")
    return "\n".join(lines)


def describe_spec(spec: BenchSpec) -> str:
    if spec.model is not None:
        config = spec.model_config()
        depth = f"{spec.num_layers} of {spec.full_num_layers} layers"
        shape = (
            f"{spec.model} shape ({config.model_type}), {depth}, hidden {config.hidden_size}, intermediate "
            f"{config.intermediate_size}, {config.num_attention_heads} heads / {config.num_key_value_heads} kv, "
            f"vocab {config.vocab_size}, tied {config.tie_word_embeddings}"
        )
    else:
        shape = (
            f"Llama-shaped, {spec.num_layers} layers, hidden {spec.hidden_size}, intermediate "
            f"{spec.intermediate_size}, {spec.num_heads} heads, vocab {spec.vocab_size}"
        )
    repeats = (
        "activations only (one config at a time, no timing)"
        if spec.steps == 0
        else f"{spec.warmup} warmup + {spec.steps} timed steps per config (interleaved)"
    )
    return (
        f"{shape}, random weights; seq {spec.seq_len}, batch {spec.batch_size}, {spec.dtype} on {spec.device}; "
        f"{repeats}, torch {torch.__version__}, {spec.threads or torch.get_num_threads()} threads"
    )


WHOLE_STEP_COLUMNS = (
    "config", "GC", "weights MB", "grads MB", "optimizer MB", "act. MB", "sum MB", "step peak MB", "x E2E",
    "x E2E oib", "plan MB", "peak / plan",
)  # fmt: skip


def format_whole_step(
    rows: list[dict], plan_bytes: dict[str, int | None] | None = None, markdown: bool = False
) -> str:
    """The whole step per configuration: weights, the gradients' peak, optimizer states, activations, their sum and
    the measured step peak, with its ratios to E2E and to E2E with the optimizer in the backward (same GC setting and
    LM head), and lopt plan's figure for it where the planner has one (`plan_bytes`, by config name)."""
    plan_bytes = plan_bytes or {}
    with_parts = [row for row in rows if row.get("whole_step")]
    if not with_parts:
        return ""
    refs = {
        (row["gc"], row.get("head", "fused"), bool(row.get("oib"))): row["whole_step"].get("step_peak")
        for row in with_parts
        if row["backward"] == "e2e"
    }

    def ratio(value, ref):
        return None if value is None or not ref else value / ref

    cells = []
    for row in with_parts:
        parts = row["whole_step"]
        total = sum(parts[key] for key in ("weights", "gradients", "optimizer", "activations"))
        peak = parts.get("step_peak")
        key = (row["gc"], row.get("head", "fused"))
        planned = plan_bytes.get(row["name"])
        cells.append([
            row["label"],
            gc_text(row),
            _fmt_mb(parts["weights"]),
            _fmt_mb(parts["gradients"]),
            _fmt_mb(parts["optimizer"]),
            _fmt_mb(parts["activations"]),
            _fmt_mb(total),
            _fmt_mb(peak),
            _fmt(ratio(peak, refs.get((*key, False))), ".2f"),
            _fmt(ratio(peak, refs.get((*key, True))), ".2f"),
            _fmt_mb(planned),
            _fmt(ratio(peak, planned), ".2f"),
        ])  # fmt: skip
    kinds = {row.get("peak_mem_kind") for row in with_parts} - {None}
    footer = [
        "Whole step, part by part. weights: parameter bytes (aux heads and an anchor's frozen copy included); "
        "grads: the most gradient bytes alive at once during a step (all of them for the ordinary step; one LoPT "
        "block, or one E2E parameter, at a time with the optimizer in the backward); optimizer: AdamW's state "
        "after a step; act.: the saved-for-backward peak; sum: the four added, as if all peaked at once.",
        *(
            {
                "rss_fresh_process": "step peak = weights + the peak RSS of a fresh process per config during 2 "
                "steps minus its RSS before them (which includes AdamW's state, allocated by the first step, and the "
                "allocator's and libraries' pages).",
                "cuda_allocated": "step peak = this config's weights and AdamW state plus torch.cuda's peak "
                "allocated during a step over what was allocated before it.",
            }[k]
            for k in sorted(kinds)
        ),
        "x E2E / x E2E oib = step peak over E2E's / E2E with the optimizer in the backward's (same GC, same LM "
        "head). plan = lopt plan's whole-step figure at this depth, where the planner has this config (— where "
        "not).",
    ]
    if markdown:
        lines = ["| " + " | ".join(WHOLE_STEP_COLUMNS) + " |", "|" + "---|" * len(WHOLE_STEP_COLUMNS)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines + [""] + [f"- {f}" for f in footer])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(WHOLE_STEP_COLUMNS)]

    def fmt_row(c: Sequence[str]) -> str:
        return "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))

    lines = [fmt_row(WHOLE_STEP_COLUMNS), "  ".join("-" * w for w in widths), *map(fmt_row, cells)]
    return "\n".join(lines + [""] + [f"* {f}" for f in footer])


def planned_step_bytes(spec: BenchSpec, rows: list[dict], log=None) -> dict[str, int | None]:
    """lopt plan's whole-step total (single GPU) for each measured config at the measured depth; None where the
    planner does not plan that config (not in its PLAN_METHODS), and nothing in bfloat16, where its precision is not
    what bench trains (the plan keeps fp32 master weights and AdamW state, bench trains bf16 weights directly)."""
    from lopt.experiments import plan

    if spec.dtype != "float32":
        return {}
    out: dict[str, int | None] = {}
    for row in rows:
        name = row["name"]
        selective = config_of(name).gc_layers is not None
        if name not in plan.PLAN_METHODS and not selective:  # not planned (yet): no figure beside it
            out[name] = None
            continue
        try:
            planned = plan.make_plan(
                spec.model_config(), spec.seq_len, spec.batch_size, spec.dtype, methods=[name]
            )
        except (KeyError, ValueError, NotImplementedError) as err:  # a config the planner does not know (yet)
            if log:
                log(f"[bench] lopt plan has no figure for {name}: {err}")
            out[name] = None
            continue
        out[name] = planned["rows"][0]["total"]["single"]
    return out


def full_depth_table(spec: BenchSpec, rows: list[dict], log=None) -> str:
    """--num_layers cut the depth: lopt plan's figure at the measured depth (it must equal the measurement)
    and at the model's full depth, with E2E's per-layer and fixed (embedding, LM head, loss) terms."""
    from lopt.experiments import plan
    from lopt.experiments.shapes import load_shape

    cut, full = spec.model_config(), load_shape(spec.model)
    lines = [
        f"Full depth ({spec.full_num_layers} layers) from lopt plan, checked against the measurement at "
        f"{spec.num_layers} layers:",
        "| config | measured MB | plan MB (same depth) | plan MB (full depth) | x E2E | per layer MB | fixed MB |",
        "|---|---|---|---|---|---|---|",
    ]
    full_bytes = {}
    for row in rows:
        config = config_of(row["name"])
        if config.aux_objective != "recon":
            continue  # the anchor's frozen copy is not planned
        if log:
            log(f"[bench] planning {row['name']} at {spec.num_layers} and {spec.full_num_layers} layers")
        name = row["name"].replace("+oib", "")  # the step in the backward changes no activation
        same = plan.activation_bytes(cut, name, spec.batch_size, spec.seq_len, spec.dtype)
        at_full = plan.activation_bytes(full, name, spec.batch_size, spec.seq_len, spec.dtype)
        full_bytes[row["name"]] = at_full
        per_layer = fixed = "—"
        if config.backward is None:  # E2E: affine in depth, so two shallow steps give both terms
            one = plan.activation_bytes(
                plan.with_depth(full, 1), name, spec.batch_size, spec.seq_len, spec.dtype
            )
            two = plan.activation_bytes(
                plan.with_depth(full, 2), name, spec.batch_size, spec.seq_len, spec.dtype
            )
            per_layer, fixed = f"{(two - one) / MB:.1f}", f"{(2 * one - two) / MB:.1f}"
        row.update(plan_same_depth_bytes=same, plan_full_depth_bytes=at_full)
        e2e = "e2e" + ("-hf" if config.head == "hf" else "") + ("+gc" if config.gc else "")
        ratio = at_full / full_bytes[e2e] if e2e in full_bytes else None
        lines.append(
            f"| {row['label']}{' + GC' if config.gc else ''} | {row['act_peak_bytes'] / MB:.1f} | "
            f"{same / MB:.1f} | {at_full / MB:.1f} | {'—' if ratio is None else f'{ratio:.2f}'} | "
            f"{per_layer} | {fixed} |"
        )
    worst = max(
        (
            abs(r["plan_same_depth_bytes"] - r["act_peak_bytes"]) / r["act_peak_bytes"]
            for r in rows
            if "plan_same_depth_bytes" in r
        ),
        default=0.0,
    )
    verdict = "PASS" if worst <= 0.01 else "MISS"
    lines.append(
        f"\n[{verdict}] plan == measured at {spec.num_layers} layers within 1%: largest difference {worst:.2%}"
    )
    return "\n".join(lines)
