"""Verifiable rewards for `lopt grpo`: extract the final answer from a completion and compare it with the reference.

Answer extraction, in order of precedence:

1. ``\\boxed{...}`` (the last one; nested braces such as ``\\boxed{\\frac{1}{2}}`` are kept whole);
2. the GSM8K marker ``#### <answer>`` (the last one; its answer runs to the end of the line);
3. the last number in the text (``1,234``, ``-7``, ``3.50``, ``.5`` are numbers; ``1,23`` is not one number).

Comparison: both answers are normalised (``$``, thousands separators, spaces, a trailing period, ``\\left``/
``\\right``, ``\\dfrac``/``\\tfrac`` and ``\\text{...}`` wrappers removed); if both are numbers they are compared by
value (``"3.50" == "3.5"``, ``"-0" == "0"``, ``"1,000" == "1000"``), otherwise as strings. A completion without an
answer gets reward 0.

Reward functions have TRL's signature ``f(prompts, completions, answer=..., **kwargs) -> list[float]``, where each
completion is a string or a list of chat messages (``[{"role": "assistant", "content": "..."}]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "REWARDS",
    "REWARD_FUNCTIONS",
    "answers_match",
    "completion_text",
    "exact_match_reward",
    "extract_answer",
    "extract_boxed",
    "extract_hash_answer",
    "extract_last_number",
    "json_match_reward",
    "math_reward",
    "normalize_math_answer",
    "parse_number",
    "reward_function",
]

# A number: optional sign, then either digit groups with thousands separators ("1,234,567.5"), plain digits with an
# optional fraction ("42", "3.50"), or a bare fraction (".5"). Not preceded by a letter/digit (so "x2" and "a1" are not
# numbers) and the thousands form only when the groups are exactly 3 digits.
_NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?!\d)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH = re.compile(r"####[ \t]*([^\n]*)")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the joined contents of a list of chat messages."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, Sequence):
        return "\n".join(completion_text(message) for message in completion)
    return str(completion)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included; None if there is none or
    its braces never close."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 0
        for pos in range(start, len(text)):
            char = text[pos]
            if char == "{":
                depth += 1
            elif char == "}":
                if depth == 0:
                    return text[start:pos].strip()
                depth -= 1
    return None


def extract_hash_answer(text: str) -> str | None:
    """The answer after the last GSM8K ``####`` marker (to the end of its line); None if absent or empty."""
    matches = [m.group(1).strip() for m in _HASH.finditer(text)]
    for answer in reversed(matches):
        if answer:
            return answer
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in the text, as written (``"1,234"``, ``"-3.50"``); None if there is none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution text: ``\\boxed{}`` > ``####`` > last number. None if there is no answer."""
    text = completion_text(text)
    for extract in (extract_boxed, extract_hash_answer, extract_last_number):
        answer = extract(text)
        if answer:
            return answer
    return None


def _unwrap(text: str, command: str) -> str:
    """Replace every ``\\command{X}`` by ``X`` (nested braces inside X are kept)."""
    marker = "\\" + command + "{"
    while (idx := text.find(marker)) >= 0:
        start = idx + len(marker)
        depth, end = 0, None
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                if depth == 0:
                    end = pos
                    break
                depth -= 1
        if end is None:
            break
        text = text[:idx] + text[start:end] + text[end + 1 :]
    return text


def normalize_math_answer(answer: str | None) -> str | None:
    """A canonical string for an answer (see the module docstring); None for a missing or empty answer."""
    if answer is None:
        return None
    text = str(answer).strip()
    for command in ("text", "textbf", "mathrm", "mbox"):
        text = _unwrap(text, command)
    text = (
        text.replace("\\left", "")
        .replace("\\right", "")
        .replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
    )
    text = text.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\$", "").replace("$", "")
    text = text.replace("−", "-")  # unicode minus
    text = re.sub(r"\s+", "", text).rstrip(".").casefold()
    if re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?)", text):
        text = text.replace(",", "")  # thousands separators, only when they really are ("1,234" not "1,2")
    number = parse_number(text)
    if number is not None:
        return _canonical_number(number)
    return text or None


def parse_number(text: str | None) -> Decimal | None:
    """The value of a plain number (``"-3.50"``, ``"1,234"``, ``"+7"``, ``"50%"`` is not one); None otherwise."""
    if text is None:
        return None
    text = str(text).strip().replace("−", "-")
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex only lets valid literals through
        return None


def _canonical_number(value: Decimal) -> str:
    if value == 0:
        return "0"  # also "-0", "0.00"
    text = format(value.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Whether two extracted answers agree after normalisation (numbers by value). A missing one never matches."""
    pred, ref = normalize_math_answer(prediction), normalize_math_answer(reference)
    return pred is not None and ref is not None and pred == ref


def _reference_answer(reference: Any) -> str | None:
    """The answer a reference holds: its ``\\boxed{}``/``####`` answer, the reference itself if it is a plain
    number, else its last number, else the whole (short) text."""
    text = completion_text(reference).strip()
    if not text:
        return None
    boxed = extract_boxed(text) or extract_hash_answer(text)
    if boxed:
        return boxed
    if parse_number(text) is not None:
        return text
    return extract_last_number(text) or text


def _references(n: int, answer: Sequence[Any] | None, kwargs: dict) -> list[Any]:
    refs = answer
    if refs is None:
        refs = kwargs.get("solution", kwargs.get("answers"))
    if refs is None:
        raise ValueError(
            "reward function needs an 'answer' column (or 'solution') with the reference answers."
        )
    refs = list(refs)
    if len(refs) != n:
        raise ValueError(f"reward function got {n} completions but {len(refs)} reference answers.")
    return refs


def math_reward(
    prompts: Sequence[Any] | None = None,
    completions: Sequence[Any] = (),
    answer: Sequence[Any] | None = None,
    **kwargs,
) -> list[float]:
    """1.0 if the completion's final answer (``\\boxed{}`` > ``####`` > last number) equals the reference's, else 0.0.

    References may be full solutions (GSM8K's "... #### 42", NuminaMath's "... \\boxed{42}") or bare answers.
    """
    refs = _references(len(completions), answer, kwargs)
    rewards = []
    for completion, ref in zip(completions, refs):
        gold = _reference_answer(ref)
        text = completion_text(completion)
        pred = extract_answer(text)
        gold_is_number = parse_number(normalize_math_answer(gold)) is not None
        if gold is not None and pred is None and not gold_is_number:
            pred = text  # a non-numeric reference ("Paris"): the whole completion is the answer
        elif gold_is_number and pred is not None and parse_number(normalize_math_answer(pred)) is None:
            pred = extract_last_number(pred) or pred  # "#### 18 dollars", "\boxed{18 \text{ cm}}" -> "18"
        rewards.append(1.0 if answers_match(pred, gold) else 0.0)
    return rewards


def exact_match_reward(
    prompts: Sequence[Any] | None = None,
    completions: Sequence[Any] = (),
    answer: Sequence[Any] | None = None,
    **kwargs,
) -> list[float]:
    """1.0 if the whole completion equals the reference answer after the built-in task's normalisation
    (``lopt.builtin.tasks.normalize_answer``: trimmed, case-folded, whitespace collapsed, trailing punctuation dropped)."""
    from lopt.builtin.tasks import exact_match

    refs = _references(len(completions), answer, kwargs)
    rewards = []
    for completion, ref in zip(completions, refs):
        text, ref_text = completion_text(completion), completion_text(ref)
        ok = bool(text.strip()) and bool(ref_text.strip()) and exact_match(text, ref_text)
        rewards.append(1.0 if ok else 0.0)
    return rewards


def json_match_reward(
    prompts: Sequence[Any] | None = None,
    completions: Sequence[Any] = (),
    answer: Sequence[Any] | None = None,
    **kwargs,
) -> list[float]:
    """1.0 if the whole completion is exactly the reference JSON object (same keys, values and JSON types; outer
    whitespace allowed; a parse failure scores 0), the scorer of the built-in "extract" and "totals" tasks
    (lopt.builtin.real_task, lopt.builtin.totals_task)."""
    from lopt.builtin.real_task import json_match

    refs = _references(len(completions), answer, kwargs)
    return [
        1.0 if json_match(completion_text(c), completion_text(r)) else 0.0 for c, r in zip(completions, refs)
    ]


REWARD_FUNCTIONS: dict[str, Callable[..., list[float]]] = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "json_match": json_match_reward,
}

# --reward of `lopt grpo`: auto picks by task (reward_function).
REWARDS = ("auto", *REWARD_FUNCTIONS)


def reward_function(name: str, task: str | None) -> Callable[..., list[float]]:
    """The reward `--reward NAME` gives on `task`; auto: the built-in task's scorer (json_match for a real base's tasks,
    else exact_match), else math (the user's data, the hub tasks)."""
    if name == "auto":
        from lopt.builtin.tasks import BUILTIN_TASKS, REAL_BASE_TASKS

        name = "json_match" if task in REAL_BASE_TASKS else "exact_match" if task in BUILTIN_TASKS else "math"
    return REWARD_FUNCTIONS[name]
