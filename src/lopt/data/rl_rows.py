"""GRPO and DPO rows: each row checked and normalised to chat messages (one-line DataError naming the row and the
field), and the datasets TRL's GRPOTrainer and DPOTrainer read, laid out as `lopt sft` lays out its prompts."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from lopt.data.rows import check_messages, check_row_object, user_prompt
from lopt.errors import DataError

# (prompt field, answer field) pairs accepted in GRPO rows, tried in this order.
PROMPT_ANSWER_FIELDS = (
    ("prompt", "answer"),
    ("question", "answer"),
    ("problem", "solution"),
    ("problem", "answer"),
    ("prompt", "solution"),
)


ROW_FORMATS_HELP = ", ".join(f"{p}/{a}" for p, a in PROMPT_ANSWER_FIELDS)


def message_list(value: Any, index: int, field: str) -> list[dict[str, str]]:
    """A list of {role, content} chat messages, validated (one-line DataError naming the row and field)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"row {index}: field {field!r} must be a string or a non-empty list of chat messages")
    return check_messages(value, index, field)


def prompt_messages(
    row: Mapping[str, Any], key: str, index: int, instruction: str | None = None
) -> list[dict[str, str]]:
    """The row's prompt as chat messages: a string becomes a user message (after an optional `system` string),
    prefixed with `instruction` if given. A chat list is kept as it is."""
    value = row[key]
    if isinstance(value, list):
        messages = message_list(value, index, key)
        if messages[-1]["role"] == "assistant":
            raise DataError(
                f"row {index}: the prompt in {key!r} ends with an assistant message; a prompt ends with the turn "
                "the model answers (e.g. a user message)"
            )
        return messages
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"row {index}: field {key!r} (the prompt) must be a non-empty string or a chat list")
    return user_prompt(row, f"{instruction}\n\n{value}" if instruction else value, index)


def to_prompt_answer(
    row: Any, index: int, instruction: str | None = None
) -> tuple[list[dict[str, str]], str]:
    """Normalise one GRPO row to (prompt messages, reference answer text)."""
    check_row_object(row, index)
    for prompt_key, answer_key in PROMPT_ANSWER_FIELDS:
        if prompt_key in row and answer_key in row:
            answer = row[answer_key]
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise DataError(
                    f"row {index}: field {answer_key!r} (the reference answer) must be a string or a number"
                )
            answer = str(answer)
            if not answer.strip():
                raise DataError(f"row {index}: field {answer_key!r} (the reference answer) is empty")
            return prompt_messages(row, prompt_key, index, instruction), answer
    keys = ", ".join(repr(k) for k in row) or "none"
    raise DataError(
        f"row {index}: no prompt/answer fields (row keys: {keys}); GRPO rows need one of {ROW_FORMATS_HELP}"
    )


def model_prompt(messages: list[dict[str, str]], tokenizer) -> list[dict[str, str]] | str:
    """What the trainer gets as a prompt: the chat messages if the tokenizer has a chat template (TRL applies it),
    else the plain prompt text exactly as `lopt sft` lays it out."""
    from lopt.data.rows import format_prompt, has_chat_template

    return messages if has_chat_template(tokenizer) else format_prompt(messages, tokenizer)


def prompt_answer_dataset(rows: list, tokenizer, max_prompt_length: int, instruction: str | None = None):
    """Rows -> a datasets.Dataset with `prompt` and `answer`; prompts over max_prompt_length tokens are skipped."""
    import datasets

    from lopt.data.rows import encode_prompt

    items, skipped = [], 0
    for i, row in enumerate(rows):
        messages, answer = to_prompt_answer(row, i, instruction)
        if len(encode_prompt(messages, tokenizer)) > max_prompt_length:
            skipped += 1
            continue
        items.append({"prompt": model_prompt(messages, tokenizer), "answer": answer})
    if not items:
        raise DataError(
            f"all {len(rows)} rows have prompts longer than --max_prompt_length {max_prompt_length} tokens; "
            "raise it or shorten the prompts"
        )
    if skipped:
        print(
            f"lopt grpo: skipped {skipped} of {len(rows)} rows whose prompt is longer than "
            f"--max_prompt_length {max_prompt_length}",
            file=sys.stderr,
        )
    return datasets.Dataset.from_list(items)


def _completion(row: Mapping[str, Any], key: str, index: int) -> list[dict[str, str]]:
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"row {index}: field {key!r} is empty; fill it in or drop the row")
        return [{"role": "assistant", "content": value}]
    messages = message_list(value, index, key)
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"row {index}: {key!r} must end with a non-empty assistant message")
    return messages


def to_preference(row: Any, index: int) -> tuple[list[dict[str, str]], list[dict], list[dict]]:
    """Normalise one row to (prompt messages, chosen messages, rejected messages)."""
    check_row_object(row, index)
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
    if missing:
        keys = ", ".join(repr(k) for k in row) or "none"
        raise DataError(
            f"row {index}: missing field(s) {', '.join(missing)} (row keys: {keys}); DPO rows need prompt, "
            "chosen and rejected (strings or chat message lists)"
        )
    return (
        prompt_messages(row, "prompt", index),
        _completion(row, "chosen", index),
        _completion(row, "rejected", index),
    )


def preference_dataset(rows: list, tokenizer):
    """Rows -> a datasets.Dataset in TRL's preference format: conversational if the tokenizer has a chat template
    (TRL applies it), else plain text laid out as `lopt sft` does (TRL appends EOS to the completions)."""
    import datasets

    from lopt.data.rows import format_prompt, has_chat_template

    templated = has_chat_template(tokenizer)
    items = []
    for i, row in enumerate(rows):
        prompt, chosen, rejected = to_preference(row, i)
        if templated:
            items.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            items.append(
                {
                    "prompt": format_prompt(prompt, tokenizer),
                    "chosen": "\n".join(m["content"] for m in chosen),
                    "rejected": "\n".join(m["content"] for m in rejected),
                }
            )
    return datasets.Dataset.from_list(items)
