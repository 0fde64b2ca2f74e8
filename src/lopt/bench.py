"""`lopt bench`: activation memory, peak memory and step time of E2E vs LoPT, side by side in one run.

Three measurements per configuration (E2E, LoPT-joint k=2, LoPT local k=2, LoPT local k=4; each with and
without gradient checkpointing), all on the same random tokens and the same initial weights:

* peak bytes saved for backward (`measure_saved_tensor_peak`): every tensor autograd saves goes through a
  `saved_tensors_hooks` pack hook that counts its storage while it is alive. LoPT's local backward runs
  inside the forward, so the peak is taken over forward + backward together.
* peak process memory: on CPU the peak RSS of a fresh process per configuration (the allocator state of
  other configurations cannot leak into it), minus its RSS just before the first step; on CUDA the
  allocator's peak (`max_memory_allocated`) minus what was allocated before the step.
* median step time (forward + backward + AdamW step + zero_grad) over interleaved repeats: round r runs
  every configuration once, so machine noise hits all of them alike and the time ratios come from one run.

Importable API (`lopt compare` reuses the meter):
    SavedTensorMeter, measure_saved_tensor_peak(fn) -> int
    BenchSpec, run_benchmark(spec, configs) -> list[dict], check_targets(rows) -> list[dict]
    format_table(rows, markdown=False) -> str, format_targets(targets) -> str

`python -m lopt.bench --one NAME --spec JSON` runs one configuration in this process and prints its peak
RSS as one JSON line; `run_benchmark` starts it once per configuration.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

MB = 1024 * 1024


class BenchConfig(NamedTuple):
    label: str
    backward: str | None  # LoPT backward mode, None for plain E2E
    k: int  # number of blocks
    gc: bool  # activation checkpointing
    aux_objective: str = "recon"
    anchor_dtype: str | None = None  # dtype of the anchor's frozen pretrained copy
    head: str = "fused"  # "fused": TRL's chunked LM head, as `lopt sft` trains; "hf": the model's own loss


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
    "e2e+gc": BenchConfig("E2E", None, 1, True),
    "lopt-joint-k2+gc": BenchConfig("LoPT-joint k=2", "joint", 2, True),
    "lopt-k2+gc": BenchConfig("LoPT k=2", "local", 2, True),
    "lopt-k4+gc": BenchConfig("LoPT k=4", "local", 4, True),
}
DEFAULT_CONFIGS = tuple(CONFIGS)
CONFIGS.update({
    f"{name}-hf{'+gc' if gc else ''}": BenchConfig(f"{label} (HF loss)", backward, k, gc, head="hf")
    for name, label, backward, k in (("e2e", "E2E", None, 1), ("lopt-k2", "LoPT k=2", "local", 2),
                                     ("lopt-k4", "LoPT k=4", "local", 4))
    for gc in (False, True)
})  # fmt: skip
HEADS = {"fused": "TRL fused LM head", "hf": "plain HF loss (full logits)"}

# The targets. kind: "act" = activation peak ratio, "time" = median step time ratio; against E2E with
# the same checkpointing setting and the same LM head.
TARGETS = (
    ("lopt-k2", "act", 0.52, "LoPT k=2 activation bytes <= 0.52x E2E"),
    ("lopt-k4", "act", 0.28, "LoPT k=4 activation bytes <= 0.28x E2E"),
    ("lopt-k2", "time", 1.0, "LoPT k=2 step time <= 1.0x E2E"),
    ("lopt-k4", "time", 1.0, "LoPT k=4 step time <= 1.0x E2E"),
    ("lopt-k2+gc", "act", 0.6, "LoPT k=2+GC activation bytes <= 0.60x E2E+GC"),
    ("lopt-k4+gc", "act", 0.38, "LoPT k=4+GC activation bytes <= 0.38x E2E+GC"),
)


# --- the saved-bytes meter ---------------------------------------------------------------------------
class _SavedBox:
    """What autograd keeps instead of the tensor: it dies exactly when autograd drops the saved tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _is_parameter(tensor: torch.Tensor) -> bool:
    # Weights are not activations. `linear` saves `weight.t()`, a view, so look at the view's base too.
    # Leaf tensors that require grad cover parameters that are not nn.Parameter objects (e.g. flat params).
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)


class SavedTensorMeter:
    """Context manager counting the bytes of tensors saved for backward: `live` now, `peak` since entering.

    Accounting is per storage, not per tensor: a storage is counted once, with its full `nbytes`, for as long
    as at least one saved tensor referencing it is alive. Why: several ops often save the same tensor (q, k
    and v projections all save the normed input) or views of one buffer; counting each would overstate the
    memory, while the whole storage stays allocated as long as any view of it is saved (a saved slice keeps
    its entire buffer alive), so `nbytes` of the storage is what is really held. Tensors that are parameters
    (or views of them, or leaf tensors requiring grad) are excluded unless `include_parameters=True`.

    `dedup=False` counts every saved tensor's storage again each time it is saved (an upper bound, and
    what a naive meter reports; e.g. cross-entropy's log-softmax output is saved twice, by log_softmax and
    by nll_loss), for comparison only.

    Gradient checkpointing (non-reentrant): each checkpointed region saves its inputs through autograd
    (counted here), while the tensors it saves inside the region go through the checkpoint's own innermost
    hooks and are recomputed in the backward: those recomputed tensors (one region at a time, transient) are
    invisible to this meter.
    """

    def __init__(self, include_parameters: bool = False, dedup: bool = True):
        self.include_parameters = include_parameters
        self.dedup = dedup
        self.live = 0
        self.peak = 0
        self.num_saved = 0  # tensors packed (counted or not), for diagnostics
        self._storages: dict[tuple, list[int]] = {}  # key -> [saved boxes alive, nbytes counted]
        self._lock = threading.RLock()  # the backward may run on another thread; RLock: a finalizer can fire
        self._hooks = None  # while _pack holds the lock, on the same thread

    def _pack(self, tensor: torch.Tensor) -> _SavedBox:
        # Keep a detached alias (same storage): an op's saved *output* carries the grad_fn that saves it, and
        # holding it as is would make a node -> box -> tensor -> node cycle that is never freed (the
        # backward breaks it, a graph dropped without backward would leak). Unpacking re-attaches autograd
        # metadata itself, as torch.utils.checkpoint's own hooks rely on.
        box = _SavedBox(tensor.detach())
        self.num_saved += 1
        if not self.include_parameters and _is_parameter(tensor):
            return box
        try:
            storage = tensor.untyped_storage()
            nbytes, ptr = storage.nbytes(), storage._cdata
        except (RuntimeError, NotImplementedError):  # sparse / storage-less subclasses: count the elements
            nbytes, ptr = tensor.nelement() * tensor.element_size(), 0
        if nbytes == 0:
            return box
        # The storage's identity (its StorageImpl, shared by every view) is unique while the box keeps it alive.
        # It exists on fake and meta tensors too, which have no data pointer: `lopt plan` meters fake steps.
        key = ("storage", ptr) if ptr and self.dedup else ("box", id(box))
        with self._lock:
            entry = self._storages.get(key)
            if entry is None:
                self._storages[key] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            else:
                entry[0] += 1
        weakref.finalize(box, self._release, key)  # must not reference box, or it would never be freed
        return box

    def _release(self, key: tuple) -> None:
        with self._lock:
            entry = self._storages[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self._storages[key]
                self.live -= entry[1]

    @staticmethod
    def _unpack(box: _SavedBox) -> torch.Tensor:
        return box.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None


def measure_saved_tensor_peak(
    fn: Callable[[], object], include_parameters: bool = False, dedup: bool = True
) -> int:
    """Peak bytes saved for backward while `fn()` runs (give it forward + backward). See SavedTensorMeter."""
    with SavedTensorMeter(include_parameters=include_parameters, dedup=dedup) as meter:
        fn()
    return meter.peak


# --- the benchmark -----------------------------------------------------------------------------------
@dataclass
class BenchSpec:
    """Model shape, data and repeats. Defaults: the Llama-shaped setting of METHOD.md.

    `model` (a preset of lopt.shapes or a config.json path) replaces the Llama shape fields by that architecture;
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
    model: str | None = None  # preset name or config.json path (lopt.shapes)
    full_num_layers: int | None = None  # the model's own depth (set from `model`)

    def __post_init__(self):
        if self.model is not None:
            from lopt.shapes import load_shape

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
            from lopt.shapes import load_shape

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


def _check_configs(configs: Sequence[str]) -> list[str]:
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}.")
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
    from lopt.config import LoPTConfig
    from lopt.model import get_lopt_model

    model.train()
    if config.head == "fused":  # as SFTTrainer does, before any wrapper: a patched forward, no copied code
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    if config.gc:  # non-reentrant: LoPT's detached boundary needs it; E2E uses the same for a fair race
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name, same function
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.backward is None:
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


class Runner:
    """One configuration: its own copy of the model, its optimizer, and one training step."""

    def __init__(self, name: str, spec: BenchSpec, base_model: nn.Module, copy_model: bool = True):
        from lopt.optim import param_groups

        self.name = name
        config = CONFIGS[name]
        self.label, self.backward, self.k, self.gc = config.label, config.backward, config.k, config.gc
        self.head = config.head
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

    def forward_backward(self, input_ids: torch.Tensor) -> float:
        loss = training_loss(
            self.model, input_ids, self.head
        )  # the output (logits) is dropped before backward
        loss.backward()
        return loss.item()

    def step(self, input_ids: torch.Tensor) -> float:
        loss = self.forward_backward(input_ids)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


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


def measure_one_process(name: str, spec: BenchSpec, steps: int = 2) -> dict:
    """Run one configuration here (meant for a fresh process): peak RSS during `steps` steps minus RSS before.

    Two steps: the first allocates AdamW's state after its backward, the second has it resident while the
    gradients are being written, which is the larger of the two peaks.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    runner = Runner(name, spec, build_base_model(spec))
    batch = make_batch(spec)
    gc.collect()
    reset = _reset_peak_rss()
    before = _current_rss()
    peak_before = _peak_rss()
    for _ in range(steps):
        runner.step(batch)
    peak = _peak_rss()
    return {
        "name": name,
        "rss_before": before,
        "rss_peak": peak,
        "peak_mem_bytes": max(0, peak - before),
        # without a reset, a build transient above the step's peak would make the delta an underestimate
        "peak_reset": reset,
        "peak_hidden_by_build": (not reset) and peak <= peak_before,
    }


def _fresh_process_peak(name: str, spec: BenchSpec) -> dict:
    cmd = [sys.executable, "-m", "lopt.bench", "--one", name, "--spec", json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
    runners = [Runner(name, spec, base) for name in configs]
    del base
    rows = {r.name: _row(r) for r in runners}

    # 1) Saved-tensor peak: one metered forward+backward per configuration (its own step, untimed: the hook's
    #    Python work would add to the time). It also serves as the first warmup step.
    for r in runners:
        gc.collect()
        with SavedTensorMeter() as meter:
            loss = r.forward_backward(batch)
        gc.collect()
        r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)
        rows[r.name].update(
            act_peak_bytes=meter.peak, act_live_after=meter.live, loss=loss, saved_tensors=meter.num_saved
        )
        log(f"[bench] {r.name}: saved-for-backward peak {meter.peak / MB:.1f} MB")

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
        else:
            info = _fresh_process_peak(name, spec)
            row.update(
                peak_mem_bytes=info["peak_mem_bytes"],
                peak_mem_kind="rss_fresh_process",
                rss_before=info["rss_before"],
                peak_hidden_by_build=info["peak_hidden_by_build"],
            )
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
        "backward": r.backward or "e2e",
        "k": r.k,
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
    e2e = {(row["gc"], row.get("head", "fused")): row for row in rows if row["backward"] == "e2e"}

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
    """The issue's targets as PASS/MISS (or n/a when a configuration or E2E was not run)."""
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


# --- the race at a fixed activation budget ------------------------------------------------------------
RACE_METHODS = ("e2e", "lopt-k2", "lopt-k4")
RACE_SPEEDUP_TARGET = 1.15  # the target: LoPT's tokens/s >= 1.15x E2E's best setting that fits
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
    del base
    auto = budget_mb is None
    budget = int(AUTO_BUDGET_FRACTION * peaks[("e2e", False, 1)]) if auto else int(budget_mb * MB)

    candidates = []
    for (method, use_gc), runner in runners.items():
        fitting = [m for m in _micro_batches(spec.batch_size) if peaks[(method, use_gc, m)] <= budget]
        if fitting:
            candidates.append({"method": method, "gc": use_gc, "micro_batch": max(fitting), "runner": runner})
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
            "micro_batch": cand["micro_batch"], "accumulation": spec.batch_size // cand["micro_batch"],
            "act_peak_bytes": peaks[(cand["method"], cand["gc"], cand["micro_batch"])],
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
            {"method": m, "gc": g, "micro_batch": mb, "act_peak_bytes": v} for (m, g, mb), v in peaks.items()
        ],
        "rows": rows,
        "e2e_needs_gc": not any(peaks[("e2e", False, m)] <= budget for m in _micro_batches(spec.batch_size)),
        "lopt_fits_without_gc": {
            m: any(peaks[(m, False, mb)] <= budget for mb in _micro_batches(spec.batch_size))
            for m in methods
            if m != "e2e"
        },
    }


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
        "",
    ]
    cells = [
        [
            row["label"], "yes" if row["gc"] else "no", f"{row['micro_batch']} x {row['accumulation']}",
            _fmt_mb(row["act_peak_bytes"]), f"{row['median_step_s']:.3f}", f"{row['tokens_per_s']:.0f}",
            _fmt(row["speed_ratio"], ".2f"), "best" if row["best"] else "",
        ]
        for row in race["rows"]
    ]  # fmt: skip
    budget = f"{race['budget_bytes'] / MB:.1f} MB" + (
        f" (auto: {AUTO_BUDGET_FRACTION} x E2E's no-GC peak at micro-batch 1)" if race["auto_budget"] else ""
    )
    notes = [
        f"activation budget {budget}; global batch {race['global_batch']} per optimizer step for every setting.",
        "Per method and GC setting, the largest micro-batch whose measured activation peak fits; all timed "
        "interleaved in one run (median step = forward+backward of every micro-batch + AdamW step).",
        "x E2E best = tokens/s / E2E's fastest fitting setting; best = the method's fastest.",
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
    else:
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(x.ljust(w) for x, w in zip(c, widths)) for c in cells]
    lines += [""] + [("- " if markdown else "* ") + n for n in notes]
    lines += ["", "Targets:"]
    for t in race_targets(race):
        value = "" if t["value"] is None else f": {t['value']:.2f}x"
        lines.append(f"  [{t['status']:>4}] {t['target']}{value}")
    return "\n".join(lines)


# --- output ------------------------------------------------------------------------------------------
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
            "yes" if row["gc"] else "no",
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


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """One row per configuration; ratios are to E2E with the same checkpointing setting unless marked."""
    cells = _table_cells(rows)
    kinds = {row.get("peak_mem_kind") for row in rows} - {None}
    mem_note = {
        "rss_fresh_process": "peak mem = peak RSS of a fresh process per config minus its RSS before the first "
        "step (2 steps; includes gradients and AdamW state, the same for every config)",
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
    lines = ["Targets:"]
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


def _main(argv: list[str] | None = None) -> int:
    """`python -m lopt.bench --one NAME --spec JSON`: the fresh-process peak-RSS measurement."""
    parser = argparse.ArgumentParser(prog="python -m lopt.bench")
    parser.add_argument("--one", required=True, choices=list(CONFIGS))
    parser.add_argument("--spec", required=True, help="BenchSpec as JSON")
    args = parser.parse_args(argv)
    spec = BenchSpec(**json.loads(args.spec))
    print(json.dumps(measure_one_process(args.one, spec)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
