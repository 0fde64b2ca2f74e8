"""`lopt plan`: the memory of one training step for any model size, exactly, without allocating it.

Activations: one training step (forward + backward, LoPT's local backward included) of the real model code on
fake tensors (`FakeTensorMode`: every tensor has its shape, dtype and device, none has memory), metered by the
same `SavedTensorMeter` as `lopt bench`. So the plan is the meter's number, not a formula: it follows the
attention implementation, the fused LM head, checkpointing and the LoPT wrapper as they really run on CPU.

Depth, exactly and fast: a decoder's layers are identical, so with k blocks of sizes q or q+1 (L = q*k + r) every
block's saved bytes are a + q*b_layer (a per block kind), and the peak, a maximum of such terms with the same
slope, is affine in q. Two fake steps at q = 1 and q = 2 (k + r and 2k + r layers) give it at any depth; the
parameter counts are affine in the depth too. Models whose layers differ (`layer_types` not all the same) run
at full depth.

States (per GPU), from the parameter counts of the same fake model (LoPT unties tied embeddings and adds aux
heads, both counted):
* bfloat16: bf16 weights and gradients, fp32 master weights + AdamW m and v: 2 + 2 + 12 bytes per parameter;
* float32: fp32 weights, gradients, AdamW m and v: 4 + 4 + 8 bytes per parameter;
* DDP over N GPUs: every GPU holds all of it (DDP's own gradient buckets not counted);
* FSDP over N GPUs (full shard, one unit per decoder layer): weights, gradients and optimizer states / N, plus
  the gathered working set: the root unit (embedding, final norm, LM head), two layers' weights (current and
  prefetched) and one layer's full gradient before its reduce-scatter.
Activations are per micro-batch and per GPU (data parallel does not split a sequence).

Importable API: activation_bytes(config, method, batch_size, seq_len, dtype) -> int,
make_plan(config, seq_len, ...) -> dict, format_plan(plan) -> str.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from lopt.experiments.bench import CONFIGS, MB, prepare_for_training, training_loss
from lopt.experiments.meter import SavedTensorMeter

GB = 1024**3
PLAN_METHODS = ("e2e", "e2e+gc", "lopt-k2", "lopt-k2+gc", "lopt-k4", "lopt-k4+gc")
# bytes per parameter: weights (all), gradients and optimizer states (trainable only)
PRECISIONS = {
    "bfloat16": {"weights": 2, "grads": 2, "optimizer": 12},  # + fp32 master copy, AdamW m and v
    "float32": {"weights": 4, "grads": 4, "optimizer": 8},  # AdamW m and v
}


@dataclass
class StepCount:
    """What one fake training step measured: the activation peak and the parameter counts behind the states."""

    act_bytes: int
    params: int  # every parameter of the trained model (LoPT: untied head and aux heads included)
    trainable: int
    layer_params: int  # one decoder layer
    root_params: int  # everything outside the decoder layers (embedding, final norm, LM head, aux heads)


@contextlib.contextmanager
def _fake_tensors():
    """Fake tensors for everything created inside (real ones passed in are converted on the fly)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import masking_utils

    # transformers looks at position_ids' values to detect packed sequences, which a fake tensor has not; ours
    # are one arange per row (never packed), for which it returns None, so the plan passes None as well.
    no_packing = mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, no_packing:
        yield mode


def _uniform_layers(config) -> bool:
    types = getattr(config, "layer_types", None)
    return types is None or len(set(types)) <= 1


def with_depth(config, num_layers: int):
    config = config.__class__.from_dict(config.to_dict())
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    config.use_cache = False
    return config


def fake_step(config, method: str, batch_size: int, seq_len: int, dtype: str = "float32") -> StepCount:
    """One training step of `method` at the config's own depth on fake tensors, metered (no real memory)."""
    from transformers import AutoModelForCausalLM

    from lopt.engine.architectures import find_decoder_parts

    bench_config = CONFIGS[method]
    with _fake_tensors():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Outside the fake mode: the aux heads are real (small) modules, because torch refuses to swap fake
    # parameters that an init function has registered (Module.to() of a fake xavier-initialised Linear fails).
    # Operations on the fake model's tensors stay fake wherever they run.
    model = prepare_for_training(model, bench_config)
    with _fake_tensors() as mode:
        if bench_config.backward is not None:  # now make the aux heads fake too: their gradients stay shapes
            for module in model.aux_heads.modules():
                for name, param in list(module._parameters.items()):
                    fake = mode.from_tensor(param.detach())
                    module._parameters[name] = nn.Parameter(fake, requires_grad=param.requires_grad)
        ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        with SavedTensorMeter() as meter:
            training_loss(model, ids, bench_config.head).backward()
        parts = find_decoder_parts(model.model if bench_config.backward else model)
        in_layers = {id(p) for layer in parts.layers for p in layer.parameters()}
        params = {id(p): p for p in model.parameters()}  # tied weights once
        return StepCount(
            act_bytes=meter.peak,
            params=sum(p.numel() for p in params.values()),
            trainable=sum(p.numel() for p in params.values() if p.requires_grad),
            layer_params=sum(p.numel() for p in parts.layers[0].parameters()),
            root_params=sum(p.numel() for i, p in params.items() if i not in in_layers),
        )


def count_step(config, method: str, batch_size: int, seq_len: int, dtype: str = "float32") -> StepCount:
    """`fake_step` at the config's full depth, from two shallow fake steps when the layers are identical."""
    k = CONFIGS[method].k
    depth = config.num_hidden_layers
    q, r = divmod(depth, k)
    if not _uniform_layers(config) or q <= 2:
        return fake_step(config, method, batch_size, seq_len, dtype)
    one = fake_step(with_depth(config, k + r), method, batch_size, seq_len, dtype)
    two = fake_step(with_depth(config, 2 * k + r), method, batch_size, seq_len, dtype)

    def at_depth(field: str) -> int:
        a, b = getattr(one, field), getattr(two, field)
        return a + (q - 1) * (b - a)

    return StepCount(
        act_bytes=at_depth("act_bytes"),
        params=at_depth("params"),
        trainable=at_depth("trainable"),
        layer_params=one.layer_params,
        root_params=one.root_params,
    )


def activation_bytes(config, method: str, batch_size: int, seq_len: int, dtype: str = "float32") -> int:
    """Peak bytes saved for backward in one training step of `method` (a bench config name), as the meter
    would measure it on CPU."""
    return count_step(config, method, batch_size, seq_len, dtype).act_bytes


def state_bytes(count: StepCount, precision: str, parallel: str = "single", num_gpus: int = 1) -> dict:
    """Weights, gradients, optimizer states (and FSDP's gathered working set) per GPU, in bytes."""
    per = PRECISIONS[precision]
    shard = num_gpus if parallel == "fsdp" else 1
    out = {
        "weights": count.params * per["weights"] // shard,
        "grads": count.trainable * per["grads"] // shard,
        "optimizer": count.trainable * per["optimizer"] // shard,
        "gathered": 0,
    }
    if parallel == "fsdp" and num_gpus > 1:
        w = per["weights"]
        out["gathered"] = (
            count.root_params * w + 2 * count.layer_params * w + count.layer_params * per["grads"]
        )
    return out


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '141 GB', '24000MB' -> bytes (GB and GiB both mean 2**30: GPU sizes are quoted in GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu_memory {text!r} is not a size: write e.g. 80GB or 24000MB.")
    value, unit = float(match.group(1)), match.group(2).upper()
    return int(value * 1024 ** "BKMGT".index(unit or "B"))


MICRO_BATCH_LIMIT = (
    64  # the search stops here (reported as ">= 64"): the fake head's chunk loop grows with it
)


def _largest_micro_batch(act: Callable[[int], int], budget: int, limit: int = MICRO_BATCH_LIMIT) -> int:
    """The largest micro-batch (up to `limit`) whose activations fit `budget` (0 if none): affine guess from 1 and
    2, then checked with a fake step at the guess."""
    one = act(1)
    if one > budget:
        return 0
    slope = max(1, act(2) - one)
    guess = min(limit, 1 + (budget - one) // slope)
    while guess > 1 and act(guess) > budget:  # the affine guess can only overshoot by the fixed terms
        guess -= 1
    return guess


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
    """Per method: activation bytes (this dtype) and per-GPU states for both precisions, single GPU, DDP and FSDP
    over `num_gpus`; with `gpu_memory`, what fits and the largest micro-batch at this sequence length."""
    log = log or (lambda msg: None)
    unknown = [m for m in methods if m not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(PLAN_METHODS)}.")
    if seq_len < 2 or batch_size < 1 or num_gpus < 1:
        raise ValueError("--seq_len must be >= 2, --batch_size and --num_gpus >= 1.")
    if dtype not in PRECISIONS:
        raise ValueError(f"--dtype must be one of {list(PRECISIONS)}, got {dtype!r}.")
    parallels = ["single"] if num_gpus == 1 else ["ddp", "fsdp"]
    rows = []
    for method in methods:
        counts: dict[int, StepCount] = {}

        def act(micro_batch: int, method=method, counts=counts) -> int:
            if micro_batch not in counts:
                counts[micro_batch] = count_step(config, method, micro_batch, seq_len, dtype)
                gc.collect()
            return counts[micro_batch].act_bytes

        act(batch_size)
        count = counts[batch_size]
        log(f"[plan] {method}: activations {count.act_bytes / MB:.1f} MB")
        row = {
            "method": method,
            "label": _label(method),
            "act_bytes": count.act_bytes,
            "params": count.params,
        }
        row["trainable"] = count.trainable
        for precision in PRECISIONS:
            for parallel in parallels:
                states = state_bytes(count, precision, parallel, num_gpus)
                row[f"{precision}/{parallel}"] = states
        states = {p: row[f"{dtype}/{p}"] for p in parallels}
        row["total"] = {p: sum(s.values()) + count.act_bytes for p, s in states.items()}
        if gpu_memory is not None:
            row["fits"] = {p: total <= gpu_memory for p, total in row["total"].items()}
            row["max_micro_batch"] = {}
            for p, s in states.items():
                budget = gpu_memory - sum(s.values())
                row["max_micro_batch"][p] = 0 if budget <= 0 else _largest_micro_batch(act, budget)
        rows.append(row)
    e2e = {CONFIGS[r["method"]].gc: r["act_bytes"] for r in rows if CONFIGS[r["method"]].backward is None}
    for row in rows:
        ref = e2e.get(CONFIGS[row["method"]].gc)
        row["act_ratio"] = row["act_bytes"] / ref if ref else None
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


def _label(method: str) -> str:
    c = CONFIGS[method]
    return c.label + (" + GC" if c.gc else "")


def _micro_batch_text(value: int) -> str:
    return f">= {value}" if value >= MICRO_BATCH_LIMIT else str(value)


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.2f}"


def format_plan(plan: dict, markdown: bool = False) -> str:
    """One row per method: activations, states per GPU for the plan's dtype, total, and fit / largest micro-batch."""
    dtype, parallels, n = plan["dtype"], plan["parallels"], plan["num_gpus"]
    names = {"single": "1 GPU", "ddp": f"DDP x{n}", "fsdp": f"FSDP x{n}"}
    header = ["method", "act. GB", "x E2E"]
    for p in parallels:
        header += [f"{names[p]}: weights+grads+AdamW GB", f"{names[p]}: total GB"]
    if plan["gpu_memory"] is not None:
        header += [f"{names[p]}: max micro-batch" for p in parallels]
    cells = []
    for row in plan["rows"]:
        line = [
            row["label"],
            _gb(row["act_bytes"]),
            "—" if row["act_ratio"] is None else f"{row['act_ratio']:.2f}",
        ]
        for p in parallels:
            states = row[f"{dtype}/{p}"]
            fits = "" if plan["gpu_memory"] is None else (" fits" if row["fits"][p] else " no")
            line += [_gb(sum(states.values())), _gb(row["total"][p]) + fits]
        if plan["gpu_memory"] is not None:
            line += [_micro_batch_text(row["max_micro_batch"][p]) for p in parallels]
        cells.append(line)
    precision = (
        "bf16 weights and gradients, fp32 master weights + AdamW m, v (16 B/param)"
        if dtype == "bfloat16"
        else "fp32 weights, gradients, AdamW m, v (16 B/param)"
    )
    notes = [
        f"act. = peak bytes saved for backward of one step at micro-batch {plan['batch_size']} x seq "
        f"{plan['seq_len']} in {dtype} (TRL fused LM head; fake-tensor step through lopt bench's meter).",
        f"states: {precision}; LoPT's untied head and aux heads included.",
        "FSDP: states / N plus the gathered working set (root unit, two layers' weights, one layer's gradient).",
        "total = states + activations; allocator fragmentation, CUDA context and temporary buffers not included.",
    ]
    if plan["gpu_memory"] is not None:
        notes.append(
            f"fits / no: total <= --gpu_memory {plan['gpu_memory'] / GB:.0f} GB; max micro-batch: the largest "
            f"micro-batch at seq {plan['seq_len']} whose total fits (0: none; the search stops at "
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
