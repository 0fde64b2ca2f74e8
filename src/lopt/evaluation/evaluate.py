"""Evaluation: task accuracy (greedy generation, exact match) and retention (perplexity on held-out text)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lopt.builtin.bases import Base


@dataclass(frozen=True)
class Score:
    """`correct` of `n` items right, for the end-of-run line (the records keep the share alone)."""

    correct: int
    n: int

    @property
    def share(self) -> float:
        return self.correct / max(self.n, 1)


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


@torch.no_grad()
def task_accuracy(
    model: nn.Module,
    tokenizer,
    prompt_ids: list[list[int]],
    answers: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    match: Callable[[str, str], bool] | None = None,
    progress: bool = False,
    desc: str = "eval: generate",
) -> dict:
    """Greedy generation from each prompt's token ids (encoded exactly as in training, `lopt.data.rows.encode_prompt`);
    exact match after normalisation. Returns {"accuracy", "correct", "n", "examples": the first few predictions}.
    `progress`: a bar of the rows generated, advanced batch by batch, labelled `desc`."""
    match = match or (lambda prediction, answer: _normalize(prediction) == _normalize(answer))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct, examples = 0, []
    bar = tqdm(total=len(prompt_ids), desc=desc, unit="row", disable=not progress)
    try:
        for start in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            # Left padding: generation continues from the right end of every row.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device
            )
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for prediction, answer in zip(texts, answers[start : start + batch_size]):
                ok = bool(match(prediction, answer))
                correct += ok
                if len(examples) < 5:
                    examples.append({"prediction": prediction, "answer": answer, "correct": ok})
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return {
        "accuracy": correct / max(len(prompt_ids), 1),
        "correct": correct,
        "n": len(prompt_ids),
        "examples": examples,
    }


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 8
) -> float:
    """Token-level perplexity over the concatenated texts, cut into non-overlapping windows of seq_len tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)] or [ids]
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(windows), batch_size):
            batch = torch.tensor(windows[start : start + batch_size], device=device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / max(total_tokens, 1))


@dataclass(frozen=True)
class ScoringDefaults:
    """What `lopt eval` scores a model on when no data flags are given, and why: `task` a built-in task (None: no
    task can be named, e.g. a model trained on the user's own rows); `base` the base the model is or descends from
    (lopt.builtin.bases.base_of: its retention text, its probe); `reason` one line."""

    task: str | None
    base: Base
    reason: str


def scoring_defaults(model_name_or_path: str | None, _depth: int = 0) -> ScoringDefaults:
    """The task and base of `model_name_or_path`: the built-in model, a real base (short name or converted folder),
    or a checkpoint, read from its own records (the model it was trained from, followed back, and its task)."""
    import json
    import os

    from lopt.builtin.bases import BUILTIN, RUN_RECORDS, base_of
    from lopt.builtin.tasks import BUILTIN_TASKS

    base = base_of(model_name_or_path)
    if base.copy_of_builtin:
        return ScoringDefaults(BUILTIN.default_task, base, f"{model_name_or_path} is the built-in model")
    if base.kind != "user" and not base.checkpoint:  # a base itself: its default task
        what = {"builtin": "the built-in model", "real": "a real base"}[base.kind]
        return ScoringDefaults(
            base.default_task, base, what if base is BUILTIN else f"{model_name_or_path} is {what}"
        )
    folder = os.path.expanduser(model_name_or_path)
    records_path = os.path.join(folder, RUN_RECORDS)
    if not os.path.isfile(records_path):
        kind = "a folder" if os.path.isdir(folder) else "not a local folder"
        return ScoringDefaults(
            None,
            base,
            f"{model_name_or_path} has no {RUN_RECORDS} ({kind}, not written by lopt): no task is known",
        )
    with open(records_path) as f:
        records = json.load(f)
    parent = records.get("model_name_or_path")
    parent_task = scoring_defaults(parent, _depth + 1).task if _depth < 8 else None
    source = f"{RUN_RECORDS}: trained from {parent or 'the built-in model'}"
    task = records.get("task")
    if task is None and not (records.get("train_file") or records.get("dataset_name")):
        task = parent_task  # the default task of the model it was trained from
    if task not in BUILTIN_TASKS:  # the user's rows, or a hub task (GRPO)
        what = records.get("train_file") or records.get("dataset_name") or task
        return ScoringDefaults(None, base, f"{source} on {what}, not a built-in task")
    return ScoringDefaults(task, base, f"{source}, task {task}")


def load_task_rows(
    train_file, dataset_name, dataset_config, split: str, max_samples: int | None, task: str | None = None
):
    """Held-out task rows and their match function: a built-in task's test split (default: the built-in model's
    task) unless data flags are given."""
    if train_file is None and dataset_name is None:
        from lopt.builtin.tasks import DEFAULT_TASK, builtin_task_rows, task_scorer

        task = task or DEFAULT_TASK
        return builtin_task_rows("test", n=max_samples, task=task), task_scorer(task)
    from lopt.data.rows import load_rows

    rows = load_rows(train_file, dataset_name, dataset_config, split=split, max_samples=max_samples)
    return rows, None


def read_retention_file(path: str) -> list[str]:
    """Plain text, documents separated by blank lines."""
    import os

    from lopt.errors import DataError

    if not os.path.isfile(path):
        raise DataError(f"--retention_file {path!r} does not exist: give a plain-text file.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise DataError(f"--retention_file {path!r} is empty.")
    return docs


def rows_accuracy(
    model,
    tokenizer,
    rows: list[dict],
    match=None,
    max_new_tokens: int = 32,
    progress: bool = False,
    desc: str = "eval: generate",
) -> dict:
    """`task_accuracy` of rows in any `lopt.data` format, each prompt encoded as in training."""
    from lopt.data.rows import encode_prompt, to_prompt_completion

    pairs = [to_prompt_completion(row, i) for i, row in enumerate(rows)]
    prompt_ids = [encode_prompt(p.prompt, tokenizer) for p in pairs]
    answers = [p.completion for p in pairs]
    return task_accuracy(
        model,
        tokenizer,
        prompt_ids,
        answers,
        max_new_tokens=max_new_tokens,
        match=match,
        progress=progress,
        desc=desc,
    )


def evaluate_checkpoint(
    model,
    tokenizer,
    rows: list[dict] | None,
    retention: list[str] | None,
    match=None,
    max_new_tokens: int = 32,
    retention_seq_len: int = 256,
    progress: bool = False,
) -> dict:
    """{"task_accuracy", "task_n", "examples", "retention_ppl"} for rows in any `lopt.data` format (None: no task
    scored, its fields None)."""
    result = {"task_accuracy": None, "task_n": 0, "examples": []}
    if rows is not None:
        task = rows_accuracy(model, tokenizer, rows, match, max_new_tokens, progress)
        result = {"task_accuracy": task["accuracy"], "task_n": task["n"], "examples": task["examples"]}
    result["retention_ppl"] = (
        perplexity(model, tokenizer, retention, seq_len=retention_seq_len) if retention is not None else None
    )
    return result


def builtin_task_score(model, tokenizer, n: int, task: str | None = None, progress: bool = False) -> Score:
    """Held-out accuracy of a built-in task on its first n test rows (greedy, scored by the task's scorer), with a
    progress bar of the rows generated when `progress`."""
    from lopt.builtin.tasks import DEFAULT_TASK, builtin_task_rows, task_max_new_tokens, task_scorer

    task = task or DEFAULT_TASK
    rows = builtin_task_rows("test", n=n, task=task)
    result = rows_accuracy(
        model, tokenizer, rows, task_scorer(task), task_max_new_tokens(task), progress, "scoring: test rows"
    )
    return Score(result["correct"], result["n"])


# --- the end of a training run ---------------------------------------------------------------------------------
# A run's summary.json fields that its last line states, with their labels: the shares as percentages, with the
# counts when the value is a Score.
SUMMARY_SHARES = {"heldout_exact_match": "test accuracy", "knowledge_kept": "knowledge kept"}


def summary_record(summary: dict) -> dict:
    """The summary as summary.json keeps it: each Score as its share (a float), the rest as it is."""
    return {key: value.share if isinstance(value, Score) else value for key, value in summary.items()}


def summary_line(summary: dict) -> str:
    """One readable line of a run's summary, e.g. "test accuracy 94.0% (188/200) · knowledge kept 87.0% (181/208) ·
    40 steps"; every field stays in summary.json. The training loss is left out: under LoPT it is the whole
    objective (the task plus the local losses), which reads as a task loss it is not."""

    def share(value) -> str:
        if isinstance(value, Score):
            return f"{100 * value.share:.1f}% ({value.correct}/{value.n})"
        return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else str(value)

    def number(value) -> str:
        return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)

    parts = [f"{label} {share(summary[key])}" for key, label in SUMMARY_SHARES.items() if key in summary]
    if "reward_first_log" in summary:
        parts.append(f"reward {number(summary['reward_first_log'])} -> {number(summary['reward_last_log'])}")
    if "reward_accuracy_last_log" in summary:
        parts.append(f"reward accuracy {share(summary['reward_accuracy_last_log'])} (last log)")
    if "steps" in summary:
        parts.append(f"{summary['steps']} step" + ("" if summary["steps"] == 1 else "s"))
    return " · ".join(parts)
