"""`lopt plan`'s model of one training step: the fake-tensor step, its extrapolation in depth, the states and the
step's peak at its worst moment (lopt.experiments.plan assembles the plan from these).

Activations: one training step (forward + backward, LoPT's local backward included) of the real model code on
fake tensors (`FakeTensorMode`: every tensor has its shape, dtype and device, none has memory), metered by the
same `SavedTensorMeter` as `lopt bench`. So the plan is the meter's number, not a formula: it follows the
attention implementation, the fused LM head, checkpointing and the LoPT wrapper as they really run on CPU. The
meter's peak is also taken per phase: LoPT's local backward of each early block ends a phase (its activations are
freed there), the task backward ends the last one; e2e has one phase.

Depth, exactly and fast: a decoder's layers are identical, so with k blocks of sizes q or q+1 (L = q*k + r) every
block's saved bytes are a + q*b_layer (a per block kind), and each phase's peak and the whole step's are affine in
q. Two fake steps at q = 1 and q = 2 (k + r and 2k + r layers) give them at any depth; the parameter counts are
affine in the depth too. Models whose layers differ (`layer_types` not all the same) run at full depth.

States (per GPU), from the parameter counts of the same fake model (a tied embedding and LM head counted once, as
LoPT keeps it; LoPT's aux heads included):
* bfloat16: bf16 weights and gradients, fp32 master weights + AdamW m and v: 2 + 2 + 12 bytes per parameter;
* float32: fp32 weights, gradients, AdamW m and v: 4 + 4 + 8 bytes per parameter;
* DDP over N GPUs: every GPU holds all of it (DDP's own gradient buckets not counted);
* FSDP over N GPUs (full shard, one unit per decoder layer): weights, gradients and optimizer states / N, plus
  the gathered working set: the root unit (embedding, final norm, LM head), two layers' weights (current and
  prefetched) and one layer's full gradient before its reduce-scatter.
Activations are per micro-batch and per GPU (data parallel does not split a sequence).

The step's peak (`step_peak`): the floor, what must be alive at the step's worst moment:

    peak = weights + optimizer states + max over the step's moments of (activations alive + gradients alive)

Weights and optimizer states live through the whole step. A backward frees each layer's activations as it writes
that layer's gradients, so (identical layers) the sum changes linearly from one layer to the next, and its maximum
is at one of these moments of each backward (`step_moments`):
* its start (for the task loss: the LM head's backward): the activations of what it backpropagates (that phase's
  meter peak: the whole model for e2e, one block for a LoPT local backward, the last block and the LM head for the
  task backward), the gradients kept from earlier backwards, and the first gradient it writes, the LM head's;
* under activation checkpointing, its last layer's backward, the first recomputed: the same activations plus one
  layer's recomputed ones (the meter does not see them: one layer's saved bytes without checkpointing,
  `layer_act_bytes`; the LM head's saved tensors, freed by then, are still counted: a small excess);
* its first layer's backward: that layer's activations, and every gradient written so far but the layer's own
  and the embedding's (written after it);
* its end: the gradients alive then (its activations are gone).
Which gradients are alive:
* the ordinary step: every gradient written in the step, until optimizer.step() after the last backward;
* "+oib" (the optimizer step in the backward, lopt.engine.in_backward): every parameter is stepped, and its
  gradient freed, as soon as that gradient is final: the LM head's at the start of a backward, then one layer's at
  a time (counted as a whole layer in flight), the embedding's last; LoPT's early blocks inside their local
  backwards, its late group in the task backward; a tied matrix once both its parts are in (below);
* a tied matrix gets two gradients, through the embedding and through the head. In e2e autograd sums them before
  writing `.grad`: the head's part waits, a vocab x hidden tensor, from the start of the backward to the end. In
  LoPT the embedding's part is written by block 0's local backward and stays until the task backward has added
  the head's part and ended, "+oib" or not.
Not included: the optimizer's temporary buffers (a foreach AdamW allocates some of a group's size; a fused or a
per-parameter step almost none), autograd's transient gradients of activations, the allocator's fragmentation and
the CUDA context. FSDP: the gradients alive are counted sharded (/ N).

What this shows. Where activations dominate the worst moment (long sequences, no checkpointing), LoPT's step
peak follows its activations: Qwen2.5-0.5B, micro-batch 8 x seq 2048, bf16: 0.64x e2e at k=2, 0.46x at k=4 (0.63x
and 0.44x with +oib). Where gradients dominate it (checkpointing, short sequences, large models), an ordinary LoPT
step saves nothing: at its worst moment it holds what e2e holds (every gradient at the end, or the early blocks'
and a tied matrix's, kept through the task backward, against e2e's layer inputs) plus its aux heads' weights,
gradients and AdamW states: with checkpointing, 1.00x e2e at that shape (+11 MB at k=2) and up to about 1% above
on the larger presets. +oib frees each gradient as soon as it is final, in both methods, so LoPT+oib is at or below
e2e+oib wherever the saved activations differ; what can keep it above is a tied matrix's gradient, which LoPT
holds from block 0's backward to the end of the step and e2e only through its one backward.

Importable API: activation_bytes(config, method, batch_size, seq_len, dtype) -> int,
step_peak(count, method, precision, layer_act) -> dict, make_plan(config, seq_len, ...) -> dict,
format_plan(plan) -> str.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch import nn

from lopt.experiments.bench import CONFIGS, config_of, is_config, prepare_for_training, training_loss
from lopt.experiments.meter import SavedTensorMeter

GB = 1024**3
OIB = "oib"  # the "+oib" option of a method name: the optimizer step in the backward
PLAN_METHODS = (
    "e2e",
    "e2e+oib",
    "lopt-k2",
    "lopt-k2+oib",
    "lopt-k4",
    "lopt-k4+oib",
    "e2e+gc",
    "e2e+oib+gc",
    "lopt-k2+gc",
    "lopt-k2+oib+gc",
    "lopt-k4+gc",
    "lopt-k4+oib+gc",
    "freeze",
    "freeze+gc",
    "lora",
    "lora+gc",
)
# "+gcN" (checkpoint the earliest N layers) is planned for the methods whose layers are all alike: all trained (e2e)
# or all adapted (lora). Freeze's earliest layers are frozen (checkpointing them saves nothing) and LoPT's blocks
# each have their own backward: measure those with lopt bench.
SELECTIVE_GC_METHODS = ("e2e", "lora")
# bytes per parameter: weights (all), gradients and optimizer states (trainable only)
PRECISIONS = {
    "bfloat16": {"weights": 2, "grads": 2, "optimizer": 12},  # + fp32 master copy, AdamW m and v
    "float32": {"weights": 4, "grads": 4, "optimizer": 8},  # AdamW m and v
}


@dataclass
class StepCount:
    """What one fake training step measured: the activation peaks and the parameter counts behind the states."""

    act_bytes: int
    params: int  # every parameter of the trained model (a tied matrix once; LoPT's aux heads included)
    trainable: int
    layer_params: int  # one decoder layer
    root_params: int  # everything outside the decoder layers (embedding, final norm, LM head, aux heads)
    # Per phase (one per LoPT block with the local backward, else one): the meter's activation peak, and the
    # trainable parameters the optimizer step covers at its end (LoPT: early block i = its layers + aux head i, block
    # 0 also what runs before layer 0 unless the task loss trains it; the last = the late group; else: all).
    phase_act: tuple[int, ...] = ()
    phase_params: tuple[int, ...] = ()
    head: int = 0  # trainable elements of the LM head's weight (the shared matrix when tied)
    # trainable elements of the embedding's weight (its gradient is its own tensor, also when tied), and of what
    # runs before layer 0 other than the LM head (an untied embedding, position embeddings)
    embedding: int = 0
    pre_layers: int = 0
    tied: bool = False  # embedding and LM head are one parameter
    layer_trainable: int | None = None  # trainable elements of one trained layer (None: layer_params)
    num_layers: int = 0
    gc_layers: int | None = None  # "+gcN": the earliest N layers checkpointed (None: all, or no GC)

    @property
    def layer_grad(self) -> int:
        """The gradient elements one trained layer writes."""
        return self.layer_params if self.layer_trainable is None else self.layer_trainable


@dataclass
class Method:
    """A plan method name: the bench configuration whose fake step gives the activations, and "+oib"."""

    name: str
    bench: str  # a lopt.experiments.bench CONFIGS name without "+oib"
    oib: bool = False
    label: str = field(default="")


def parse_method(name: str) -> Method:
    """ "lopt-k2+oib+gc" (or "lopt-k2+gc+oib") -> Method(bench="lopt-k2+gc", oib=True). The optimizer step in the
    backward changes which gradients are alive, not what is saved for backward: the activations are the bench
    configuration's without it."""
    base, *options = name.split("+")
    oib = OIB in options
    bench = "+".join([base, *(o for o in options if o != OIB)])
    if not is_config(bench) or options.count(OIB) > 1:
        choices = sorted({*PLAN_METHODS, *CONFIGS})
        raise ValueError(
            f"unknown method {name!r}; choose from {choices} (any LoPT-local, e2e or freeze one with +oib; e2e and "
            "lora with +gcN: the earliest N layers checkpointed)."
        )
    config = config_of(bench)
    if config.gc_layers is not None and base not in SELECTIVE_GC_METHODS:
        raise ValueError(
            f"{name!r}: +gcN is planned for {' and '.join(SELECTIVE_GC_METHODS)} only (layers all alike); measure "
            f"{base} with it by `lopt bench --configs {name}`."
        )
    if oib and config.backward == "joint":
        raise ValueError(
            f"{name!r}: the optimizer step in the backward needs LoPT's local backward (joint mode completes every "
            "gradient at the end)."
        )
    gc = "" if not config.gc else (" + GC" if config.gc_layers is None else "")  # "+gcN" labels say it
    label = config.label + (", opt. in bwd" if oib else "") + gc
    return Method(name, bench, oib, label)


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


def _phase_parameters(model: nn.Module, local: bool) -> list[list[nn.Parameter]]:
    """The trainable parameters stepped at the end of each phase (see StepCount.phase_params), each once."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}  # a tied matrix once
    if not local:
        return [list(params.values())]
    late = {id(p) for module in model.late_modules() for p in module.parameters()}
    phases = []
    for index in range(model.num_boundaries):
        modules = [*model.early_block_modules(index)]
        if index < len(model.aux_heads):
            modules.append(model.aux_heads[index])
        phases.append({id(p) for module in modules for p in module.parameters()} - late)
    in_blocks = set().union(*phases)
    phases[0] |= {i for i in params if i not in late and i not in in_blocks}  # the embedding, ...
    phases.append(late)
    return [[params[i] for i in phase if i in params] for phase in phases]


def fake_step(config, method: str, batch_size: int, seq_len: int, dtype: str = "float32") -> StepCount:
    """One training step of `method` at the config's own depth on fake tensors, metered (no real memory)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers import AutoModelForCausalLM

    from lopt.engine.architectures import find_decoder_parts

    bench_config = config_of(parse_method(method).bench)
    local = bench_config.backward == "local"
    with _fake_tensors():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Outside the fake mode: the aux heads (and LoRA's adapters) are real (small) modules, because torch refuses to swap fake
    # parameters that an init function has registered (Module.to() of a fake xavier-initialised Linear fails).
    # Operations on the fake model's tensors stay fake wherever they run.
    model = prepare_for_training(model, bench_config)
    parts = find_decoder_parts(model.model if bench_config.backward else model)
    with _fake_tensors() as mode:
        # now make the aux heads and adapters fake too: their gradients stay shapes
        modules = [*model.modules()] + ([*model.aux_heads.modules()] if bench_config.backward else [])
        for module in modules:
            for name, param in list(module._parameters.items()):
                if param is not None and not isinstance(param, FakeTensor):
                    fake = mode.from_tensor(param.detach())
                    module._parameters[name] = nn.Parameter(fake, requires_grad=param.requires_grad)
        ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        phase_act: list[int] = []
        with SavedTensorMeter() as meter:

            def end_phase(module, args):
                # Registered after LoPT's block hook, so the block before has had its local backward: its
                # activations are freed and its phase is over. Not in a checkpointed layer's replay, nor in the
                # anchor's no-grad reference forward.
                training = module.training and torch.is_grad_enabled()
                if training and torch._C._current_graph_task_id() == -1:
                    phase_act.append(meter.peak)
                    meter.peak = meter.live

            handles = (
                [
                    parts.layers[start].register_forward_pre_hook(end_phase)
                    for start, _ in model.block_ranges[1:]
                ]
                if local
                else []
            )
            try:
                training_loss(model, ids, bench_config.head).backward()
            finally:
                for handle in handles:
                    handle.remove()
            phase_act.append(meter.peak)
        in_layers = {id(p) for layer in parts.layers for p in layer.parameters()}
        params = {id(p): p for p in model.parameters()}  # tied weights once
        head, embedding = parts.lm_head.weight, parts.embedding.weight
        after_layers = {id(p) for m in (parts.final_norm, parts.lm_head) for p in m.parameters()}
        if bench_config.backward is not None:
            after_layers |= {id(p) for p in model.aux_heads.parameters()}
        pre_layers = [p for i, p in params.items() if p.requires_grad and i not in in_layers | after_layers]
        return StepCount(
            act_bytes=max(phase_act),
            params=sum(p.numel() for p in params.values()),
            trainable=sum(p.numel() for p in params.values() if p.requires_grad),
            layer_params=sum(p.numel() for p in parts.layers[0].parameters()),
            layer_trainable=sum(p.numel() for p in parts.layers[-1].parameters() if p.requires_grad),
            num_layers=parts.num_layers,
            gc_layers=bench_config.gc_layers if bench_config.gc else None,
            root_params=sum(p.numel() for i, p in params.items() if i not in in_layers),
            phase_act=tuple(phase_act),
            phase_params=tuple(sum(p.numel() for p in ps) for ps in _phase_parameters(model, local)),
            head=head.numel() if head.requires_grad else 0,
            embedding=embedding.numel() if embedding.requires_grad else 0,
            pre_layers=sum(p.numel() for p in pre_layers),
            tied=head is embedding,
        )


_COUNTS: dict[tuple, StepCount] = {}  # the same model, method and shape give the same count: plan it once


def count_step(config, method: str, batch_size: int, seq_len: int, dtype: str = "float32") -> StepCount:
    """`_count_step`, once per (config, method, shape, dtype) in this process."""
    key = (config.to_json_string(), method, batch_size, seq_len, dtype)
    if key not in _COUNTS:
        _COUNTS[key] = _count_step(config, method, batch_size, seq_len, dtype)
    return _COUNTS[key]


def _count_step(config, method: str, batch_size: int, seq_len: int, dtype: str = "float32") -> StepCount:
    """`fake_step` at the config's full depth, from two shallow fake steps when the layers are identical.

    "+gcN" (e2e, lora): every layer either keeps all its activations or only its input, so the step's activations
    are those with checkpointing everywhere plus (L - N) layers' difference, from the two steps with and without."""
    parsed = parse_method(method)
    bench = config_of(parsed.bench)
    depth = config.num_hidden_layers
    if bench.gc_layers is not None:
        n = bench.gc_layers
        if n > depth:
            raise ValueError(
                f"{method!r}: the model has {depth} layers; checkpoint at most {depth} (+gc{depth})."
            )
        base = parsed.bench.rsplit("+", 1)[0]
        full = count_step(config, base, batch_size, seq_len, dtype)
        every = count_step(config, f"{base}+gc", batch_size, seq_len, dtype)
        # Layer 0 is always among the checkpointed (the earliest); under lora its input needs no gradient, so it
        # saves less than the others: the per-layer difference comes from the layers after it.
        gap = full.act_bytes - every.act_bytes
        if depth > 1:
            one = with_depth(config, 1)
            first = count_step(one, base, batch_size, seq_len, dtype).act_bytes
            first -= count_step(one, f"{base}+gc", batch_size, seq_len, dtype).act_bytes
            extra = (depth - n) * (gap - first) // (depth - 1)
        else:
            extra = 0
        return dataclasses.replace(
            every,
            act_bytes=every.act_bytes + extra,
            phase_act=tuple(a + extra for a in every.phase_act),
            gc_layers=n,
        )
    # freeze trains the last of two halves (LoPT k=2's blocks): affine in the half's depth, as a 2-block step
    k = 2 if bench.method == "freeze" else bench.k
    q, r = divmod(depth, k)
    if not _uniform_layers(config) or q <= 2:
        return fake_step(config, method, batch_size, seq_len, dtype)
    one = fake_step(with_depth(config, k + r), method, batch_size, seq_len, dtype)
    two = fake_step(with_depth(config, 2 * k + r), method, batch_size, seq_len, dtype)

    def at_depth(a: int, b: int) -> int:
        return a + (q - 1) * (b - a)

    def field_at_depth(name: str):
        a, b = getattr(one, name), getattr(two, name)
        if isinstance(a, tuple):
            return tuple(at_depth(x, y) for x, y in zip(a, b))
        return at_depth(a, b)

    return StepCount(
        act_bytes=field_at_depth("act_bytes"),
        params=field_at_depth("params"),
        trainable=field_at_depth("trainable"),
        layer_params=one.layer_params,
        layer_trainable=one.layer_trainable,
        num_layers=depth,
        gc_layers=one.gc_layers,
        root_params=one.root_params,
        phase_act=field_at_depth("phase_act"),
        phase_params=field_at_depth("phase_params"),
        head=one.head,
        embedding=one.embedding,
        pre_layers=one.pre_layers,
        tied=one.tied,
    )


def activation_bytes(config, method: str, batch_size: int, seq_len: int, dtype: str = "float32") -> int:
    """Peak bytes saved for backward in one training step of `method` (a bench config name, "+oib" allowed), as
    the meter would measure it on CPU."""
    return count_step(config, method, batch_size, seq_len, dtype).act_bytes


def layer_method(method: str) -> str:
    """The method whose layers `layer_act_bytes` measures for `method`: lora's layers save what its adapters need
    (and not the frozen weights' inputs); every other method's trained layer saves what e2e's does."""
    return "lora" if config_of(parse_method(method).bench).method == "lora" else "e2e"


def layer_act_bytes(
    config, batch_size: int, seq_len: int, dtype: str = "float32", method: str = "e2e"
) -> int:
    """One layer's activations, saved for its backward: alive while that layer's backward runs (recomputed there
    under activation checkpointing). The first layer's, without checkpointing: `method` (e2e or lora) at depth 2
    minus depth 1 (depth 1 alone for a one-layer model)."""
    one = fake_step(with_depth(config, 1), method, batch_size, seq_len, dtype).act_bytes
    if config.num_hidden_layers < 2:
        return one
    return fake_step(with_depth(config, 2), method, batch_size, seq_len, dtype).act_bytes - one


def state_bytes(count: StepCount, precision: str, parallel: str = "single", num_gpus: int = 1) -> dict:
    """Weights, gradients (all of them), optimizer states (and FSDP's gathered working set) per GPU, in bytes."""
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
        out["gathered"] = count.root_params * w + 2 * count.layer_params * w + count.layer_grad * per["grads"]
    return out


def step_moments(count: StepCount, oib: bool, layer_act: int, gc: bool) -> list[tuple[str, int, int]]:
    """(moment, activation bytes, gradient elements) at each moment of the step that can be its worst (see the
    module docstring): in every backward, its start (the LM head's backward, for the task loss), under activation
    checkpointing its last layer's backward (the first recomputed), its first layer's backward, and its end.
    `layer_act`: one layer's activations without checkpointing (`layer_act_bytes`). "+gcN" (the earliest N of L
    layers): the first recomputed layer is layer N-1, after the L-N layers that kept their activations (layer_act
    each) have written their gradients and freed them."""
    layer = count.layer_grad  # the gradient elements one trained layer writes
    skipped = 0 if count.gc_layers is None else count.num_layers - count.gc_layers
    tied = (
        count.embedding if count.tied else 0
    )  # a tied matrix's first gradient, alive to the end of the step

    def backward(name, act, held, first, first_kept, before_first_layer, end):
        """One backward: `held` gradients alive before it, `first` the gradient its first node writes (the LM
        head's), `first_kept` what of it is still alive when the layers' backward starts, `before_first_layer`
        the gradients alive when its first layer's backward starts, `end` when it ends."""
        moments = [(f"{name}backward start", act, held + first)]
        if gc and skipped:  # the last checkpointed layer's backward, the first recomputed
            alive = act - skipped * layer_act + layer_act
            moments.append(
                (f"{name}last checkpointed layer's backward", alive, held + first_kept + skipped * layer)
            )
        elif (
            gc
        ):  # the last layer's backward recomputes its activations (the LM head's saved ones still counted)
            moments.append((f"{name}last layer's backward", act + layer_act, held + first_kept))
        moments.append((f"{name}first layer's backward", layer_act, before_first_layer))
        return [*moments, (f"{name}backward end", 0, end)]

    if len(count.phase_act) == 1:  # one backward: e2e (or LoPT's joint mode)
        act, written = count.phase_act[0], count.phase_params[0]
        if oib:  # each gradient stepped when complete: one layer's in flight, the embedding's last
            head_part = (
                count.head if count.tied else 0
            )  # a tied matrix's head part waits for its embedding part
            return backward("", act, 0, count.head, head_part, head_part + layer, head_part + count.embedding)
        return backward(
            "", act, 0, count.head, count.head, written - layer - count.pre_layers, written + tied
        )
    moments, held = [], 0
    for index in range(len(count.phase_act) - 1):  # the early blocks' local backwards
        written = held + count.phase_params[index]
        pre = count.pre_layers if index == 0 else 0  # written after the block's first layer
        end = written + (tied if index == 0 else 0)
        if oib:  # one layer's gradients in flight, the embedding's last in block 0 (a tied one stays)
            last = count.embedding if index == 0 else layer
            moments += backward(
                f"block {index} ", count.phase_act[index], held, 0, 0, held + layer, held + last
            )
            held = tied
            continue
        moments += backward(f"block {index} ", count.phase_act[index], held, 0, 0, written - layer - pre, end)
        held = end
    # The task backward: a tied matrix's gradient is in `held` already; the head's part is added to it in place.
    late = count.phase_params[-1] - (count.head if count.tied else 0)
    head_kept = 0 if count.tied else count.head
    # With +oib the head's gradient is stepped at once (a tied one: added to the matrix's), then one layer's at a time.
    if oib:
        return moments + backward(
            "task ", count.phase_act[-1], held, count.head, 0, held + layer, held + layer
        )
    return moments + backward(
        "task ", count.phase_act[-1], held, count.head, head_kept, held + late - layer, held + late
    )


def step_peak(
    count: StepCount,
    method: str,
    precision: str,
    layer_act: int = 0,
    parallel: str = "single",
    num_gpus: int = 1,
) -> dict:
    """The step's floor per GPU, in bytes: weights, optimizer states, gathered (FSDP), and at the worst moment the
    gradients and activations alive, their sum `peak`, and which moment it is."""
    parsed = parse_method(method)
    states = state_bytes(count, precision, parallel, num_gpus)
    shard = num_gpus if parallel == "fsdp" else 1
    per_grad = PRECISIONS[precision]["grads"]
    moments = step_moments(count, parsed.oib, layer_act, config_of(parsed.bench).gc)
    moment, act, grads = max(moments, key=lambda m: m[1] + m[2] * per_grad // shard)
    out = {
        "weights": states["weights"],
        "optimizer": states["optimizer"],
        "gathered": states["gathered"],
        "grads": grads * per_grad // shard,
        "act": act,
        "moment": moment,
    }
    out["peak"] = out["weights"] + out["optimizer"] + out["gathered"] + out["grads"] + out["act"]
    return out
