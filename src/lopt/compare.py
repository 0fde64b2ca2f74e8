"""`lopt compare`: the same base model, data, step budgets and seeds under each method; memory, time, task
accuracy and retention side by side, written as results.json, report.md and PNG plots.

A sweep runs every method at every (learning rate, step budget) point. Each run is a `lopt sft` subprocess (so its
peak memory is its own), then its checkpoint is scored on two disjoint sides: validation (task rows and half the
retention texts) for every choice, test (the other rows and half) for every reported number. Finished runs are
reused when compare is run again (resume). The activation peak (bytes saved for backward) is measured per method
on one training batch with the same meter as `lopt bench`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lopt.errors import UserError
from lopt.io import atomic_write_json, atomic_write_text

# compare name -> `lopt sft` flags. Names are fixed recipes: a LoPT name trains its early group at the full lr
# (the paper's setting), "name@r" (e.g. "lopt@0.3", `lopt sft`'s default) at r x lr.
METHOD_FLAGS: dict[str, list[str]] = {
    "e2e": ["--method", "e2e"],
    "lopt": ["--method", "lopt", "--num_blocks", "2"],
    "lopt_k4": ["--method", "lopt", "--num_blocks", "4"],
    "lopt_joint": ["--method", "lopt_joint", "--num_blocks", "2"],
    "freeze": ["--method", "freeze"],
    "lora": ["--method", "lora"],
    "lopt_anchor": ["--method", "lopt", "--num_blocks", "2", "--aux_objective", "anchor"],
    "lopt_recon_anchor": ["--method", "lopt", "--num_blocks", "2", "--aux_objective", "recon+anchor"],
    "lopt_k4_anchor": ["--method", "lopt", "--num_blocks", "4", "--aux_objective", "recon+anchor"],
    # The local task objective (logit-lens next-token loss at each boundary), at lambda 1: with the paper's 10 the
    # early gradients dominate the global clipping norm and shrink the last block's step.
    "lopt_task": ["--method", "lopt", "--num_blocks", "2", "--aux_objective", "task", "--lambda_aux", "1"],
    "lopt_k4_task": ["--method", "lopt", "--num_blocks", "4", "--aux_objective", "task", "--lambda_aux", "1"],
    "lopt_task_anchor": [
        *("--method", "lopt", "--num_blocks", "2", "--aux_objective", "task+anchor"),
        *("--lambda_aux", "1", "--anchor_weight", "0.1"),
    ],
}
DEFAULT_METHODS = ("e2e", "lopt", "lopt@0.3", "lopt_k4", "lopt_joint", "freeze", "lora")
METRICS = (
    "activation_peak_bytes",
    "peak_memory_bytes",
    "step_time_s",
    "tokens_per_s",
    "task_accuracy",
    "retention_ppl",
    "final_task_loss",
    "validation_task_accuracy",
    "validation_retention_ppl",
)


RETENTION_BUDGETS = (
    0.25,
    1.0,
    4.0,
)  # retention-perplexity rise, as a fraction of the base model's perplexity
ACCURACY_TARGETS = (0.5, 0.8, 0.9)  # validation task accuracy
RUN_RECORD = "compare_run.json"  # written last in a run folder: training metrics and scores of a finished run
COMMAND_MARKER = "compare_command.json"  # written first: the `lopt sft` command and base model of the run
# In --output_dir: the base model's scores, each method's activation peak and the evaluation key (--report_only).
BASE_RECORD = "compare_base.json"
# `lopt sft` flags that compare sets itself, per run; in --sft_args they would silently override the sweep.
_COMPARE_OWNED_FLAGS = ("--max_steps", "--seed", "--output_dir", "--task", "--eval_samples")


@dataclass
class CompareSpec:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: int = 3
    max_steps: list[int] = field(default_factory=lambda: [300])  # the step-budget axis: one run per budget
    learning_rates: list[float] | None = None  # None: --learning_rate in sft_args, else `lopt sft`'s default
    method_learning_rates: dict[str, list[float]] = field(default_factory=dict)  # name or base name -> grid
    eval_samples: int = 300
    task: str | None = None  # a built-in task; None: the model's default one (see _task)
    # None: the built-in model; a real base (lopt.hub_bases) trains on its task (extract) by default
    model_name_or_path: str | None = None
    train_file: str | None = None
    eval_file: str | None = None  # test rows: what the report states
    validation_file: str | None = None  # validation rows: what the selection uses
    retention_file: str | None = None
    sft_args: list[str] = field(
        default_factory=list
    )  # any other `lopt sft` flags, identical for every method
    output_dir: str = "runs/compare"
    progress: bool = True
    lr_k1_ratios: list[float] | None = None  # adds "lopt@r" for each ratio r != 1 (the learning-rate study)
    retention_budgets: tuple[float, ...] = RETENTION_BUDGETS
    accuracy_targets: tuple[float, ...] = ACCURACY_TARGETS
    # lm-evaluation-harness tasks scored before and after every run (lopt.lm_eval_tasks.CompareLMEval)
    lm_eval_tasks: str | None = None
    lm_eval_limit: float | None = None
    lm_eval_batch_size: int | str = 16
    # The world-knowledge probe and code perplexity (lopt.world_knowledge); None: on for a real base only.
    world_knowledge: bool | None = None
    jobs: int = 1  # runs at once, each in its own worker process (a GPU is mostly idle with one small run)
    time_limit: float | None = None  # seconds; past it no new run starts and the report covers finished runs
    report_only: bool = False  # no training or scoring: the report from the finished runs in output_dir

    def __post_init__(self):
        if isinstance(self.max_steps, int):
            self.max_steps = [self.max_steps]
        unknown = [m for m in self.methods if _base_name(m) not in METHOD_FLAGS]
        if unknown:
            raise UserError(
                f"--methods {unknown} unknown; choose from {', '.join(METHOD_FLAGS)} (optionally name@lr_k1_ratio, "
                "name+bN for a boundary at layer N)."
            )
        for name in self.methods:
            _lr_k1_ratio(name)  # validates the "@r" suffix
            _boundary(name)  # and the "+bN" one
        if self.lr_k1_ratios:
            if "lopt" not in self.methods:
                raise UserError(
                    "--lr_k1_ratios varies the lopt method's early lr: include lopt in --methods."
                )
            if any(r <= 0 for r in self.lr_k1_ratios):
                raise UserError(f"--lr_k1_ratios {self.lr_k1_ratios} must all be > 0.")
            at = self.methods.index("lopt") + 1
            extra = [f"lopt@{r:g}" for r in self.lr_k1_ratios if r != 1 and f"lopt@{r:g}" not in self.methods]
            self.methods[at:at] = extra
        if self.jobs < 1:
            raise UserError(f"--jobs {self.jobs} must be >= 1.")
        if self.time_limit is not None and not self.time_limit > 0:
            raise UserError(f"--time_limit {self.time_limit} must be > 0 seconds.")
        if self.seeds < 1 or not self.max_steps or min(self.max_steps) < 1:
            raise UserError(f"--seeds {self.seeds} and --max_steps {self.max_steps} must be >= 1.")
        self.max_steps = sorted(set(self.max_steps))
        grids = {"--learning_rates": self.learning_rates or [], **self.method_learning_rates}
        for flag, grid in grids.items():
            if any(not lr > 0 for lr in grid):
                raise UserError(f"learning rates {flag} {grid} must all be > 0.")
        known = {*self.methods, *map(_base_name, self.methods)}
        stray = [k for k in self.method_learning_rates if k not in known]
        if stray:
            raise UserError(
                f"--method_learning_rates names {stray}, not in --methods {','.join(self.methods)}: fix the name."
            )
        owned = [flag for flag in _COMPARE_OWNED_FLAGS if _has_flag(self.sft_args, flag)]
        if (self.learning_rates or self.method_learning_rates) and _has_flag(
            self.sft_args, "--learning_rate"
        ):
            owned.append("--learning_rate")
        if owned:
            raise UserError(
                f"--sft_args sets {', '.join(owned)}, which compare sets per run: use compare's own flags "
                "(--max_steps, --seeds, --task, --learning_rates) instead."
            )
        if self.task is not None:
            from lopt.builtin import BUILTIN_MODEL_TASKS, BUILTIN_TASKS

            if self.task not in BUILTIN_TASKS:
                raise UserError(f"--task {self.task!r} is unknown: choose from {', '.join(BUILTIN_TASKS)}.")
            if self.model_name_or_path is not None and self.task in BUILTIN_MODEL_TASKS:
                raise UserError(
                    f"--task {self.task!r} is made for the built-in model: drop it, or --model_name_or_path."
                )
            if self.train_file is not None:
                raise UserError(f"--task {self.task!r} is a built-in task: drop it, or --train_file.")
        if self.model_name_or_path is not None and _task(self) is None and self.train_file is None:
            raise UserError(
                "a user model needs --train_file, or --task extract (a real base such as smollm2-135m trains on "
                "extract by default)."
            )
        sweeping = any(len(self.points_of(name)) > 1 for name in self.methods)
        if sweeping and self.eval_file and not self.validation_file:
            raise UserError(
                "a sweep chooses each method's best setting on validation rows: add --validation_file (rows "
                "disjoint from --eval_file, which only reports)."
            )

    def learning_rates_of(self, name: str) -> list[float]:
        """The lr grid of one method: its own (exact name, else base name), else --learning_rates, else one lr."""
        grid = self.method_learning_rates.get(name) or self.method_learning_rates.get(_base_name(name))
        return list(dict.fromkeys(grid or self.learning_rates or [_learning_rate(self)]))  # once each

    def points_of(self, name: str) -> list[tuple[float, int]]:
        """(lr, max_steps) of every point of one method, in a fixed order."""
        return [(lr, steps) for lr in self.learning_rates_of(name) for steps in self.max_steps]


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _is_real_base(model_name_or_path: str | None) -> bool:
    """A real pretrained base (lopt.hub_bases: a short name, or a folder converted from one)."""
    from lopt.real_task import is_real_base

    return model_name_or_path is not None and is_real_base(model_name_or_path)


def _task(spec: CompareSpec) -> str | None:
    """The built-in task compare trains and scores on: --task, else the model's default (successor for the built-in
    model, extract for a real base); None for the user's data (--train_file)."""
    from lopt.builtin import default_task

    if spec.train_file is not None:
        return None
    return spec.task or default_task(spec.model_name_or_path)


def _world_knowledge_on(spec: CompareSpec) -> bool:
    return (
        spec.world_knowledge if spec.world_knowledge is not None else _is_real_base(spec.model_name_or_path)
    )


def run_compare(spec: CompareSpec) -> dict:
    import time

    started = time.monotonic()
    os.makedirs(spec.output_dir, exist_ok=True)
    points = [(name, lr, steps) for name in spec.methods for lr, steps in spec.points_of(name)]
    runs: dict[tuple, list[dict]] = {point: [] for point in points}
    total = spec.seeds * len(points)
    if spec.report_only:
        base = _read_base(spec)
        lm_eval = _lm_eval(spec)
        for seed in range(spec.seeds):
            for name, lr, steps in points:
                record = _read_record(os.path.join(spec.output_dir, "runs", run_name(name, lr, steps, seed)))
                expected = {
                    "command": _sft_command(spec, name, lr, steps, seed),
                    "base_model": base["base_model"],
                    "evaluation_key": base["evaluation_key"],
                }
                if record is not None and all(record.get(k) == v for k, v in expected.items()):
                    runs[(name, lr, steps)].append(record)
        reused = sum(map(len, runs.values()))
    else:
        base, scorer = _measure_base(spec)
        lm_eval = scorer.lm_eval
        bar = tqdm(total=total, desc="compare", disable=not spec.progress)
        with _Pool(spec, base["base_model"], scorer) as pool:
            # Seed 0 of every point first, then the other seeds where the report reads first (see _seed_order),
            # so a --time_limit leaves the chosen settings with the most seeds.
            for seed in range(spec.seeds):
                order = (
                    _first_seed_order(spec, points)
                    if seed == 0
                    else _seed_order(spec, runs, base["before"], points)
                )
                for point, record in pool.map([(seed, *point) for point in order], started):
                    runs[point].append(record)
                    bar.update()
        bar.close()
        reused = pool.reused

    runs = {point: sorted(rs, key=lambda r: r["seed"]) for point, rs in runs.items() if rs}
    finished = sum(map(len, runs.values()))
    if not finished:
        if spec.report_only:
            raise UserError(f"--report_only: no finished run of this command in {spec.output_dir!r}.")
        raise UserError(f"--time_limit {spec.time_limit:g} s passed before any run finished: raise it.")
    results = collect_results(
        spec,
        runs,
        base["before"],
        # An lr does not change memory. None: not measured (--report_only of a method no compare here measured).
        {name: base["activation"].get(_memory_name(name)) for name in spec.methods},
        _setup(spec, base, reused, total, finished),
    )
    from lopt.world_knowledge import add_world_knowledge

    add_world_knowledge(results, runs)  # knowledge kept and code perplexity per point, when the probe ran
    chosen = results[
        "methods"
    ]  # each method's point chosen on validation (methods without runs are left out)
    lm_eval.add_summaries(
        results, {n: runs[(n, p["learning_rate"], p["max_steps"])] for n, p in chosen.items()}
    )
    atomic_write_json(os.path.join(spec.output_dir, "results.json"), results)
    atomic_write_text(os.path.join(spec.output_dir, "report.md"), format_report(results))
    write_plots(results, spec.output_dir)
    return results


def _lm_eval(spec: CompareSpec):
    from lopt.lm_eval_tasks import CompareLMEval

    return CompareLMEval(
        spec.lm_eval_tasks, spec.model_name_or_path is None, spec.lm_eval_limit, spec.lm_eval_batch_size
    )


def _measure_base(spec: CompareSpec) -> tuple[dict, _Scorer]:
    """Scores the base model and measures each method's activation peak; written to compare_base.json, so the
    report can be rebuilt from the run records alone (--report_only), e.g. after a sweep was killed."""
    import transformers
    from transformers import AutoConfig

    from lopt.loading import load_model_and_tokenizer

    model, tokenizer, base_path = load_model_and_tokenizer(spec.model_name_or_path, progress=spec.progress)
    scorer = _Scorer.make(spec, base_path, tokenizer)
    before = evaluate_model(_scoring_device(model), tokenizer, scorer.sets)
    before.update(scorer.world.measure_base(model, tokenizer))
    activation = {
        name: activation_peak_bytes(base_path, name, spec) for name in map(_memory_name, spec.methods)
    }
    del model
    before.update(scorer.lm_eval(base_path))
    sets = scorer.sets
    base = {
        "base_model": str(base_path),
        "evaluation_key": scorer.evaluation_key,
        "before": before,
        "activation": activation,
        "facts": {
            "vocab_size": len(tokenizer),
            "num_layers": AutoConfig.from_pretrained(base_path).num_hidden_layers,
            "validation_rows": len(sets["validation"][0]) if sets["validation"] else 0,
            "test_rows": len(sets["test"][0]) if sets["test"] else 0,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_threads": torch.get_num_threads(),
        },
    }
    path = os.path.join(spec.output_dir, BASE_RECORD)
    previous = _read_json(path) or {}
    # Keep what earlier compares measured for other methods (a later --report_only may ask for the union).
    if (
        previous.get("base_model") == base["base_model"]
        and previous.get("evaluation_key") == base["evaluation_key"]
    ):
        base["activation"] = {**previous.get("activation", {}), **activation}
    atomic_write_json(path, base)
    return base, scorer


def _read_base(spec: CompareSpec) -> dict:
    base = _read_json(os.path.join(spec.output_dir, BASE_RECORD))
    if base is None:
        raise UserError(
            f"--report_only needs {BASE_RECORD} in {spec.output_dir!r}, written when a compare starts: run compare "
            "there once without --report_only."
        )
    return base


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            return None


@dataclass
class _Scorer:
    """What training and scoring one run needs; made once per process (the parent, or each --jobs worker)."""

    spec: CompareSpec
    base_path: str
    tokenizer: object
    sets: dict
    lm_eval: object
    world: object  # lopt.world_knowledge.CompareWorldKnowledge
    evaluation_key: str

    @classmethod
    def make(cls, spec: CompareSpec, base_path: str, tokenizer=None) -> _Scorer:
        from transformers import AutoTokenizer

        from lopt.world_knowledge import CompareWorldKnowledge

        lm_eval = _lm_eval(spec)
        world = CompareWorldKnowledge(_world_knowledge_on(spec), base_path)
        sets = evaluation_sets(spec)
        # lm-eval's tasks and limit, and the world-knowledge probe, are part of what a run is scored on: change them
        # and runs are re-scored.
        probes = {"lm_eval": [lm_eval.tasks.names if lm_eval.tasks else None, spec.lm_eval_limit]}
        if world.enabled:
            probes["world_knowledge"] = [world.key]
        key = _evaluation_key({**sets, **probes})
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(base_path)
        return cls(spec, str(base_path), tokenizer, sets, lm_eval, world, key)

    def _where(self, seed: int, name: str, lr: float, steps: int) -> tuple[str, list[str]]:
        """The run's folder and its `lopt sft` command."""
        run_dir = os.path.join(self.spec.output_dir, "runs", run_name(name, lr, steps, seed))
        return run_dir, _sft_command(self.spec, name, lr, steps, seed)

    def finished(self, seed: int, name: str, lr: float, steps: int) -> dict | None:
        """The record of this run if an earlier compare finished it under the same command and evaluation."""
        return finished_run(*self._where(seed, name, lr, steps), self.base_path, self.evaluation_key)

    def run(self, seed: int, name: str, lr: float, steps: int) -> dict:
        """Trains (unless a complete checkpoint of this command is there) and scores one run; returns its record."""
        from transformers import AutoModelForCausalLM

        run_dir, command = self._where(seed, name, lr, steps)
        # Training is redone unless its checkpoint is complete and made by this command (then only re-scored).
        if not _checkpoint_complete(run_dir, command, self.base_path):
            _train(command, self.base_path, run_dir, f"{name} lr {lr:g}, {steps} steps, seed {seed}")
        trained = _scoring_device(AutoModelForCausalLM.from_pretrained(run_dir))
        record = {
            "command": command,
            "base_model": self.base_path,
            "evaluation_key": self.evaluation_key,
            **_training_metrics(run_dir),
            **evaluate_model(trained, self.tokenizer, self.sets),
            **self.world(trained, self.tokenizer),
            "seed": seed,
        }
        del trained
        record.update(self.lm_eval(run_dir))
        atomic_write_json(os.path.join(run_dir, RUN_RECORD), record)  # last: marks the run finished
        return record


def _scoring_device(model):
    """The base model and every trained one are scored on the same device: the GPU when there is one."""
    return model.to("cuda") if torch.cuda.is_available() else model


_WORKER: _Scorer | None = None  # a --jobs worker process's scorer


def _init_worker(spec: CompareSpec, base_path: str, threads: int) -> None:
    global _WORKER
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the `lopt sft` subprocesses share the cores too
    torch.set_num_threads(threads)
    _WORKER = _Scorer.make(spec, base_path)


def _worker_run(seed: int, name: str, lr: float, steps: int) -> dict:
    return _WORKER.run(seed, name, lr, steps)


class _Pool:
    """Runs compare's jobs: in this process with --jobs 1, else in that many worker processes (each trains with
    `lopt sft` and scores). Past --time_limit no new run starts; the ones running finish."""

    def __init__(self, spec: CompareSpec, base_path: str, scorer: _Scorer):
        self.spec, self.scorer, self.reused = spec, scorer, 0
        self.executor = None
        if spec.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // spec.jobs)
            self.executor = ProcessPoolExecutor(
                spec.jobs,
                mp_context=multiprocessing.get_context("spawn"),  # CUDA cannot be forked
                initializer=_init_worker,
                initargs=(spec, str(base_path), threads),
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)

    def _out_of_time(self, started: float) -> bool:
        import time

        return self.spec.time_limit is not None and time.monotonic() - started > self.spec.time_limit

    def map(self, jobs: list[tuple], started: float):
        """Yields ((name, lr, steps), record) for each job that finished, in completion order. Runs an earlier
        compare finished are reused at once, whatever the time."""
        from concurrent.futures import FIRST_COMPLETED, wait

        queue, pending = [], {}
        for seed, *point in jobs:
            record = self.scorer.finished(seed, *point)
            if record is None:
                queue.append((seed, *point))
            else:
                self.reused += 1
                yield tuple(point), record
        while queue or pending:
            while queue and len(pending) < max(1, self.spec.jobs) and not self._out_of_time(started):
                seed, *point = queue.pop(0)
                if self.executor is None:
                    yield tuple(point), self.scorer.run(seed, *point)
                else:
                    pending[self.executor.submit(_worker_run, seed, *point)] = tuple(point)
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()


def _first_seed_order(spec: CompareSpec, points: list[tuple]) -> list[tuple]:
    """Seed 0's order: the smallest step budget first, and within it the methods taking turns through their lr
    grids, so a --time_limit leaves every method with its cheapest points rather than some methods with all."""
    methods = {name: i for i, name in enumerate(spec.methods)}

    def key(point):
        name, lr, steps = point
        return steps, spec.learning_rates_of(name).index(lr), methods[name]

    return sorted(points, key=key)


def _seed_order(spec: CompareSpec, runs: dict, before: dict, points: list[tuple]) -> list[tuple]:
    """Points in the order their extra seeds are run: first those the report reads (each method's point chosen on
    validation, then its points chosen at each retention budget and accuracy target), then the rest. The order
    only matters under --time_limit, and it is decided on validation numbers alone."""
    entries = []
    for (name, lr, steps), rs in runs.items():
        if rs:
            entry = {"method": name, "learning_rate": lr, "max_steps": steps}
            entry.update(_aggregate(rs, 0, before))
            entries.append(entry)
    first = []
    for name in spec.methods:
        own = [e for e in entries if e["method"] == name]
        first.append(select_on_validation(own))
        first += [accuracy_at_retention(own, b) for b in spec.retention_budgets]
        first += [retention_at_accuracy(own, t) for t in spec.accuracy_targets]
    keys = [(e["method"], e["learning_rate"], e["max_steps"]) for e in first if e is not None]
    ranked = list(dict.fromkeys(k for k in keys if k in points))
    return ranked + [p for p in points if p not in ranked]


def run_name(name: str, lr: float, steps: int, seed: int) -> str:
    return f"{name}-lr{lr:g}-steps{steps}-seed{seed}"


# --- resume: a run folder is reused only when it is complete and made by the same command ----------------------
def finished_run(run_dir: str, command: list[str], base_path: str, evaluation_key: str) -> dict | None:
    """The run's record if it finished under exactly this command, base model and evaluation; else None."""
    record = _read_record(run_dir)
    if record is None or not _checkpoint_complete(run_dir, command, base_path):
        return None
    return record if record.get("evaluation_key") == evaluation_key else None


def _read_record(run_dir: str) -> dict | None:
    return _read_json(os.path.join(run_dir, RUN_RECORD))


def _checkpoint_complete(run_dir: str, command: list[str], base_path: str) -> bool:
    """Training finished under this command (only the evaluation may be missing or stale). The command marker is
    written into an emptied folder before training and `lopt sft` writes summary.json last, so a killed run, or a
    folder left by another command, never passes."""
    needed = ("summary.json", "model.safetensors", "metrics.jsonl", COMMAND_MARKER)
    if not all(os.path.isfile(os.path.join(run_dir, f)) for f in needed):
        return False
    with open(os.path.join(run_dir, COMMAND_MARKER)) as f:
        return json.load(f) == {"command": command, "base_model": base_path}


def _evaluation_key(sets: dict) -> str:
    """A fingerprint of the rows and texts every run is scored on: change them and runs are re-scored."""
    import hashlib

    text = json.dumps(
        {k: v if k.endswith("retention") else (v and v[0]) for k, v in sets.items()}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- evaluation: every model on the validation and the test side ------------------------------------------------
def evaluation_sets(spec: CompareSpec) -> dict:
    """{"validation"/"test": (task rows, match, max new tokens) or None, "validation_retention"/"test_retention":
    texts or None}.

    The retention texts are split in two halves (documents alternate), so the retention a selection reads is not
    the retention the report states. Default texts: the built-in model's held-out documents, or for a real base
    English prose (lopt.world_knowledge.prose_texts).
    """
    from lopt.evaluate import read_retention_file

    if (task := _task(spec)) is not None:
        from lopt.builtin import builtin_task_rows, retention_texts, task_max_new_tokens, task_scorer

        scoring = (task_scorer(task), task_max_new_tokens(task))
        validation = (builtin_task_rows("validation", n=spec.eval_samples, task=task), *scoring)
        test = (builtin_task_rows("test", n=spec.eval_samples, task=task), *scoring)
        if spec.retention_file:
            retention = read_retention_file(spec.retention_file)
        elif spec.model_name_or_path is None:
            retention = retention_texts()
        else:
            from lopt.world_knowledge import prose_texts

            retention = prose_texts()
    else:
        from lopt.data import load_rows

        def rows(path):
            return (load_rows(train_file=path, max_samples=spec.eval_samples), None, 32) if path else None

        validation, test = rows(spec.validation_file), rows(spec.eval_file)
        retention = read_retention_file(spec.retention_file) if spec.retention_file else None
    if retention is not None and len(retention) < 2:
        raise UserError(
            f"--retention_file {spec.retention_file!r} has one document: separate at least two with a blank line "
            "(half select, half report)."
        )
    return {
        "validation": validation,
        "test": test,
        "validation_retention": retention[0::2] if retention else None,
        "test_retention": retention[1::2] if retention else None,
    }


def evaluate_model(model, tokenizer, sets: dict) -> dict:
    """Task accuracy and retention perplexity on both sides: "validation_task_accuracy",
    "validation_retention_ppl" (for choices) and "task_accuracy", "retention_ppl" (the test side, reported)."""
    from lopt.evaluate import evaluate_checkpoint, perplexity

    model.eval()
    result = {}
    for side, prefix in (("validation", "validation_"), ("test", "")):
        if sets[side] is not None:
            rows, match, max_new_tokens = sets[side]
            result[f"{prefix}task_accuracy"] = evaluate_checkpoint(
                model, tokenizer, rows, None, match=match, max_new_tokens=max_new_tokens
            )["task_accuracy"]
        if sets[f"{side}_retention"] is not None:
            result[f"{prefix}retention_ppl"] = perplexity(model, tokenizer, sets[f"{side}_retention"])
    return result


def _base_name(name: str) -> str:
    """The recipe of a method name: "lopt_task@0.3+b6" -> "lopt_task"."""
    return name.split("@", 1)[0].split("+b", 1)[0]


def _memory_name(name: str) -> str:
    """The name without its "@r" (the early lr does not change memory): the key of its activation peak."""
    return _base_name(name) + (f"+b{b}" if (b := _boundary(name)) is not None else "")


def _lr_k1_ratio(name: str) -> float | None:
    """The r of "method@r", None without a suffix."""
    if "@" not in name:
        return None
    text = name.split("@", 1)[1].split("+b", 1)[0]
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not ratio > 0 or not METHOD_FLAGS[_base_name(name)][1].startswith("lopt"):
        raise UserError(f"--methods {name!r}: '@r' takes a ratio r > 0 and applies to LoPT methods only.")
    return ratio


def _boundary(name: str) -> int | None:
    """The N of "method+bN" (the one boundary of a two-block method: its later block starts at layer N)."""
    if "+b" not in name:
        return None
    text = name.split("+b", 1)[1].split("@", 1)[0]
    command = METHOD_FLAGS[_base_name(name)]
    flags = dict(zip(command[::2], command[1::2]))
    two_blocks = flags["--method"] == "freeze" or flags.get("--num_blocks") == "2"
    if not text.isdigit() or int(text) < 1 or not two_blocks:
        raise UserError(
            f"--methods {name!r}: '+bN' takes a layer N >= 1 and applies to freeze and the two-block LoPT methods."
        )
    return int(text)


def _method_flags(name: str, lr: float) -> list[str]:
    flags = list(METHOD_FLAGS[_base_name(name)])
    if (boundary := _boundary(name)) is not None:
        flags += ["--boundaries", str(boundary)]
    if _is_lopt(name):  # always explicit, so a name means the same recipe whatever `lopt sft`'s default is
        ratio = _lr_k1_ratio(name) or 1.0
        flags += ["--lr_k1", f"{ratio * lr:.10g}"]
    return flags


def _learning_rate(spec: CompareSpec) -> float:
    """The lr without a sweep: --learning_rate in sft_args, else `lopt sft`'s default for this model."""
    import argparse

    from lopt.arguments import sft_learning_rate

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--learning_rate", type=float, default=None)
    known, _ = parser.parse_known_args(spec.sft_args)
    if known.learning_rate is not None:
        return known.learning_rate
    return sft_learning_rate(builtin_model=spec.model_name_or_path is None, task=_task(spec))


def _sft_command(spec: CompareSpec, name: str, lr: float, steps: int, seed: int) -> list[str]:
    """The `lopt sft` arguments of one run (all but --output_dir, so an output folder can be moved)."""
    cmd = ["sft", *_method_flags(name, lr), "--learning_rate", f"{lr:.10g}", "--seed", str(seed)]
    cmd += ["--max_steps", str(steps), "--eval_samples", "0", "--no_progress"]
    if spec.model_name_or_path is not None:
        cmd += ["--model_name_or_path", spec.model_name_or_path]
        # a real base trains on its built-in task unless given data; named, so the command says what it trains on
        cmd += ["--train_file", spec.train_file] if spec.train_file is not None else ["--task", _task(spec)]
    elif spec.task is not None:
        cmd += ["--task", spec.task]
    return cmd + spec.sft_args


def _train(command: list[str], base_path: str, run_dir: str, label: str) -> None:
    import shutil

    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a half-written run, or another command's: start clean
    os.makedirs(run_dir)
    atomic_write_json(os.path.join(run_dir, COMMAND_MARKER), {"command": command, "base_model": base_path})
    cmd = [sys.executable, "-m", "lopt", *command, "--output_dir", run_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"training {label} failed: {' '.join(cmd)}\n{tail}")


def _training_metrics(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    logs = []
    if os.path.isfile(path):
        with open(path) as f:
            logs = [json.loads(line) for line in f if line.strip()]
    if not logs:
        raise UserError(
            f"{run_dir} logged no training metrics: its --max_steps is below `lopt sft`'s --logging_steps; add "
            "--sft_args '--logging_steps N' with N at most the smallest budget."
        )
    curve = [(m["step"], m.get("task_loss", m["loss"])) for m in logs]
    timed = logs[1:] or logs  # the first interval includes start-up
    return {
        "step_time_s": statistics.median(m["step_time_s"] for m in timed),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
        "peak_memory_bytes": max(m["peak_memory_bytes"] for m in logs),
        "final_task_loss": curve[-1][1],
        "curve": curve,
    }


def activation_peak_bytes(base_path: str, name: str, spec: CompareSpec, head: str = "fused") -> int:
    """Bytes saved for backward during one training step of `name` on one batch of the training data.

    head="fused" (default): through TRL's fused LM head (`add_fused_lm_head`, fused_lm_head=True), the loss path
    `lopt sft` trains through, so no [B, T, V] logits; head="hf": the model's own loss, for contrast.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopt.bench import measure_saved_tensor_peak
    from lopt.methods import prepare_model
    from lopt.model import get_lopt_model

    if head not in ("fused", "hf"):
        raise ValueError(f"head must be 'fused' or 'hf', got {head!r}.")
    recipe = _method_flags(name, lr=1.0)
    flags = dict(zip(recipe[::2], recipe[1::2]))
    model = AutoModelForCausalLM.from_pretrained(base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if head == "fused":  # as SFTTrainer does: on the plain model, before PEFT or LoPT wrap it
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    boundary = [int(flags["--boundaries"])] if "--boundaries" in flags else None
    prepared = prepare_model(
        model,
        flags["--method"],
        num_blocks=int(flags.get("--num_blocks", 2)),
        aux_objective=flags.get("--aux_objective", "recon"),
        boundaries=boundary,
    )
    trained = prepared.model
    if prepared.lopt_config is not None:
        trained = get_lopt_model(trained, prepared.lopt_config)
    trained.train()
    batch = _one_batch(tokenizer, spec)
    if head == "fused":
        batch["fused_lm_head"] = True

    def step():
        trained(**batch).loss.backward()

    torch.manual_seed(0)
    return measure_saved_tensor_peak(step)


def _one_batch(tokenizer, spec: CompareSpec) -> dict:
    from lopt.data import load_rows, make_collator, tokenize_rows

    if (task := _task(spec)) is not None:
        from lopt.builtin import builtin_task_rows

        rows = builtin_task_rows("train", n=16, task=task)
    else:
        rows = load_rows(train_file=spec.train_file, max_samples=16)
    dataset = tokenize_rows(rows, tokenizer, max_seq_length=1024)
    features = [dataset[i] for i in range(len(dataset))]
    return dict(make_collator(tokenizer)(features))


def _setup(spec: CompareSpec, base: dict, reused: int, total: int, finished: int) -> dict:
    return {
        "model": base["base_model"],
        **base["facts"],
        "steps": spec.max_steps,
        "seeds": spec.seeds,
        "learning_rates": {name: spec.learning_rates_of(name) for name in spec.methods},
        "sft_args": spec.sft_args,
        "data": spec.train_file or f"built-in task {_task(spec)}",
        "retention_budgets": list(spec.retention_budgets),
        "accuracy_targets": list(spec.accuracy_targets),
        "runs": total,
        "runs_finished": finished,  # fewer than runs when --time_limit stopped the sweep
        "runs_reused": reused,
        "jobs": spec.jobs,
    }


def _aggregate(runs: list[dict], activation: int, before: dict) -> dict:
    """Mean (and std over seeds) of every metric of one (method, lr, steps) point."""
    entry: dict = {
        "activation_peak_bytes": activation,
        "retention_ppl_before": before.get("retention_ppl"),
        "validation_retention_ppl_before": before.get("validation_retention_ppl"),
    }
    for key in METRICS[1:]:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            entry[key] = statistics.fmean(values)
            if len(values) > 1:
                entry[f"{key}_std"] = statistics.stdev(values)
    entry["seeds"] = len(runs)
    entry["per_seed"] = [{k: r.get(k) for k in ("seed", *METRICS[1:])} for r in runs]
    steps = [s for s, _ in runs[0]["curve"]]
    entry["curve"] = [[s, statistics.fmean(r["curve"][i][1] for r in runs)] for i, s in enumerate(steps)]
    return entry


def collect_results(spec: CompareSpec, runs: dict, before: dict, activation: dict, setup: dict) -> dict:
    """results.json: every (method, lr, steps) point, and per method the point chosen on validation."""
    points = []
    for (name, lr, steps), point_runs in runs.items():
        entry = {"method": name, "learning_rate": lr, "max_steps": steps}
        entry.update(_aggregate(point_runs, activation[name], before))
        entry["compute_s"] = entry.get("step_time_s", 0.0) * steps  # median step time x steps
        points.append(entry)
    results = {"setup": setup, "before": before, "points": points}
    chosen = {name: select_on_validation(points_of(results, name)) for name in spec.methods}
    results["methods"] = {name: point for name, point in chosen.items() if point is not None}
    setup["methods_without_runs"] = [name for name, point in chosen.items() if point is None]  # --time_limit
    return results


def points_of(results: dict, name: str) -> list[dict]:
    return [p for p in results["points"] if p["method"] == name]


# --- choices on validation, numbers from test --------------------------------------------------------------------
def rise(point: dict, side: str = "test") -> float | None:
    """Retention-perplexity rise as a fraction of the base model's (0.25 = +25%), on the test or validation side."""
    prefix = "" if side == "test" else "validation_"
    ppl, base = point.get(f"{prefix}retention_ppl"), point.get(f"{prefix}retention_ppl_before")
    return None if ppl is None or not base else (ppl - base) / base


def _validation_rank(point: dict) -> tuple:
    """Higher validation accuracy first; ties go to the smaller validation retention rise."""
    accuracy = point.get("validation_task_accuracy")
    r = rise(point, "validation")
    return (-(accuracy if accuracy is not None else -1.0), r if r is not None else math.inf)


def select_on_validation(points: list[dict]) -> dict | None:
    """The point with the best validation accuracy: no test number takes part in the choice."""
    return min(points, key=_validation_rank) if points else None


def accuracy_at_retention(points: list[dict], budget: float) -> dict | None:
    """Among points whose *validation* retention rise is within budget, the one with the best *validation*
    accuracy; the report states its test accuracy and test rise."""
    fits = [p for p in points if (r := rise(p, "validation")) is not None and r <= budget]
    return select_on_validation(fits)


def retention_at_accuracy(points: list[dict], target: float) -> dict | None:
    """Among points whose *validation* accuracy reaches the target, the one with the smallest *validation*
    retention rise; the report states its test rise and test accuracy."""
    reach = [p for p in points if (p.get("validation_task_accuracy") or 0.0) >= target]
    ranked = [p for p in reach if rise(p, "validation") is not None]
    return min(ranked, key=lambda p: rise(p, "validation")) if ranked else None


def steps_to_accuracy(points: list[dict], target: float) -> dict | None:
    """The point with the fewest steps (then the least compute) whose validation accuracy reaches the target."""
    reach = [p for p in points if (p.get("validation_task_accuracy") or 0.0) >= target]
    return min(reach, key=lambda p: (p["max_steps"], p.get("compute_s", 0.0))) if reach else None


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both test accuracy (higher) and test retention rise (lower), by rise.

    A description of what the runs reached, drawn in the plot; no setting is chosen from it."""
    scored = [p for p in points if p.get("task_accuracy") is not None and rise(p) is not None]
    front, best = [], -1.0
    for p in sorted(scored, key=lambda p: (rise(p), -p["task_accuracy"])):
        if p["task_accuracy"] > best:
            front.append(p)
            best = p["task_accuracy"]
    return front


# --- the report ------------------------------------------------------------------------------------------------
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
    methods = results["methods"]
    e2e = methods.get("e2e") or {}
    setup = results["setup"]
    spread = setup["seeds"] > 1
    steps = setup["steps"] if isinstance(setup["steps"], list) else [setup["steps"]]
    lines = [
        "# lopt compare",
        "",
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
                "**The time limit stopped this sweep before every run**: points show how many seeds they have; "
                "rerun the same command without --time_limit to finish it (finished runs are reused)."
            )
        if setup.get("methods_without_runs"):
            lines.append(f"No run finished for: {', '.join(setup['methods_without_runs'])}.")
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
        act_text = (
            "—"
            if act is None
            else f"{act / 2**20:.1f} ({_fmt_ratio(_ratio(act, e2e.get('activation_peak_bytes')))})"
        )
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
    from lopt.lm_eval_tasks import format_lm_eval_report
    from lopt.world_knowledge import format_world_knowledge_report

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
        "## Targets of issue 11 (chosen on validation, stated on test)",
        "",
        *issue11_targets(results),
        "",
    ]
    return lines


def _lopt_variants(results: dict) -> list[str]:
    """LoPT methods that stand for the engine: lopt_joint has lopt's gradients, so it is not a variant."""
    return [n for n in results["methods"] if _is_lopt(n) and _base_name(n) != "lopt_joint"]


def issue11_targets(results: dict) -> list[str]:
    """Each target of issue 11 as met / MISSED with its numbers. The best LoPT variant at a budget is chosen
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


def _is_lopt(name: str) -> bool:
    return METHOD_FLAGS[_base_name(name)][1].startswith("lopt")


def _fmt_ratio(ratio) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def summarize(results: dict) -> list[str]:
    """Plain statements against the targets of the issue; whatever the numbers are."""
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


def write_plots(results: dict, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    names = list(methods)
    # one colour and marker per method, the same in every plot (the default cycle repeats after 10)
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")  # tab20 pairs near-identical shades
    colors = {name: palette(i % palette.N) for i, name in enumerate(names)}
    markers = {name: "osD^v<>ph*"[i % 10] for i, name in enumerate(names)}

    fig, ax = plt.subplots(figsize=(8.5, 4))
    for name in names:
        steps, losses = zip(*methods[name]["curve"])
        ax.plot(steps, losses, label=name, color=colors[name])
    ax.set(xlabel="step", ylabel="task loss", title="Training task loss (mean over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    _save(fig, output_dir, "loss_curves.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    bars = (
        ("activation_peak_bytes", 2**20, "activation peak (MB)"),
        ("peak_memory_bytes", 2**20, "peak process memory (MB)"),
        ("step_time_s", 1, "median step time (s)"),
    )
    for ax, (key, scale, title) in zip(axes, bars):
        ax.bar(names, [(methods[n].get(key) or 0) / scale for n in names], color=[colors[n] for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    _save(fig, output_dir, "memory_time.png")

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for name in names:
        m = methods[name]
        if m.get("task_accuracy") is None or m.get("retention_ppl") is None:
            continue
        ppl, std = m["retention_ppl"], m.get("retention_ppl_std", 0)
        ax.errorbar(
            100 * m["task_accuracy"],
            ppl,
            xerr=100 * m.get("task_accuracy_std", 0),
            yerr=[[min(std, 0.9 * ppl)], [std]],  # the log axis cannot show a bar below zero
            fmt=markers[name],
            color=colors[name],
            capsize=3,
            label=name,
        )
    before = next((m.get("retention_ppl_before") for m in methods.values()), None)
    if before:
        ax.axhline(before, color="grey", linestyle=":", label="before training")
    ax.set(
        xlabel="task exact match (%), mean ± std over seeds",
        ylabel="retention perplexity (lower = kept more)",
    )
    ax.set_yscale("log")  # a collapsing method can sit orders of magnitude above the rest
    ax.set_title("Accuracy vs retention (each method at its validation-chosen setting)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    _save(fig, output_dir, "accuracy_retention.png")
    if results.get("points"):
        _plot_fronts(results, output_dir, colors, markers)
    from lopt.world_knowledge import plot_knowledge_fronts

    plot_knowledge_fronts(results, colors, markers, lambda fig, name: _save(fig, output_dir, name))


def _plot_fronts(results: dict, output_dir: str, colors: dict, markers: dict) -> None:
    """Test accuracy against test retention rise for every (method, lr, steps) point; each method's front a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    rises = [100 * r for p in results["points"] if (r := rise(p)) is not None]
    for name in results["methods"]:
        points = [
            p for p in points_of(results, name) if p.get("task_accuracy") is not None and rise(p) is not None
        ]
        if not points:
            continue
        ax.scatter(
            [100 * rise(p) for p in points],
            [100 * p["task_accuracy"] for p in points],
            marker=markers[name],
            color=colors[name],
            alpha=0.6,
        )
        front = pareto_front(points)
        ax.plot(
            [100 * rise(p) for p in front],
            [100 * p["task_accuracy"] for p in front],
            marker=markers[name],
            color=colors[name],
            label=name,
        )
    ax.set_ylim(-2, 102)
    if rises:  # room for the markers at both ends of the log-like axis
        ax.set_xlim(min(rises) * 1.5 if min(rises) < 0 else -1, max(max(rises) * 1.5, 20))
    ax.set_xscale("symlog", linthresh=10)  # rises run from a few % to orders of magnitude
    ax.set(
        xlabel="retention perplexity rise over the base model (% of base, test half of the retention texts)",
        ylabel="task exact match on test (%)",
        title="Accuracy vs retention: every (lr, steps) point, each method's front as a line",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    _save(fig, output_dir, "fronts.png")


def _save(fig, output_dir: str, name: str) -> None:
    import matplotlib.pyplot as plt

    path = os.path.join(output_dir, name)
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
