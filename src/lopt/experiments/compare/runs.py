"""One run of a compare: its folder and `lopt sft` command, training it in a subprocess, reusing it when an earlier
compare finished it (resume), scoring a model on the validation and the test side, and a method's activation peak on
one training batch.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch

from lopt.builtin.bases import BUILTIN
from lopt.errors import UserError
from lopt.experiments.compare.spec import CompareSpec, _method_flags, _task
from lopt.io import atomic_write_json

RUN_RECORD = "compare_run.json"  # written last in a run folder: training metrics and scores of a finished run
COMMAND_MARKER = "compare_command.json"  # written first: the `lopt sft` command and base model of the run


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            return None


def run_name(name: str, lr: float, steps: int, seed: int) -> str:
    return f"{name}-lr{lr:g}-steps{steps}-seed{seed}"


def run_lr(folder: str, name: str, steps: int, seed: int) -> float | None:
    """The lr of a folder `run_name` named for this method, budget and seed; None for any other folder."""
    prefix, suffix = f"{name}-lr", f"-steps{steps}-seed{seed}"
    if not (folder.startswith(prefix) and folder.endswith(suffix)):
        return None
    try:
        return float(folder[len(prefix) : -len(suffix)])
    except ValueError:
        return None


# --- resume: a run folder is reused only when it is complete and made by the same command ----------------------
def finished_run(run_dir: str, command: list[str], base_path: str, evaluation_key: str) -> dict | None:
    """The run's record if it finished under exactly this command, base model and evaluation; else None."""
    record = _read_record(run_dir)
    if record is None or record.get("evaluation_key") != evaluation_key:
        return None
    if _checkpoint_complete(run_dir, command, base_path):
        return record
    # A folder holding only the record (scripts/keep_evidence.sh keeps no checkpoint) is reused when the record names
    # this command and base model: its scores are this run's on these rows; only re-scoring other rows needs weights.
    kept_alone = os.listdir(run_dir) == [RUN_RECORD]
    return record if kept_alone and record_names(record, command, base_path, evaluation_key) else None


def record_names(record: dict, command: list[str], base_path: str, evaluation_key: str) -> bool:
    """Whether a run record is of this `lopt sft` command and base model, scored under this evaluation."""
    found = (record.get("command"), record.get("base_model"), record.get("evaluation_key"))
    return found == (command, base_path, evaluation_key)


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
    English prose (lopt.evaluation.world_knowledge.prose_texts).
    """
    from lopt.evaluation.evaluate import read_retention_file

    if (task := _task(spec)) is not None:
        from lopt.builtin.base import retention_texts
        from lopt.builtin.tasks import builtin_task_rows, task_max_new_tokens, task_scorer

        scoring = (task_scorer(task), task_max_new_tokens(task))
        validation = (builtin_task_rows("validation", n=spec.eval_samples, task=task), *scoring)
        test = (builtin_task_rows("test", n=spec.eval_samples, task=task), *scoring)
        if spec.retention_file:
            retention = read_retention_file(spec.retention_file)
        elif spec.base.retention == "corpus":
            retention = retention_texts()
        else:
            from lopt.evaluation.world_knowledge import prose_texts

            retention = prose_texts()
    else:
        from lopt.data.rows import load_rows

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
    from lopt.evaluation.evaluate import evaluate_checkpoint, perplexity

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


# --- training: one `lopt sft` subprocess per run, its metrics, a method's activation peak -----------------------
def _sft_command(spec: CompareSpec, name: str, lr: float, steps: int, seed: int) -> list[str]:
    """The `lopt sft` arguments of one run (all but --output_dir, so an output folder can be moved)."""
    cmd = ["sft", *_method_flags(name, lr), "--learning_rate", f"{lr:.10g}", "--seed", str(seed)]
    cmd += ["--max_steps", str(steps), "--eval_samples", "0", "--no_progress"]
    if spec.train_file is not None:
        data = ["--train_file", spec.train_file]
    else:  # the built-in model by default keeps `lopt sft`'s own default; any model named names its task
        data = ["--task", _task(spec)] if spec.task is not None or spec.base is not BUILTIN else []
    if spec.base is not BUILTIN:
        cmd += ["--model_name_or_path", spec.model_name_or_path]
    return cmd + data + spec.sft_args


def _grpo_command(spec: CompareSpec, name: str, lr: float, steps: int, seed: int, start: str) -> list[str]:
    """The `lopt grpo` arguments of one run of a GRPO compare, from the common SFT checkpoint `start` (lopt grpo reads
    the task from its records)."""
    cmd = ["grpo", "--model_name_or_path", start, *_method_flags(name, lr), "--learning_rate", f"{lr:.10g}"]
    cmd += ["--seed", str(seed), "--max_steps", str(steps), "--eval_samples", "0", "--no_progress"]
    return cmd + spec.grpo_args


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


def _rl_training_metrics(run_dir: str) -> dict:
    """A `lopt grpo` run's metrics: median step time (the whole step: generation, the reward, the update), median
    tokens/s, the process's peak memory (generation included), and its reward curve (the mean reward of each logged
    window) with the first and last logged reward."""
    path = os.path.join(run_dir, "metrics.jsonl")
    logs = []
    if os.path.isfile(path):
        with open(path) as f:
            logs = [json.loads(line) for line in f if line.strip()]
    logs = [m for m in logs if isinstance(m.get("reward"), (int, float))]
    if not logs:
        raise UserError(
            f"{run_dir} logged no reward: its --max_steps is below `lopt grpo`'s --logging_steps; add "
            "--grpo_args '--logging_steps N' with N at most the smallest budget."
        )
    timed = logs[1:] or logs  # the first interval includes start-up
    return {
        "step_time_s": statistics.median(m["step_time_s"] for m in timed),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
        "peak_memory_bytes": max(m["peak_memory_bytes"] for m in logs),
        "reward_first": logs[0]["reward"],
        "reward_last": logs[-1]["reward"],
        "curve": [(m["step"], m["reward"]) for m in logs],
    }


def activation_peak_bytes(base_path: str, name: str, spec: CompareSpec, head: str = "fused") -> int:
    """Bytes saved for backward during one training step of `name` on one batch of the training data.

    head="fused" (default): through TRL's fused LM head (`add_fused_lm_head`, fused_lm_head=True), the loss path
    `lopt sft` trains through, so no [B, T, V] logits; head="hf": the model's own loss, for contrast.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopt.engine.model import get_lopt_model
    from lopt.experiments.meter import measure_saved_tensor_peak
    from lopt.training.methods import prepare_model

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
        untie_embeddings=flags.get("--untie_embeddings") == "true",
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
    from lopt.data.rows import load_rows, make_collator, tokenize_rows

    if (task := _task(spec)) is not None:
        from lopt.builtin.tasks import builtin_task_rows

        rows = builtin_task_rows("train", n=16, task=task)
    else:
        rows = load_rows(train_file=spec.train_file, max_samples=16)
    dataset = tokenize_rows(rows, tokenizer, max_seq_length=1024)
    features = [dataset[i] for i in range(len(dataset))]
    return dict(make_collator(tokenizer)(features))
