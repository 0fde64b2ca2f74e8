"""The built-in tasks of the built-in base (`BUILTIN_TASKS`: successor, modules), with fixed train / validation / test
splits, their exact-match metric and their GRPO and DPO views.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re

__all__ = [
    "BUILTIN_TASKS",
    "builtin_task_rows",
    "exact_match",
    "normalize_answer",
    "task_answer",
    "task_max_new_tokens",
    "task_scorer",
]


# --------------------------------------------------------------------------------------
# Built-in narrow task
# --------------------------------------------------------------------------------------

# Built-in tasks.  Each has disjoint train / validation / test splits, fixed once and for all
# by stable hashes: choices (learning rates, settings) are made on validation and reported on
# test, so nothing is selected on the numbers it reports.
#
# "successor": "What number comes after N?" -> "N+1" for N in 0..999.  A new skill: chosen
# because the built-in model learns it well but not trivially under plain end-to-end
# fine-tuning; the carries (199 -> 200) and the rarer one- and two-digit numbers keep it from
# being solved perfectly in a few hundred steps.
TASK_NAME = "successor"
DEFAULT_TASK = TASK_NAME
TASK_MAX_N = 999
_TASK_TEST_PERCENT = 20
_TASK_VALIDATION_PERCENT = 10  # of the problems that are not test
_TASK_PROMPT = "What number comes after {n}?"
TASK_SPLITS = ("train", "validation", "test")

# "modules": "<first sentence of a docstring>\nWhich module defines the method Class.name?" -> "module" (or "the
# function NAME" / "the class NAME").  Narrow supervision over facts of the corpus the model was pretrained on
# (lopt.builtin.knowledge): two thirds of the items are methods, split by item, so most validation and test questions ask
# about a class whose other methods are in the training split (a lookup of the class's module from the training rows
# scores 68% on validation).  It measures learning new associations, not recall of pretraining.  Only the "sft"
# facts are used; the "probe" facts are held out for retention.
MODULES_TASK = "modules"

# "extract": a one-sentence order -> a JSON object (lopt.builtin.real_task), in chat format with the required format stated in
# a system message: the task for real pretrained bases (lopt.builtin.hub_bases), and the one they train on by default.  Unlike
# the two above it is not made for the built-in model: any model with a chat template can train on it.
EXTRACT_TASK = "extract"
# "totals": a short order note of 2 or 3 lines (quantity, item, unit price) -> {"customer", "items"} (lopt.builtin.totals_task):
# extract's format and scorer, with a sum instead of normalisation.
TOTALS_TASK = "totals"
BUILTIN_MODEL_TASKS = (TASK_NAME, MODULES_TASK)
# The chat tasks for real bases (any chat model may train on them): JSON answers, json_match, their own recipes.
REAL_BASE_TASKS = (EXTRACT_TASK, TOTALS_TASK)

# name -> one line for --help and reports.  Every task is scored by greedy generation + its scorer (task_scorer).
BUILTIN_TASKS: dict[str, str] = {
    TASK_NAME: "What number comes after N? (a new skill; N = 0..999)",
    MODULES_TASK: "Which standard-library module defines NAME (a function, class or method), given its docstring's "
    "first sentence? (learning associations over the pretraining corpus)",
    EXTRACT_TASK: "An order sentence -> a JSON object of customer, item, quantity and date, scored as exact JSON "
    "(chat format; the default task of real bases such as smollm2-135m)",
    TOTALS_TASK: "An order note of 2-3 lines (quantity, item, unit price) -> a JSON object of customer and item count, "
    "scored as exact JSON (chat format, for real bases)",
}


def task_scorer(task: str):
    """The function ``(prediction, answer) -> bool`` that scores a task's greedy generations: exact_match, or for
    the real-base tasks a strict JSON comparison (lopt.builtin.real_task.json_match)."""
    if task in REAL_BASE_TASKS:
        from lopt.builtin.real_task import json_match

        return json_match
    return exact_match


def task_max_new_tokens(task: str) -> int:
    """Tokens generated when a task's answers are scored (a JSON answer is longer than a word)."""
    if task == EXTRACT_TASK:
        from lopt.builtin.real_task import MAX_NEW_TOKENS

        return MAX_NEW_TOKENS
    if task == TOTALS_TASK:
        from lopt.builtin.totals_task import MAX_NEW_TOKENS

        return MAX_NEW_TOKENS
    return 32


def _hash_percent(key: str) -> int:
    # A stable hash (not Python's salted hash()): splits never change between runs or seeds.
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def _task_is_test(prompt: str) -> bool:
    return _hash_percent(f"{TASK_NAME}:{prompt}") < _TASK_TEST_PERCENT


def _successor_split(prompt: str) -> str:
    if _task_is_test(prompt):
        return "test"
    return (
        "validation"
        if _hash_percent(f"{TASK_NAME}-validation:{prompt}") < _TASK_VALIDATION_PERCENT
        else "train"
    )


def task_answer(prompt: str) -> str:
    """The reference answer of a task prompt (the number after the one in the prompt)."""
    match = re.fullmatch(r"What number comes after (\d+)\?", prompt.strip())
    if match is None:
        raise ValueError(f"not a {TASK_NAME} task prompt: {prompt!r}")
    return str(int(match.group(1)) + 1)


@functools.cache
def _task_items(task: str) -> tuple[tuple[str, str, str], ...]:
    """All ``(prompt, completion, split)`` items of a built-in task, in a fixed order (built once per process: the
    modules task reads the corpus and the knowledge probe)."""
    if task == TASK_NAME:
        items = []
        for number in range(TASK_MAX_N + 1):
            prompt = _TASK_PROMPT.format(n=number)
            items.append((prompt, str(number + 1), _successor_split(prompt)))
        return tuple(items)
    if task == MODULES_TASK:
        from lopt.builtin.knowledge import knowledge_facts, knowledge_items

        probe_keys = {row["id"] for row in knowledge_items()}
        probe_summaries = {f.summary for f in knowledge_facts("probe") if f.key in probe_keys}
        items = []
        for fact in knowledge_facts("sft"):
            if fact.summary in probe_summaries:
                continue  # training on a probe item's sentence would teach the retention probe
            kind = "method" if fact.is_method else "function" if fact.kind == "def" else "class"
            prompt = f"{fact.summary}\nWhich module defines the {kind} {fact.name}?"
            percent = _hash_percent(f"{MODULES_TASK}:{fact.key}")
            split = "test" if percent < 20 else "validation" if percent < 30 else "train"
            items.append((prompt, fact.module, split))
        return tuple(items)
    if task == EXTRACT_TASK:
        from lopt.builtin.real_task import extract_items

        return extract_items()  # (sentence, JSON answer, split): builtin_task_rows makes the chat prompt
    if task == TOTALS_TASK:
        from lopt.builtin.totals_task import totals_items

        return totals_items()  # (note, JSON answer, split), likewise
    raise ValueError(f"unknown built-in task {task!r}; choose from {', '.join(BUILTIN_TASKS)}.")


def builtin_task_rows(
    split: str = "train", n: int | None = None, seed: int = 0, task: str = DEFAULT_TASK
) -> list[dict]:
    """Rows ``{"prompt", "completion"}`` of a built-in task (default "successor": ``{"prompt": "What number comes
    after 41?", "completion": "42"}``).

    Items are split once and for all by a stable hash into ``"train"``, ``"validation"`` and ``"test"``
    (successor: 723 / 86 / 191 of the 1000 problems N = 0..999); the splits are disjoint.  ``seed`` only
    shuffles the order, and ``n`` keeps the first ``n`` rows after shuffling (all if ``None`` or larger than
    the split).  Same arguments, same rows.

    Format: prompt and completion are bare strings, with no template and no EOS.  Train and
    evaluate with the tokenizer's chat template: user turn = prompt, assistant turn =
    completion, i.e. ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``
    followed by ``{completion}<|im_end|><|endoftext|>``, with the loss on the completion part
    only.  Score greedy generations of the prompts with :func:`exact_match`.

    "extract" (lopt.builtin.real_task) and "totals" (lopt.builtin.totals_task) differ: a prompt is a list of chat
    messages (the task's instruction as a system message, then the user's text), a completion a JSON object, scored
    with :func:`task_scorer`.
    """
    if split not in TASK_SPLITS:
        raise ValueError(f"split must be one of {', '.join(TASK_SPLITS)}, not {split!r}")
    if task in REAL_BASE_TASKS:
        if task == EXTRACT_TASK:
            from lopt.builtin.real_task import chat_prompt
        else:
            from lopt.builtin.totals_task import chat_prompt

        rows = [{"prompt": chat_prompt(p), "completion": c} for p, c, s in _task_items(task) if s == split]
    else:
        rows = [{"prompt": p, "completion": c} for p, c, s in _task_items(task) if s == split]
    random.Random(seed).shuffle(rows)
    return rows if n is None else rows[:n]


def normalize_answer(text: str) -> str:
    """Canonical form of an answer: trimmed, case-folded, inner whitespace collapsed,
    trailing sentence punctuation dropped."""
    text = re.sub(r"\s+", " ", text.strip().casefold())
    return text.rstrip(" .!")


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a model's output equals the reference answer after normalisation."""
    return normalize_answer(prediction) == normalize_answer(answer)


# --------------------------------------------------------------------------------------
# RL views of the built-in task (`lopt grpo`, `lopt dpo`)
# --------------------------------------------------------------------------------------


def builtin_grpo_rows(
    split: str = "train", n: int | None = None, seed: int = 0, task: str = DEFAULT_TASK
) -> list[dict]:
    """Rows ``{"prompt", "answer"}`` of a built-in task for GRPO: the same prompts, splits and order as
    :func:`builtin_task_rows`; the answer is the task's completion, verified with :func:`task_scorer`."""
    rows = builtin_task_rows(split, n=n, seed=seed, task=task)
    return [{"prompt": row["prompt"], "answer": row["completion"]} for row in rows]


def builtin_preference_rows(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` of the built-in task for DPO.

    ``chosen`` is the correct completion (N+1); ``rejected`` a plausible wrong one, chosen deterministically per
    prompt and seed among the typical slips: repeating N, N+2, off by ten, or a dropped carry (199 -> "190").
    """
    pairs = []
    for row in builtin_task_rows(split, n=n, seed=seed):
        number = int(row["completion"]) - 1
        wrong = {number, number + 2, number + 11}
        if number >= 9:
            wrong.add(number - 9)
        if number % 10 == 9:
            wrong.add(int(str(number)[:-1] + "0"))  # the last digit rolled over but the carry was lost
        wrong.discard(number + 1)
        rng = random.Random(f"{TASK_NAME}-preference:{seed}:{row['prompt']}")
        rejected = str(rng.choice(sorted(wrong)))
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected})
    return pairs
