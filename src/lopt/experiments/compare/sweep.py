"""`lopt compare`: the same base model, data, step budgets and seeds under each method; memory, time, task
accuracy and retention side by side, written as results.json, report.md and PNG plots.

A sweep runs every method at every (learning rate, step budget) point. Each run is a `lopt sft` subprocess (so its
peak memory is its own), then its checkpoint is scored on two disjoint sides: validation (task rows and half the
retention texts) for every choice, test (the other rows and half) for every reported number. Finished runs are
reused when compare is run again (resume). The activation peak (bytes saved for backward) is measured per method
on one training batch with the same meter as `lopt bench`.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lopt.errors import UserError
from lopt.experiments.compare.plots import write_plots
from lopt.experiments.compare.report import format_report
from lopt.experiments.compare.runs import (
    RUN_RECORD,
    _checkpoint_complete,
    _evaluation_key,
    _grpo_command,
    _read_json,
    _read_record,
    _rl_training_metrics,
    _sft_command,
    _train,
    _training_metrics,
    activation_peak_bytes,
    evaluate_model,
    evaluation_sets,
    finished_run,
    record_names,
    run_lr,
    run_name,
)
from lopt.experiments.compare.select import (
    accuracy_at_retention,
    points_of,
    retention_at_accuracy,
    select_on_validation,
)
from lopt.experiments.compare.spec import CompareSpec, _memory_name, _task, _world_knowledge_on
from lopt.io import atomic_write_json, atomic_write_text

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
    "reward_first",  # a GRPO run's first and last logged mean reward
    "reward_last",
)


# In --output_dir: the base model's scores, each method's activation peak and the evaluation key (--report_only).
BASE_RECORD = "compare_base.json"


def run_compare(spec: CompareSpec) -> dict:
    import time

    started = time.monotonic()
    os.makedirs(spec.output_dir, exist_ok=True)
    runs: dict[tuple, list[dict]] = {}

    def all_points() -> list[tuple]:
        points = [(name, lr, steps) for name in spec.methods for lr, steps in spec.points_of(name)]
        for point in points:
            runs.setdefault(point, [])
        return points

    if spec.report_only:
        base = _read_base(spec)
        if spec.trainer == "grpo":
            from lopt.experiments.compare.start import read_start

            if base.get("start", {}).get("trained_from") != read_start(spec)["trained_from"]:
                raise UserError(
                    f"{BASE_RECORD} in {spec.output_dir!r} was not written for the GRPO start its runs trained "
                    "from: run the compare there once without --report_only."
                )
        lm_eval = _lm_eval(spec)

        def run_points(jobs: list[tuple]) -> bool:
            """Reads the finished records of these (seed, name, lr, steps) jobs; whether every one was there."""
            found = True
            for seed, name, lr, steps in jobs:
                record = _finished_record(spec, base, seed, name, lr, steps)
                if record is None:
                    found = False
                elif not any(r["seed"] == seed for r in runs[(name, lr, steps)]):
                    runs[(name, lr, steps)].append(record)
            return found

        _add_rates_that_ran(spec, base)
        run_points([(0, *point) for point in all_points()])
        grid_added = _extend_grids(spec, runs, base["before"], all_points, run_points)
        points = all_points()
        run_points([(seed, *point) for seed in range(1, spec.seeds) for point in points])
        reused = sum(map(len, runs.values()))
    else:
        base, scorer = _measure_base(spec)
        lm_eval = scorer.lm_eval
        bar = tqdm(total=spec.seeds * len(all_points()), desc="compare", disable=not spec.progress)
        with _Pool(spec, base["base_model"], scorer) as pool:

            def run_points(jobs: list[tuple]) -> bool:
                """Runs (or reuses) these (seed, name, lr, steps) jobs; whether every one finished (not past
                --time_limit)."""
                jobs = [job for job in jobs if not any(r["seed"] == job[0] for r in runs[tuple(job[1:])])]
                finished = 0
                for point, record in pool.map(jobs, started):
                    runs[point].append(record)
                    finished += 1
                    bar.update()
                return finished == len(jobs)

            # Seed 0 of every point first, then the edges of the grids chosen at an edge, then the other seeds where
            # the report reads first (see _seed_order), so a --time_limit leaves the chosen settings with the most.
            run_points([(0, *point) for point in _first_seed_order(spec, all_points())])
            grid_added = _extend_grids(spec, runs, base["before"], all_points, run_points)
            points = all_points()
            bar.total = spec.seeds * len(points)
            for seed in range(1, spec.seeds):
                run_points([(seed, *point) for point in _seed_order(spec, runs, base["before"], points)])
        bar.close()
        reused = pool.reused
    total = spec.seeds * len(points)

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
    # The reference for activation ratios even where e2e is not among --methods (a screen with its base record
    # copied from a compare that measured e2e): the meter does not depend on the rate.
    results["e2e_activation_peak_bytes"] = base["activation"].get("e2e")
    if spec.trainer == "grpo":  # the common SFT start: where it is, what made it, its scores
        results["start"] = base["start"]
    _mark_grid_edges(spec, results, grid_added, runs)
    from lopt.experiments.compare.world_knowledge import add_world_knowledge

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
    from lopt.evaluation.lm_eval_tasks import CompareLMEval

    return CompareLMEval(
        spec.lm_eval_tasks, spec.base.probe == "corpus", spec.lm_eval_limit, spec.lm_eval_batch_size
    )


def _measure_base(spec: CompareSpec) -> tuple[dict, _Scorer]:
    """Scores the base model and measures each method's activation peak; written to compare_base.json, so the
    report can be rebuilt from the run records alone (--report_only), e.g. after a sweep was killed. A rerun in the
    same folder reuses the base's scores when they were taken on the same model and rows (its evaluation key):
    greedy scoring gives the same numbers, and on a CPU it costs about as much as a training run."""
    import transformers
    from transformers import AutoConfig

    from lopt.data.loading import load_model_and_tokenizer

    model, tokenizer, base_path = load_model_and_tokenizer(spec.model_name_or_path, progress=spec.progress)
    start = None
    if spec.trainer == "grpo":
        from lopt.experiments.compare.start import prepare_start

        start = prepare_start(spec, str(base_path))
    scorer = _Scorer.make(spec, base_path, tokenizer, start)
    path = os.path.join(spec.output_dir, BASE_RECORD)
    previous = _read_json(path) or {}
    same_scoring = (
        previous.get("base_model") == str(base_path)
        and previous.get("evaluation_key") == scorer.evaluation_key
    )
    if same_scoring and "before" in previous:
        before = dict(previous["before"])
        # the base's answers, which each run's knowledge kept reads (cached, or taken now)
        if scorer.world.enabled:
            scorer.world.base_correct(model, tokenizer)
    else:
        before = evaluate_model(_scoring_device(model), tokenizer, scorer.sets)
        before.update(scorer.world.measure_base(model, tokenizer))
    measured = previous.get("activation", {}) if same_scoring else {}
    # The activation meter measures an SFT step on one batch: a GRPO step (generation, the policy loss) is not that.
    activation = {
        name: measured[name] if name in measured else activation_peak_bytes(base_path, name, spec)
        for name in (map(_memory_name, spec.methods) if spec.trainer == "sft" else ())
    }
    del model
    before.update(scorer.lm_eval(base_path))
    if start is not None:
        start = {**start, "scores": _score_start(scorer, start, previous if same_scoring else {})}
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
    if start is not None:
        base["start"] = start
    # Keep what earlier compares measured for other methods (a later --report_only may ask for the union).
    base["activation"] = {**measured, **activation}
    atomic_write_json(path, base)
    return base, scorer


def _score_start(scorer: _Scorer, start: dict, previous: dict) -> dict:
    """The SFT start's scores on both sides (every GRPO run's gain is over these), its knowledge kept against the base,
    and its answers to the probe (each run's knowledge kept against the start reads them); reused from an earlier
    compare in this folder when taken on the same start and rows."""
    from transformers import AutoModelForCausalLM

    model = None
    if previous.get("start", {}).get("trained_from") == start["trained_from"]:
        scores = previous["start"]["scores"]
    else:
        model = _scoring_device(AutoModelForCausalLM.from_pretrained(start["path"]))
        scores = {
            **evaluate_model(model, scorer.tokenizer, scorer.sets),
            **scorer.world(model, scorer.tokenizer),
        }
        scores.update(scorer.lm_eval(start["path"]))
    if scorer.world_start.enabled:
        scorer.world_start.base_correct(
            model, scorer.tokenizer
        )  # cached per checkpoint for the --jobs workers
    return scores


def _read_base(spec: CompareSpec) -> dict:
    base = _read_json(os.path.join(spec.output_dir, BASE_RECORD))
    if base is None:
        raise UserError(
            f"--report_only needs {BASE_RECORD} in {spec.output_dir!r}, written when a compare starts: run compare "
            "there once without --report_only."
        )
    return base


@dataclass
class _Scorer:
    """What training and scoring one run needs; made once per process (the parent, or each --jobs worker)."""

    spec: CompareSpec
    base_path: str
    tokenizer: object
    sets: dict
    lm_eval: object
    world: object  # lopt.experiments.compare.world_knowledge.CompareWorldKnowledge
    evaluation_key: str
    start: (
        dict | None
    )  # a GRPO compare's start (lopt.experiments.compare.start.prepare_start); None in an SFT one
    world_start: object  # the probe against the start: knowledge_kept_vs_start (disabled without a start)

    @property
    def trained_from(self) -> str:
        """What every run trains from, as its records name it: the base, or the start (with its weights' digest)."""
        return self.start["trained_from"] if self.start else self.base_path

    @property
    def start_path(self) -> str | None:
        return self.start["path"] if self.start else None

    @classmethod
    def make(cls, spec: CompareSpec, base_path: str, tokenizer=None, start: dict | None = None) -> _Scorer:
        from transformers import AutoTokenizer

        from lopt.experiments.compare.world_knowledge import CompareWorldKnowledge

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
        world_start = CompareWorldKnowledge(world.enabled and start is not None, start and start["path"])
        return cls(spec, str(base_path), tokenizer, sets, lm_eval, world, key, start, world_start)

    def _where(self, seed: int, name: str, lr: float, steps: int) -> tuple[str, list[str]]:
        """The run's folder and its `lopt sft` (`lopt grpo`) command."""
        run_dir = os.path.join(self.spec.output_dir, "runs", run_name(name, lr, steps, seed))
        return run_dir, _run_command(self.spec, name, lr, steps, seed, self.start_path)

    def finished(self, seed: int, name: str, lr: float, steps: int) -> dict | None:
        """The record of this run if an earlier compare finished it under the same command and evaluation."""
        return finished_run(*self._where(seed, name, lr, steps), self.trained_from, self.evaluation_key)

    def run(self, seed: int, name: str, lr: float, steps: int) -> dict:
        """Trains (unless a complete checkpoint of this command is there) and scores one run; returns its record."""
        from transformers import AutoModelForCausalLM

        run_dir, command = self._where(seed, name, lr, steps)
        # Training is redone unless its checkpoint is complete and made by this command (then only re-scored).
        if not _checkpoint_complete(run_dir, command, self.trained_from):
            _train(command, self.trained_from, run_dir, f"{name} lr {lr:g}, {steps} steps, seed {seed}")
        trained = _scoring_device(AutoModelForCausalLM.from_pretrained(run_dir))
        metrics = _rl_training_metrics if self.spec.trainer == "grpo" else _training_metrics
        record = {
            "command": command,
            "base_model": self.trained_from,
            "evaluation_key": self.evaluation_key,
            **metrics(run_dir),
            **evaluate_model(trained, self.tokenizer, self.sets),
            **self.world(trained, self.tokenizer),
            "seed": seed,
        }
        if self.world_start.enabled:
            record["knowledge_kept_vs_start"] = self.world_start.kept(trained, self.tokenizer)
        del trained
        record.update(self.lm_eval(run_dir))
        atomic_write_json(os.path.join(run_dir, RUN_RECORD), record)  # last: marks the run finished
        return record


def _scoring_device(model):
    """The base model and every trained one are scored on the same device: the GPU when there is one."""
    return model.to("cuda") if torch.cuda.is_available() else model


_WORKER: _Scorer | None = None  # a --jobs worker process's scorer


def _init_worker(spec: CompareSpec, base_path: str, threads: int, start: dict | None) -> None:
    global _WORKER
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the `lopt sft` subprocesses share the cores too
    torch.set_num_threads(threads)
    _WORKER = _Scorer.make(spec, base_path, start=start)


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
                initargs=(spec, str(base_path), threads, scorer.start),
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


def _finished_record(
    spec: CompareSpec, base: dict, seed: int, name: str, lr: float, steps: int
) -> dict | None:
    """The record of a finished run of this point under this compare's command, base model and scoring; else None."""
    record = _read_record(os.path.join(spec.output_dir, "runs", run_name(name, lr, steps, seed)))
    start = base.get("start") if spec.trainer == "grpo" else None
    command = _run_command(spec, name, lr, steps, seed, start and start["path"])
    trained_from = start["trained_from"] if start else base["base_model"]
    named = record is not None and record_names(record, command, trained_from, base["evaluation_key"])
    return record if named else None


def _run_command(
    spec: CompareSpec, name: str, lr: float, steps: int, seed: int, start_path: str | None
) -> list[str]:
    """One run's command: `lopt sft` from the base, or in a GRPO compare `lopt grpo` from the start."""
    if spec.trainer == "grpo":
        return _grpo_command(spec, name, lr, steps, seed, start_path)
    return _sft_command(spec, name, lr, steps, seed)


def _add_rates_that_ran(spec: CompareSpec, base: dict) -> None:
    """--report_only: every rate with a finished seed-0 run of a method's command at one of its budgets joins its
    grid (an extension run by hand or by an earlier compare, a rate added later), so the report reads every rate
    that ran, not only the planned ones."""
    runs_dir = os.path.join(spec.output_dir, "runs")
    folders = os.listdir(runs_dir) if os.path.isdir(runs_dir) else []
    for name in spec.methods:
        found = set()
        for steps in spec.max_steps:
            for folder in folders:
                lr = run_lr(folder, name, steps, 0)
                if lr is not None and _finished_record(spec, base, 0, name, lr, steps) is not None:
                    found.add(lr)
        if found - set(spec.learning_rates_of(name)):
            spec.method_learning_rates[name] = sorted({*spec.learning_rates_of(name), *found})


def _extend_grids(
    spec: CompareSpec, runs: dict, before: dict, all_points, run_points
) -> dict[str, list[float]]:
    """`lopt.experiments.compare.grid.extend_grids` over seed 0's runs: a new rate's points run (or are read) here."""
    from lopt.experiments.compare.grid import extend_grids

    def first_seed_points(name: str) -> list[dict] | None:
        mine = [point for point in all_points() if point[0] == name]
        if not run_points([(0, *point) for point in mine]):
            return None
        return [
            {
                "method": name,
                "learning_rate": lr,
                "max_steps": steps,
                **_aggregate(runs[(name, lr, steps)][:1], 0, before),
            }
            for name, lr, steps in mine
        ]

    return extend_grids(spec, first_seed_points) if spec.extend_grid else {}


def _mark_grid_edges(spec: CompareSpec, results: dict, added: dict[str, list[float]], runs: dict) -> None:
    """Per chosen method: the rates it ran at (its grid), the planned rates with no finished run (a --time_limit or a
    --report_only over part of a sweep), the rates compare added, and "grid_edge" ("low"/"high") when its choice is
    still at an edge of the rates that ran (or "one rate" when only one ran: nothing was tuned)."""
    from lopt.experiments.compare.grid import grid_edge

    for name, point in results["methods"].items():
        planned = spec.learning_rates_of(name)
        ran = {lr for (method, lr, steps) in runs if method == name and steps == point["max_steps"]}
        grid = [lr for lr in planned if lr in ran]
        point["grid"] = grid
        point["grid_not_run"] = [lr for lr in planned if lr not in ran]
        point["grid_added"] = added.get(name, [])
        point["grid_edge"] = "one rate" if len(grid) < 2 else grid_edge(grid, point["learning_rate"])
    results["setup"]["extend_grid"] = spec.extend_grid


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


# --- results.json: every point's mean over seeds, each method's point chosen on validation ----------------------
def _setup(spec: CompareSpec, base: dict, reused: int, total: int, finished: int) -> dict:
    return {
        "model": base["base_model"],
        **base["facts"],
        "steps": spec.max_steps,
        "seeds": spec.seeds,
        "learning_rates": {name: spec.learning_rates_of(name) for name in spec.methods},
        "sft_args": spec.sft_args,
        "trainer": spec.trainer,
        "grpo_args": spec.grpo_args,
        "data": spec.train_file or f"built-in task {_task(spec)}",
        "retention_budgets": list(spec.retention_budgets),
        "accuracy_targets": list(spec.accuracy_targets),
        "runs": total,
        "runs_finished": finished,  # fewer than runs when --time_limit stopped the sweep
        "runs_reused": reused,
        "jobs": spec.jobs,
        "command": spec.command,
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
    # A GRPO run's rewards only where it logged them (an SFT compare's records keep their shape).
    entry["per_seed"] = [
        {k: r.get(k) for k in ("seed", *METRICS[1:]) if not k.startswith("reward_") or k in r} for r in runs
    ]
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
