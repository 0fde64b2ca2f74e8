"""`lopt bench`: activation memory, peak memory and step time of E2E vs LoPT, side by side in one run.

Three measurements per configuration (E2E, LoPT-joint k=2, LoPT local k=2, LoPT local k=4; each with and
without gradient checkpointing; E2E and LoPT local also with the optimizer step in the backward, "+oib",
lopt.engine.in_backward), all on the same random tokens and the same initial weights:

* peak bytes saved for backward (`measure_saved_tensor_peak`): every tensor autograd saves goes through a
  `saved_tensors_hooks` pack hook that counts its storage while it is alive. LoPT's local backward runs
  inside the forward, so the peak is taken over forward + backward together.
* peak process memory of a step above its start: on CPU the peak RSS of a fresh process per configuration (the
  allocator state of other configurations cannot leak into it) during its second step, minus its RSS just before
  it (the first allocates AdamW's state and does the one-time set-up); on CUDA the allocator's peak
  (`max_memory_allocated`) minus what was allocated before the step.
* median step time (forward + backward + AdamW step + zero_grad) over interleaved repeats: round r runs
  every configuration once, so machine noise hits all of them alike and the time ratios come from one run.

And the whole step, part by part (`whole_step` in each row): weights (parameter bytes, aux heads included),
gradients (the peak bytes of gradients alive at once during a step, from post-accumulate-grad hooks: all of them
for the ordinary step, one block or one parameter at a time with +oib), optimizer states (AdamW's tensors after a
step), activations (the saved-for-backward peak above), and the step's peak: the weights and the AdamW state,
resident before the step, plus the peak process memory above.

Importable API: BenchSpec, run_benchmark(spec, configs) -> list[dict], check_targets(rows) -> list[dict].
The meter is lopt.experiments.meter (shared with `lopt plan` and `lopt compare`), the tables
lopt.experiments.bench_report, the race at a fixed activation budget lopt.experiments.bench_race.

`python -m lopt.experiments.bench --one NAME --spec JSON` runs one configuration in this process and prints its peak
RSS as one JSON line; `run_benchmark` starts it once per configuration.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from lopt.experiments.meter import SavedTensorMeter

MB = 1024 * 1024


class BenchConfig(NamedTuple):
    label: str
    backward: str | None  # LoPT backward mode, None for plain E2E
    k: int  # number of blocks
    gc: bool  # activation checkpointing
    aux_objective: str = "recon"
    anchor_dtype: str | None = None  # dtype of the anchor's frozen pretrained copy
    head: str = "fused"  # "fused": TRL's chunked LM head, as `lopt sft` trains; "hf": the model's own loss
    oib: bool = False  # optimizer step in the backward (lopt.engine.in_backward, --optimizer_in_backward)
    method: str = "e2e"  # the training method when backward is None: e2e, freeze (first half frozen) or lora
    gc_layers: int | None = None  # with gc: checkpoint the earliest N decoder layers only (None: every layer)


# Every method goes through TRL's fused LM head by default (`add_fused_lm_head`, called with fused_lm_head=True),
# the loss path `lopt sft` really trains through; the "-hf" configs keep the plain Hugging Face loss, which
# materialises the [B, T, V] logits, for contrast.
CONFIGS: dict[str, BenchConfig] = {
    "e2e": BenchConfig("E2E", None, 1, False),
    "lopt-joint-k2": BenchConfig("LoPT-joint k=2", "joint", 2, False),
    "lopt-k2": BenchConfig("LoPT k=2", "local", 2, False),
    "lopt-k4": BenchConfig("LoPT k=4", "local", 4, False),
    # the anchor's cost: a frozen copy of the early weights and one no-grad forward of the early blocks
    "lopt-k2-anchor": BenchConfig("LoPT k=2 recon+anchor", "local", 2, False, "recon+anchor"),
    "lopt-k2-anchor-bf16": BenchConfig(
        "LoPT k=2 recon+anchor bf16 copy", "local", 2, False, "recon+anchor", "bfloat16"
    ),
    # the task objective's cost: a logit-lens cross-entropy per boundary, chunked so no full logits are kept
    "lopt-k2-task": BenchConfig("LoPT k=2 task", "local", 2, False, "task"),
    "lopt-k4-task": BenchConfig("LoPT k=4 task", "local", 4, False, "task"),
    # the optimizer step in the backward: each early block stepped and its gradients freed right after its local
    # backward (LoPT), each parameter as its gradient is written (E2E)
    "e2e+oib": BenchConfig("E2E, opt. in bwd", None, 1, False, oib=True),
    "lopt-k2+oib": BenchConfig("LoPT k=2, opt. in bwd", "local", 2, False, oib=True),
    "lopt-k4+oib": BenchConfig("LoPT k=4, opt. in bwd", "local", 4, False, oib=True),
    # the baselines as `lopt sft --method freeze|lora` trains them: the embedding and first half frozen (LM head
    # untied); LoRA adapters (rank 16, alpha 32, dropout 0.05) on every linear layer of a frozen model
    "freeze": BenchConfig("Freeze half", None, 1, False, method="freeze"),
    "lora": BenchConfig("LoRA r=16", None, 1, False, method="lora"),
    "freeze+oib": BenchConfig("Freeze half, opt. in bwd", None, 1, False, oib=True, method="freeze"),
    "e2e+gc": BenchConfig("E2E", None, 1, True),
    "lopt-joint-k2+gc": BenchConfig("LoPT-joint k=2", "joint", 2, True),
    "lopt-k2+gc": BenchConfig("LoPT k=2", "local", 2, True),
    "lopt-k4+gc": BenchConfig("LoPT k=4", "local", 4, True),
    "e2e+oib+gc": BenchConfig("E2E, opt. in bwd", None, 1, True, oib=True),
    "lopt-k2+oib+gc": BenchConfig("LoPT k=2, opt. in bwd", "local", 2, True, oib=True),
    "lopt-k4+oib+gc": BenchConfig("LoPT k=4, opt. in bwd", "local", 4, True, oib=True),
    "freeze+gc": BenchConfig("Freeze half", None, 1, True, method="freeze"),
    "lora+gc": BenchConfig("LoRA r=16", None, 1, True, method="lora"),
}
DEFAULT_CONFIGS = tuple(CONFIGS)
CONFIGS.update({
    f"{name}-hf{'+gc' if gc else ''}": BenchConfig(f"{label} (HF loss)", backward, k, gc, head="hf")
    for name, label, backward, k in (("e2e", "E2E", None, 1), ("lopt-k2", "LoPT k=2", "local", 2),
                                     ("lopt-k4", "LoPT k=4", "local", 4))
    for gc in (False, True)
})  # fmt: skip
HEADS = {"fused": "TRL fused LM head", "hf": "plain HF loss (full logits)"}

# LoPT's goals, stated as ratios to E2E. kind: "act" = activation peak ratio, "time" = median step time ratio; against E2E with
# the same checkpointing setting and the same LM head.
TARGETS = (
    ("lopt-k2", "act", 0.52, "LoPT k=2 activation bytes <= 0.52x E2E"),
    ("lopt-k4", "act", 0.28, "LoPT k=4 activation bytes <= 0.28x E2E"),
    ("lopt-k2", "time", 1.0, "LoPT k=2 step time <= 1.0x E2E"),
    ("lopt-k4", "time", 1.0, "LoPT k=4 step time <= 1.0x E2E"),
    ("lopt-k2+gc", "act", 0.6, "LoPT k=2+GC activation bytes <= 0.60x E2E+GC"),
    ("lopt-k4+gc", "act", 0.38, "LoPT k=4+GC activation bytes <= 0.38x E2E+GC"),
)


# --- the benchmark -----------------------------------------------------------------------------------
@dataclass
class BenchSpec:
    """Model shape, data and repeats. Defaults: the Llama-shaped setting of METHOD.md.

    `model` (a preset of lopt.experiments.shapes or a config.json path) replaces the Llama shape fields by that architecture;
    `num_layers` then cuts its depth (None: the full depth). `steps=0` measures activations only: one
    configuration at a time, so a real-size model fits in memory (no timing, no optimizer, no peak memory).
    """

    num_layers: int | None = None  # None: 16, or the model's full depth
    hidden_size: int = 256
    intermediate_size: int = 688
    num_heads: int = 4
    vocab_size: int = 8000
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 5
    warmup: int = 1
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    lr: float = 1e-4
    peak_memory: str = "auto"  # "auto": fresh process per config on CPU, allocator stats on CUDA; "off"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    model: str | None = None  # preset name or config.json path (lopt.experiments.shapes)
    full_num_layers: int | None = None  # the model's own depth (set from `model`)

    def __post_init__(self):
        if self.model is not None:
            from lopt.experiments.shapes import load_shape

            config = load_shape(self.model, self.num_layers)
            full = load_shape(self.model)
            self.full_num_layers = full.num_hidden_layers
            self.num_layers = config.num_hidden_layers
            self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
            self.num_heads, self.vocab_size = config.num_attention_heads, config.vocab_size
        elif self.num_layers is None:
            self.num_layers = 16
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "vocab_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size < 1 or self.steps < 0 or self.warmup < 0:
            raise ValueError(
                "--batch_size must be >= 1, --steps >= 0 (0: activations only) and --warmup >= 0."
            )
        if self.model is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"--hidden_size {self.hidden_size} is not divisible by --num_heads {self.num_heads}."
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}.")
        if self.peak_memory not in ("auto", "off"):
            raise ValueError(f"--peak_memory must be auto or off, got {self.peak_memory!r}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}.")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def model_config(self):
        """The transformers config of the benchmarked model (random weights are built from it)."""
        if self.model is not None:
            from lopt.experiments.shapes import load_shape

            return load_shape(self.model, self.num_layers)
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.seq_len,
            tie_word_embeddings=False,
            use_cache=False,
        )


def canonical_config(name: str) -> str:
    """A config name with its "+" options in CONFIGS' order: "lopt-k2+gc+oib" is "lopt-k2+oib+gc" ("+gcN",
    selective checkpointing of the earliest N layers, stands where "+gc" does)."""
    base, *options = name.split("+")
    kinds = ["gc" if re.fullmatch(r"gc\d+", o) else o for o in options]
    order = ("oib", "gc")
    if set(kinds) <= set(order) and len(set(kinds)) == len(kinds):
        return "+".join([base, *(o for kind in order for o, k in zip(options, kinds) if k == kind)])
    return name


def config_of(name: str) -> BenchConfig:
    """The configuration of a name: one of CONFIGS, or one with "+gcN" (N >= 1) in place of "+gc": checkpointing
    of the earliest N decoder layers only (lopt.engine.checkpointing). KeyError for any other name."""
    name = canonical_config(name)
    if name in CONFIGS:
        return CONFIGS[name]
    match = re.fullmatch(r"(.*)\+gc(\d+)", name)
    if match is None or f"{match.group(1)}+gc" not in CONFIGS or int(match.group(2)) < 1:
        raise KeyError(name)
    config = CONFIGS[f"{match.group(1)}+gc"]
    n = int(match.group(2))
    return config._replace(gc_layers=n, label=f"{config.label}, GC {n} layers")


def is_config(name: str) -> bool:
    try:
        config_of(name)
    except KeyError:
        return False
    return True


def _check_configs(configs: Sequence[str]) -> list[str]:
    configs = [canonical_config(c) for c in configs]
    unknown = [c for c in configs if not is_config(c)]
    if unknown:
        raise ValueError(
            f"unknown config(s) {unknown}; choose from {list(CONFIGS)}, or one with +gcN (checkpoint the earliest "
            "N layers) in place of +gc."
        )
    if not configs:
        raise ValueError("no configs to run.")
    return list(dict.fromkeys(configs))  # unique, order kept


def build_base_model(spec: BenchSpec) -> nn.Module:
    """A randomly initialised causal LM of the spec's shape; the same seed gives the same weights in every process."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(spec.model_config())
    return model.to(device=spec.device, dtype=getattr(torch, spec.dtype))


def make_batch(spec: BenchSpec) -> torch.Tensor:
    """Random token ids, [batch_size, seq_len]; the same for every configuration."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=gen)
    return ids.to(spec.device)


def prepare_for_training(model: nn.Module, config: BenchConfig) -> nn.Module:
    """The model as `lopt sft` trains it in this configuration: fused head, checkpointing, then the LoPT wrapper.

    One place for bench's runners, `lopt plan`'s fake steps and compare's activation measurement.
    """
    from lopt.engine.config import LoPTConfig
    from lopt.engine.model import get_lopt_model

    model.train()
    if config.head == "fused":  # as SFTTrainer does, before any wrapper: a patched forward, no copied code
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    if config.gc:  # non-reentrant: LoPT's detached boundary needs it; E2E uses the same for a fair race
        from lopt.engine.architectures import find_decoder_parts
        from lopt.engine.checkpointing import enable_selective_checkpointing

        num_layers = find_decoder_parts(model).num_layers
        layers = num_layers if config.gc_layers is None else config.gc_layers
        if layers > num_layers:
            raise ValueError(
                f"+gc{layers}: the model has {num_layers} layers; checkpoint at most {num_layers}."
            )
        enable_selective_checkpointing(model, layers)
    if config.backward is None:
        if config.method != "e2e":  # as `lopt sft --method freeze|lora` prepares it
            from lopt.training.methods import prepare_model

            model = prepare_model(model, config.method).model
        return model
    lopt_config = LoPTConfig(
        num_blocks=config.k,
        backward=config.backward,
        aux_objective=config.aux_objective,
        anchor_dtype=config.anchor_dtype,
    )
    return get_lopt_model(model, lopt_config)


def training_loss(model: nn.Module, input_ids: torch.Tensor, head: str) -> torch.Tensor:
    """One training forward on `input_ids` (labels = inputs) through the chosen LM head; returns the loss."""
    extra = {"fused_lm_head": True} if head == "fused" else {}
    # labels = inputs: HF and TRL shift them; the loss is the usual next-token cross-entropy
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False, **extra)
    return out.loss  # LoPT: task + lambda*aux (local mode: aux already backpropagated, detached here)


class GradientMeter:
    """The peak bytes of gradients alive at once while active: after every accumulation into a `.grad` (a
    post-accumulate-grad hook), the bytes of every gradient then present. Gradients only grow at accumulations, so
    the largest of those sums is the peak. Register it before an optimizer-in-backward, whose hook frees the gradient
    right after it is written; `remove()` detaches it."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = [p for p in params if p.requires_grad]
        self.active = False
        self.peak = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._after_accumulation) for p in self.params]

    def _after_accumulation(self, _param: torch.Tensor) -> None:
        if self.active:
            live = sum(p.grad.nbytes for p in self.params if p.grad is not None)
            self.peak = max(self.peak, live)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    return list({id(p): p for p in model.parameters()}.values())


class Runner:
    """One configuration: its own copy of the model, its optimizer, and one training step."""

    def __init__(
        self,
        name: str,
        spec: BenchSpec,
        base_model: nn.Module,
        copy_model: bool = True,
        meter_gradients: bool = False,
    ):
        from lopt.engine.in_backward import optimizer_in_backward
        from lopt.engine.optim import param_groups

        self.name = name
        config = config_of(name)
        self.label, self.backward, self.k, self.gc = config.label, config.backward, config.k, config.gc
        self.head, self.oib = config.head, config.oib
        self.method, self.gc_layers = config.method, config.gc_layers
        self.reference_bytes = 0  # the anchor's frozen copy of pretrained weights
        # same initial weights for every configuration
        self.model = prepare_for_training(copy.deepcopy(base_model) if copy_model else base_model, config)
        if self.backward is None:
            groups = [p for p in self.model.parameters() if p.requires_grad]
        else:
            groups = param_groups(self.model, lr=spec.lr)
            if self.model.anchor is not None:
                self.reference_bytes = self.model.anchor.num_bytes
        self.optimizer = torch.optim.AdamW(groups, lr=spec.lr)
        self.weight_bytes = sum(p.nbytes for p in _unique_parameters(self.model))
        # before the optimizer-in-backward's hooks, so it sees each gradient before the step frees it
        self.gradient_meter = GradientMeter(_unique_parameters(self.model)) if meter_gradients else None
        self.in_backward = None
        if self.oib:  # no clipping, as the ordinary step here: the same update, made earlier
            self.in_backward = optimizer_in_backward(self.model, self.optimizer, track_grad_norm=False)

    def forward_backward(self, input_ids: torch.Tensor) -> float:
        loss = training_loss(
            self.model, input_ids, self.head
        )  # the output (logits) is dropped before backward
        loss.backward()
        return loss.item()

    def finish_step(self) -> None:
        """The optimizer step after the backward (+oib: what the backward left, LoPT's task-loss parameters)."""
        if self.in_backward is not None:
            self.in_backward.step()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, input_ids: torch.Tensor) -> float:
        loss = self.forward_backward(input_ids)
        self.finish_step()
        return loss

    def optimizer_state_bytes(self) -> int:
        return sum(
            t.nbytes for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss()


def _peak_rss() -> int:
    try:  # VmHWM: the peak RSS, which /proc/self/clear_refs can reset
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Linux: reset VmHWM to the current RSS, so the model build's transient does not hide the step's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_one_process(name: str, spec: BenchSpec) -> dict:
    """Run one configuration here (meant for a fresh process): the peak RSS of one step above the RSS before it,
    after a first step that allocates AdamW's state and does the process's one-time set-up (code paths, thread
    pools, allocator arenas), as the CUDA measurement counts a step above its start. The step's whole peak is that
    delta plus what is resident before it: the weights (and an anchor's reference) and the AdamW state.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    runner = Runner(name, spec, build_base_model(spec), copy_model=False)
    batch = make_batch(spec)
    runner.step(batch)  # AdamW's state allocated; its gradients freed (set to None)
    gc.collect()
    reset = _reset_peak_rss()
    before = _current_rss()
    peak_before = _peak_rss()
    runner.step(batch)
    peak = _peak_rss()
    resident = runner.weight_bytes + runner.reference_bytes + runner.optimizer_state_bytes()
    return {
        "name": name,
        "rss_before": before,
        "rss_peak": peak,
        "peak_mem_bytes": max(0, peak - before),
        # the whole step: what is resident before it plus what the step added (gradients, activations, temporaries)
        "step_peak_bytes": resident + max(0, peak - before),
        # without a reset, an earlier transient above the step's peak would make the delta an underestimate
        "peak_reset": reset,
        "peak_hidden_by_build": (not reset) and peak <= peak_before,
    }


# glibc malloc's fixed mmap threshold for the fresh process: every allocation of 64 KiB or more is its own mapping,
# returned to the system when freed, so the RSS follows the tensors alive. With the default dynamic threshold, freed
# gradients and temporaries stay in the heap as holes, and the peak RSS moved by about 100 MB between two runs of
# the same configuration (8 layers x 512, vocab 32000).
FRESH_PROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _fresh_process_peak(name: str, spec: BenchSpec) -> dict:
    cmd = [sys.executable, "-m", "lopt.experiments.bench", "--one", name, "--spec", json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **FRESH_PROCESS_ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess for {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    spec: BenchSpec | None = None,
    configs: Sequence[str] = DEFAULT_CONFIGS,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measure every configuration; one dict per configuration (bytes, seconds, ratios to E2E)."""
    spec = spec or BenchSpec()
    configs = _check_configs(configs)
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        return _run_benchmark(spec, configs, log or (lambda msg: None))
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(spec: BenchSpec, configs: list[str], log: Callable[[str], None]) -> list[dict]:
    cuda = spec.device.startswith("cuda")
    if spec.steps == 0:
        return _measure_activations_only(spec, configs, log)

    base = build_base_model(spec)
    batch = make_batch(spec)
    runners = [Runner(name, spec, base, meter_gradients=True) for name in configs]
    del base
    rows = {r.name: _row(r) for r in runners}

    # 1) Saved-tensor peak: one metered forward+backward per configuration (its own step, untimed: the hook's
    #    Python work would add to the time). It also serves as the first warmup step.
    for r in runners:
        gc.collect()
        r.gradient_meter.active = True
        with SavedTensorMeter() as meter:
            loss = r.forward_backward(batch)
        gc.collect()
        r.finish_step()
        r.gradient_meter.active = False
        r.gradient_meter.remove()  # the timed steps run without it
        rows[r.name].update(
            act_peak_bytes=meter.peak, act_live_after=meter.live, loss=loss, saved_tensors=meter.num_saved
        )
        rows[r.name]["whole_step"] = {
            "weights": r.weight_bytes + r.reference_bytes,
            "gradients": r.gradient_meter.peak,
            "optimizer": r.optimizer_state_bytes(),
            "activations": meter.peak,
        }
        log(
            f"[bench] {r.name}: saved-for-backward peak {meter.peak / MB:.1f} MB, gradients peak "
            f"{r.gradient_meter.peak / MB:.1f} MB"
        )

    # 2) Timing, interleaved: round i runs each configuration once, starting at a rotating offset so no
    #    configuration always follows the same one.
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    cuda_peaks: dict[str, int] = {r.name: 0 for r in runners}
    for i in range(spec.warmup + spec.steps):
        for j in range(len(runners)):
            r = runners[(i + j) % len(runners)]
            if cuda:
                _sync(spec.device)
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            _sync(spec.device)
            t0 = time.perf_counter()
            r.step(batch)
            _sync(spec.device)
            dt = time.perf_counter() - t0
            if cuda:
                cuda_peaks[r.name] = max(cuda_peaks[r.name], torch.cuda.max_memory_allocated() - before)
            if i >= spec.warmup:
                times[r.name].append(dt)
        log(f"[bench] round {i + 1}/{spec.warmup + spec.steps}" + (" (warmup)" if i < spec.warmup else ""))
    for r in runners:
        median = statistics.median(times[r.name])
        rows[r.name].update(
            step_times=times[r.name],
            median_step_s=median,
            min_step_s=min(times[r.name]),  # noise only adds time: the minimum is a second, robust estimate
            tokens_per_s=spec.tokens_per_step / median,
        )
    del runners
    gc.collect()

    # 3) Peak process memory.
    for name in configs:
        row = rows[name]
        if spec.peak_memory == "off":
            row.update(peak_mem_bytes=None, peak_mem_kind=None)
        elif cuda:
            row.update(peak_mem_bytes=cuda_peaks[name], peak_mem_kind="cuda_allocated")
            # resident before a step: this configuration's weights and AdamW state (no gradients: set to None)
            resident = row["whole_step"]["weights"] + row["whole_step"]["optimizer"]
            row["whole_step"]["step_peak"] = resident + cuda_peaks[name]
        else:
            info = _fresh_process_peak(name, spec)
            row.update(
                peak_mem_bytes=info["peak_mem_bytes"],
                peak_mem_kind="rss_fresh_process",
                rss_before=info["rss_before"],
                peak_hidden_by_build=info["peak_hidden_by_build"],
            )
            row["whole_step"]["step_peak"] = info["step_peak_bytes"]
            log(f"[bench] {name}: peak RSS +{info['peak_mem_bytes'] / MB:.1f} MB (fresh process)")

    out = [rows[name] for name in configs]
    add_ratios(out)
    return out


def _row(r: Runner) -> dict:
    return {
        "name": r.name,
        "label": r.label,
        "gc": r.gc,
        "head": r.head,
        "backward": r.backward or r.method,  # "e2e", "freeze" or "lora" when not LoPT
        "method": r.method,
        "gc_layers": r.gc_layers,
        "k": r.k,
        "oib": r.oib,
        "reference_bytes": r.reference_bytes,
    }


def _measure_activations_only(spec: BenchSpec, configs: list[str], log: Callable[[str], None]) -> list[dict]:
    """steps=0: one metered forward+backward per configuration, one model in memory at a time."""
    batch = make_batch(spec)
    out = []
    for name in configs:
        runner = Runner(name, spec, build_base_model(spec), copy_model=False)
        gc.collect()
        with SavedTensorMeter() as meter:
            loss = runner.forward_backward(batch)
        row = _row(runner)
        del runner
        gc.collect()
        row.update(
            act_peak_bytes=meter.peak, act_live_after=meter.live, loss=loss, saved_tensors=meter.num_saved
        )
        log(f"[bench] {name}: saved-for-backward peak {meter.peak / MB:.1f} MB")
        out.append(row)
    add_ratios(out)
    return out


def add_ratios(rows: list[dict]) -> None:
    """Ratios to E2E with the same checkpointing setting and LM head (and activation ratio to E2E without
    checkpointing), in place."""
    e2e = {
        (row["gc"], row.get("head", "fused")): row
        for row in rows
        if row["backward"] == "e2e" and not row.get("oib")
    }

    def ratio(row, key, ref_gc):
        ref = e2e.get((ref_gc, row.get("head", "fused")))
        if ref is None or row.get(key) is None or not ref.get(key):
            return None
        return row[key] / ref[key]

    def paired_time_ratio(row):
        # Median over rounds of (this config's time / E2E's time in the same round): both ran within seconds
        # of each other, so load drifting between rounds (a busy shared machine) cancels out, which a ratio of
        # the two medians does not do.
        ref = e2e.get((row["gc"], row.get("head", "fused")))
        mine, theirs = row.get("step_times"), None if ref is None else ref.get("step_times")
        if not mine or not theirs or len(mine) != len(theirs):
            return ratio(row, "median_step_s", row["gc"])
        return statistics.median(a / b for a, b in zip(mine, theirs))

    for row in rows:
        row["act_ratio"] = ratio(row, "act_peak_bytes", row["gc"])
        row["act_ratio_vs_e2e_nogc"] = ratio(row, "act_peak_bytes", False)
        row["peak_mem_ratio"] = ratio(row, "peak_mem_bytes", row["gc"])
        row["time_ratio"] = paired_time_ratio(row)
        row["time_ratio_of_medians"] = ratio(row, "median_step_s", row["gc"])


def check_targets(rows: list[dict]) -> list[dict]:
    """Each goal as PASS/MISS with its measured ratio (or n/a when a configuration or E2E was not run)."""
    by_name = {row["name"]: row for row in rows}
    out = []
    for name, kind, limit, text in TARGETS:
        row = by_name.get(name)
        value = None if row is None else row["act_ratio" if kind == "act" else "time_ratio"]
        status = "n/a" if value is None else ("PASS" if value <= limit else "MISS")
        target = {"target": text, "config": name, "limit": limit, "value": value, "status": status}
        if row is not None and row["gc"] and kind == "act":
            # the meter misses GC's recomputed tensors (see SavedTensorMeter): show process memory too
            target["peak_mem_ratio"] = row.get("peak_mem_ratio")
        out.append(target)
    return out


# --- one configuration in a fresh process (`run_benchmark` starts it) --------------------------------
def _main(argv: list[str] | None = None) -> int:
    """`python -m lopt.experiments.bench --one NAME --spec JSON`: the fresh-process peak-RSS measurement."""
    parser = argparse.ArgumentParser(prog="python -m lopt.experiments.bench")
    parser.add_argument("--one", required=True, type=canonical_config)
    parser.add_argument("--spec", required=True, help="BenchSpec as JSON")
    args = parser.parse_args(argv)
    spec = BenchSpec(**json.loads(args.spec))
    print(json.dumps(measure_one_process(args.one, spec)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
