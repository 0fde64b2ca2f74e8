"""`lopt compare`: the same base model, data, step budget and seeds under each method; memory, time, task
accuracy and retention side by side, written as results.json, report.md and PNG plots.

Each training run is a `lopt sft` subprocess (so its peak memory is its own) followed by an in-process evaluation
of the checkpoint it wrote. The activation peak (bytes saved for backward) is measured per method on one training
batch with the same meter as `lopt bench`.
"""

from __future__ import annotations

import json
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
)


@dataclass
class CompareSpec:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: int = 3
    max_steps: int = 300
    eval_samples: int = 300
    model_name_or_path: str | None = None  # None: the built-in model and task
    train_file: str | None = None
    eval_file: str | None = None
    retention_file: str | None = None
    sft_args: list[str] = field(
        default_factory=list
    )  # any other `lopt sft` flags, identical for every method
    output_dir: str = "runs/compare"
    progress: bool = True
    lr_k1_ratios: list[float] | None = None  # adds "lopt@r" for each ratio r != 1 (the learning-rate study)
    # lm-evaluation-harness tasks scored before and after every run (lopt.lm_eval_tasks.CompareLMEval)
    lm_eval_tasks: str | None = None
    lm_eval_limit: float | None = None
    lm_eval_batch_size: int | str = 16

    def __post_init__(self):
        unknown = [m for m in self.methods if _base_name(m) not in METHOD_FLAGS]
        if unknown:
            raise UserError(
                f"--methods {unknown} unknown; choose from {', '.join(METHOD_FLAGS)} (optionally name@lr_k1_ratio)."
            )
        for name in self.methods:
            _lr_k1_ratio(name)  # validates the "@r" suffix
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
        if self.seeds < 1 or self.max_steps < 1:
            raise UserError("--seeds and --max_steps must be >= 1.")
        if self.model_name_or_path is not None and self.train_file is None:
            raise UserError("a user model needs --train_file (the built-in task is for the built-in model).")


def run_compare(spec: CompareSpec) -> dict:
    from lopt.evaluate import evaluate_checkpoint, load_task_rows, read_retention_file
    from lopt.lm_eval_tasks import CompareLMEval
    from lopt.loading import load_model_and_tokenizer

    os.makedirs(spec.output_dir, exist_ok=True)
    builtin = spec.model_name_or_path is None
    lm_eval = CompareLMEval(spec.lm_eval_tasks, builtin, spec.lm_eval_limit, spec.lm_eval_batch_size)
    model, tokenizer, base_path = load_model_and_tokenizer(spec.model_name_or_path, progress=spec.progress)
    eval_rows, match = (
        load_task_rows(None, None, None, "test", spec.eval_samples)
        if builtin
        else (
            load_task_rows(spec.eval_file, None, None, "test", spec.eval_samples)
            if spec.eval_file
            else (None, None)
        )
    )
    if spec.retention_file:
        retention = read_retention_file(spec.retention_file)
    elif builtin:
        from lopt.builtin import retention_texts

        retention = retention_texts()
    else:
        retention = None
    evaluate = _evaluator(tokenizer, eval_rows, match, retention, evaluate_checkpoint)
    before = evaluate(model)
    by_base = {base: activation_peak_bytes(base_path, base, spec) for base in map(_base_name, spec.methods)}
    activation = {name: by_base[_base_name(name)] for name in spec.methods}  # an lr does not change memory
    del model
    before.update(lm_eval(base_path))

    runs: dict[str, list[dict]] = {name: [] for name in spec.methods}
    jobs = [(seed, name) for seed in range(spec.seeds) for name in spec.methods]
    bar = tqdm(jobs, desc="compare", disable=not spec.progress)
    for seed, name in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        run_dir = os.path.join(spec.output_dir, "runs", f"{name}-seed{seed}")
        _train(spec, name, seed, run_dir)
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(run_dir)
        runs[name].append(
            {**_training_metrics(run_dir), **evaluate(trained), **lm_eval(run_dir), "seed": seed}
        )
        del trained

    results = {
        "setup": _setup(base_path, spec, tokenizer),
        "before": before,
        "methods": {
            name: _aggregate(runs[name], activation[name], before.get("retention_ppl"))
            for name in spec.methods
        },
    }
    lm_eval.add_summaries(results, runs)
    atomic_write_json(os.path.join(spec.output_dir, "results.json"), results)
    atomic_write_text(os.path.join(spec.output_dir, "report.md"), format_report(results))
    write_plots(results, spec.output_dir)
    return results


def _evaluator(tokenizer, eval_rows, match, retention, evaluate_checkpoint):
    def evaluate(model) -> dict:
        model.eval()
        result = {}
        if eval_rows is not None:
            scored = evaluate_checkpoint(model, tokenizer, eval_rows, retention, match=match)
            result["task_accuracy"] = scored["task_accuracy"]
            result["retention_ppl"] = scored["retention_ppl"]
        elif retention is not None:
            from lopt.evaluate import perplexity

            result["retention_ppl"] = perplexity(model, tokenizer, retention)
        return result

    return evaluate


def _base_name(name: str) -> str:
    return name.split("@", 1)[0]


def _lr_k1_ratio(name: str) -> float | None:
    """The r of "method@r", None without a suffix."""
    if "@" not in name:
        return None
    text = name.split("@", 1)[1]
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not ratio > 0 or not METHOD_FLAGS[_base_name(name)][1].startswith("lopt"):
        raise UserError(f"--methods {name!r}: '@r' takes a ratio r > 0 and applies to LoPT methods only.")
    return ratio


def _method_flags(spec: CompareSpec, name: str) -> list[str]:
    flags = list(METHOD_FLAGS[_base_name(name)])
    if _is_lopt(name):  # always explicit, so a name means the same recipe whatever `lopt sft`'s default is
        ratio = _lr_k1_ratio(name) or 1.0
        flags += ["--lr_k1", f"{ratio * _learning_rate(spec):g}"]
    return flags


def _learning_rate(spec: CompareSpec) -> float:
    """The lr every run trains with: --learning_rate in sft_args, else `lopt sft`'s default for this model."""
    import argparse

    from lopt.arguments import sft_learning_rate

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--learning_rate", type=float, default=None)
    known, _ = parser.parse_known_args(spec.sft_args)
    if known.learning_rate is not None:
        return known.learning_rate
    return sft_learning_rate(builtin_model=spec.model_name_or_path is None)


def _train(spec: CompareSpec, name: str, seed: int, run_dir: str) -> None:
    cmd = [sys.executable, "-m", "lopt", "sft", *_method_flags(spec, name), "--seed", str(seed)]
    cmd += [
        "--max_steps",
        str(spec.max_steps),
        "--output_dir",
        run_dir,
        "--eval_samples",
        "0",
        "--no_progress",
    ]
    if spec.model_name_or_path is not None:
        cmd += ["--model_name_or_path", spec.model_name_or_path, "--train_file", spec.train_file]
    cmd += spec.sft_args
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"training {name} (seed {seed}) failed: {' '.join(cmd)}\n{tail}")


def _training_metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f]
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
    flags = dict(zip(METHOD_FLAGS[name][::2], METHOD_FLAGS[name][1::2]))
    model = AutoModelForCausalLM.from_pretrained(base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if head == "fused":  # as SFTTrainer does: on the plain model, before PEFT or LoPT wrap it
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    prepared = prepare_model(
        model,
        flags["--method"],
        num_blocks=int(flags.get("--num_blocks", 2)),
        aux_objective=flags.get("--aux_objective", "recon"),
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

    if spec.model_name_or_path is None:
        from lopt.builtin import builtin_task_rows

        rows = builtin_task_rows("train", n=16)
    else:
        rows = load_rows(train_file=spec.train_file, max_samples=16)
    dataset = tokenize_rows(rows, tokenizer, max_seq_length=1024)
    features = [dataset[i] for i in range(len(dataset))]
    return dict(make_collator(tokenizer)(features))


def _setup(base_path: str, spec: CompareSpec, tokenizer) -> dict:
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path)
    return {
        "model": base_path,
        "vocab_size": len(tokenizer),
        "num_layers": config.num_hidden_layers,
        "steps": spec.max_steps,
        "seeds": spec.seeds,
        "sft_args": spec.sft_args,
        "data": spec.train_file or "built-in task",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def _aggregate(runs: list[dict], activation: int, retention_before: float | None) -> dict:
    entry: dict = {"activation_peak_bytes": activation, "retention_ppl_before": retention_before}
    for key in METRICS[1:]:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            entry[key] = statistics.fmean(values)
            if len(values) > 1:
                entry[f"{key}_std"] = statistics.stdev(values)
    if len(runs) > 1:
        entry["per_seed"] = [{k: v for k, v in r.items() if k != "curve"} for r in runs]
    steps = [s for s, _ in runs[0]["curve"]]
    entry["curve"] = [[s, statistics.fmean(r["curve"][i][1] for r in runs)] for i, s in enumerate(steps)]
    return entry


# --- the report ------------------------------------------------------------------------------------------------
def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def format_report(results: dict) -> str:
    methods = results["methods"]
    e2e = methods.get("e2e", {})
    setup = results["setup"]
    spread = setup["seeds"] > 1
    lines = [
        "# lopt compare",
        "",
        f"Model `{setup['model']}` ({setup['num_layers']} layers, vocab {setup['vocab_size']}), data: "
        f"{setup['data']}, {setup['steps']} steps, {setup['seeds']} seed(s), {setup['device']}, torch "
        f"{setup['torch']}, transformers {setup['transformers']}.",
        "",
        "| method | act. peak MB (x e2e) | peak mem MB | step s (x e2e) | tokens/s | task acc | retention ppl "
        "(before → after) | ppl rise (x e2e) | final task loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        act = m["activation_peak_bytes"] / 2**20
        act_ratio = _ratio(m["activation_peak_bytes"], e2e.get("activation_peak_bytes"))
        time_ratio = _ratio(m.get("step_time_s"), e2e.get("step_time_s"))
        acc = m.get("task_accuracy")
        acc_text = (
            "—"
            if acc is None
            else f"{100 * acc:.1f}%" + (f" ± {100 * m['task_accuracy_std']:.1f}" if spread else "")
        )
        ppl = m.get("retention_ppl")
        ppl_text = "—" if ppl is None else f"{m['retention_ppl_before']:.1f} → {ppl:.1f}"
        if spread and ppl is not None:
            ppl_text += f" ± {m['retention_ppl_std']:.1f}"
        rise_text = "—"
        if ppl is not None and e2e.get("retention_ppl") is not None:
            rise = ppl - m["retention_ppl_before"]
            rise_ratio = _ratio(rise, e2e["retention_ppl"] - m["retention_ppl_before"])
            rise_text = f"{rise:+.1f} ({_fmt_ratio(rise_ratio)})"
        lines.append(
            f"| {name} | {act:.1f} ({_fmt_ratio(act_ratio)}) | {m.get('peak_memory_bytes', 0) / 2**20:.0f} | "
            f"{m.get('step_time_s', float('nan')):.3f} ({_fmt_ratio(time_ratio)}) | "
            f"{m.get('tokens_per_s', float('nan')):.0f} | {acc_text} | {ppl_text} | {rise_text} | "
            f"{m.get('final_task_loss', float('nan')):.3f} |"
        )
    from lopt.lm_eval_tasks import format_lm_eval_report

    lines += ["", *format_lm_eval_report(results)]
    lines += ["", "## What the numbers show", "", *summarize(results), ""]
    lines += [
        "Activation peak: bytes saved for backward during one training step on one batch (same meter as `lopt "
        "bench`; full-logits LM head for every method). Peak memory: the training process's peak RSS (CPU) or "
        "max allocated (GPU). Step time and tokens/s: medians over logging intervals.",
        "",
        "![loss curves](loss_curves.png) ![memory and time](memory_time.png) "
        "![accuracy vs retention](accuracy_retention.png)",
        "",
    ]
    return "\n".join(lines)


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
        if name in methods:
            r = methods[name]["activation_peak_bytes"] / e2e["activation_peak_bytes"]
            out.append(f"- {name} activation peak is {r:.2f}x e2e (target ≤ {limit}): {check(r <= limit)}.")
    if "lopt_joint" in methods:
        r = methods["lopt_joint"]["activation_peak_bytes"] / e2e["activation_peak_bytes"]
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
    if results["setup"]["seeds"] < 3:
        out.append("- Fewer than 3 seeds: accuracy and retention differences are not reliable.")
    return out


def write_plots(results: dict, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    names = list(methods)
    # one colour and marker per method, the same in every plot (the default cycle repeats after 10)
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
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
        ax.bar(names, [methods[n].get(key, 0) / scale for n in names], color=[colors[n] for n in names])
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
    ax.set_title("Accuracy vs retention")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    _save(fig, output_dir, "accuracy_retention.png")


def _save(fig, output_dir: str, name: str) -> None:
    import matplotlib.pyplot as plt

    path = os.path.join(output_dir, name)
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
