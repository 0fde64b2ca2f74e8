"""User SFT data -> tokenized causal-LM examples whose labels cover the response only.

Pipeline used by ``lopt sft``::

    rows = load_rows(train_file="data.jsonl", max_samples=1000)   # list[dict], raw rows
    dataset = tokenize_rows(rows, tokenizer, max_seq_length=1024)  # input_ids / attention_mask / labels
    collator = make_collator(tokenizer)                            # pads; labels padded with -100

Accepted row formats (see ``ACCEPTED_FORMATS``), checked in this order:

* ``messages``: a chat, a list of ``{"role", "content"}`` whose LAST message is an assistant turn. Only that
  final assistant turn is trained; earlier assistant turns are part of the prompt (context, label -100).
* ``prompt`` / ``completion``: strings, or chat message lists (TRL's conversational format); a conversational
  pair is joined and then treated like ``messages``.
* ``instruction`` / ``input`` / ``output``: ``input`` is optional; prompt = instruction, or
  instruction + "\\n\\n" + input when input is non-empty.
* ``query`` / ``response``, ``question`` / ``answer``, ``problem`` / ``solution``.

For the non-chat formats an optional string ``system`` field becomes a leading system message. Message keys
other than ``role`` and ``content`` are ignored.

Text layout:

* Tokenizer with a chat template: prompt text = ``apply_chat_template(prompt, add_generation_prompt=True)``;
  full text = the template applied to prompt + ``{"role": "assistant", "content": completion}``. Both are
  tokenized without extra special tokens (the template writes them), as ``apply_chat_template`` does. The
  completion tokens are the full tokens after the prompt tokens, so they include the template's end-of-turn
  markup. If the prompt tokens are not a prefix of the full tokens (a template that renders the generation
  prompt differently, or a token merge across the boundary), the prompt and the completion are tokenized
  separately and concatenated, and EOS is appended to the completion if it has none.
* No chat template: prompt text = the prompt message contents joined by "\\n"; the completion follows it
  directly and EOS is appended. Tokenized with the tokenizer's special tokens (e.g. BOS).

``format_prompt`` / ``encode_prompt`` give exactly the prompt text / token ids used in training, for
generation at evaluation time.

Sequences longer than ``max_seq_length`` are truncated from the right. A row whose prompt alone fills
``max_seq_length`` (no response token left to train on) is an error naming the row, rather than a silent
drop: one clear error is better than training on fewer rows than the user thinks.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lopt.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value ignored by the loss (PyTorch cross-entropy's default ``ignore_index``)."""

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")

ACCEPTED_FORMATS: tuple[str, ...] = (
    "messages",
    "prompt/completion",
    "instruction/input/output",
    "query/response",
    "question/answer",
    "problem/solution",
)
"""Accepted field sets of a row, in the order they are tried (``input`` is optional)."""

FORMATS_HELP = (
    "each row needs one of the field sets: messages (chat list of {role, content} ending with an assistant "
    "turn; only that last turn is trained), prompt/completion (strings or chat message lists), "
    "instruction/input/output (input optional), query/response, question/answer, problem/solution; "
    "an optional 'system' string adds a system message to the non-chat formats"
)
"""One-line description of the accepted formats, for --help texts."""

# (prompt field, completion field) pairs of the plain string formats, after messages/prompt/instruction.
_STRING_PAIRS = (("query", "response"), ("question", "answer"), ("problem", "solution"))


class PromptCompletion(NamedTuple):
    """A normalised row: chat messages to condition on, and the assistant text to train on."""

    prompt: list[dict[str, str]]
    completion: str


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_rows(
    train_file: str | Path | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    max_samples: int | None = None,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """Read raw rows from a local file (.jsonl, .json, .parquet) or a ``datasets`` dataset.

    Exactly one of ``train_file`` / ``dataset_name`` must be given. ``max_samples`` keeps the first N rows.
    Raises ``DataError`` (one line, naming the file/line/row and the fix) on any problem.
    """
    if (train_file is None) == (dataset_name is None):
        got = "both" if train_file is not None else "neither"
        raise DataError(f"pass exactly one of --train_file or --dataset_name (got {got})")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise DataError(f"--max_samples must be a positive integer, got {max_samples!r}")

    if train_file is not None:
        source = f"train file {train_file}"
        rows = _load_file(Path(train_file), max_samples)
    else:
        source = f"dataset {dataset_name!r} (config {dataset_config!r}, split {split!r})"
        rows = _load_hf_dataset(dataset_name, dataset_config, split, max_samples, trust_remote_code)

    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise DataError(f"no rows in {source}; provide a file or dataset split with at least one example")
    return rows


def _load_file(path: Path, max_samples: int | None) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"unsupported train file extension {path.suffix or '(none)'!r} for {path}; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.exists():
        raise DataError(f"train file not found: {path} (check the --train_file path)")
    if not path.is_file():
        raise DataError(f"train file {path} is not a file; pass a {'/'.join(SUPPORTED_EXTENSIONS)} file")
    if suffix == ".parquet":
        return _load_parquet(path, max_samples)

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"could not read train file {path}: {exc.strerror or exc}") from exc

    if suffix == ".json" and text.lstrip().startswith("["):
        return _parse_json_list(path, text)
    # .jsonl, or .json holding one object per line.
    return _parse_json_lines(path, text, max_samples)


def _parse_json_list(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; fix the file "
            "(a .json file must hold a list of objects or one object per line)"
        ) from exc
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(
                f"{path}: item {i} of the top-level list is a {_json_type(item)}, expected a JSON object "
                "with named fields (e.g. prompt/completion)"
            )
    return data


def _parse_json_lines(path: Path, text: str, max_samples: int | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {lineno}: invalid JSON ({exc.msg}, column {exc.colno}); fix that line - "
                "each line must be one complete JSON object (a .json file may instead hold one list of objects)"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}: line {lineno}: expected a JSON object with named fields, got a {_json_type(obj)}"
            )
        rows.append(obj)
        if max_samples is not None and len(rows) >= max_samples:
            break
    return rows


def _load_parquet(path: Path, max_samples: int | None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several exception types for corrupt / non-Parquet files
        raise DataError(
            f"could not read Parquet file {path}: {_one_line(exc)}; check that it is a valid Parquet file"
        ) from exc
    if max_samples is not None:
        table = table.slice(0, max_samples)
    return table.to_pylist()


def _load_hf_dataset(
    dataset_name: str,
    dataset_config: str | None,
    split: str,
    max_samples: int | None,
    trust_remote_code: bool,
) -> list[dict[str, Any]]:
    import datasets

    kwargs: dict[str, Any] = {}
    if trust_remote_code:  # only forwarded when asked for; recent `datasets` versions no longer run scripts
        kwargs["trust_remote_code"] = True
    try:
        ds = datasets.load_dataset(dataset_name, dataset_config, split=split, **kwargs)
    except Exception as exc:  # network, auth, unknown name/config/split, ... all become one user-facing line
        raise DataError(
            f"could not load dataset {dataset_name!r} (config {dataset_config!r}, split {split!r}): "
            f"{_one_line(exc)}; check the name, --dataset_config and --split, your network or HF token, "
            "or use a local --train_file"
        ) from exc
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(
            f"dataset {dataset_name!r} returned several splits ({', '.join(ds.keys())}); choose one with --split"
        )
    if isinstance(ds, datasets.IterableDataset):
        items = ds.take(max_samples) if max_samples is not None else ds
        return [dict(row) for row in items]
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds.to_list()


def _json_type(value: Any) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Row normalisation
# --------------------------------------------------------------------------------------------------------------


def to_prompt_completion(row: Mapping[str, Any], index: int) -> PromptCompletion:
    """Normalise one row of any accepted format to (prompt chat messages, completion text).

    ``index`` is the row's 0-based position, used in error messages. For ``messages`` (and conversational
    prompt/completion) rows, only the final assistant turn is the completion; everything before it is prompt.
    """
    if isinstance(row, PromptCompletion):
        return row
    check_row_object(row, index)

    if "messages" in row:
        messages = check_messages(row["messages"], index, "messages")
        return _split_final_assistant(messages, index, "messages")

    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL conversational prompt-completion
            if isinstance(prompt, list):
                prompt_msgs = check_messages(prompt, index, "prompt", allow_empty=True)
            else:
                prompt_msgs = user_prompt(row, _string_field(row, "prompt", index), index)
            if isinstance(completion, list):
                completion_msgs = check_messages(completion, index, "completion")
            else:
                completion_msgs = [
                    {"role": "assistant", "content": _completion_field(row, "completion", index)}
                ]
            return _split_final_assistant(prompt_msgs + completion_msgs, index, "completion")
        return PromptCompletion(
            user_prompt(row, _string_field(row, "prompt", index), index),
            _completion_field(row, "completion", index),
        )

    if "instruction" in row and "output" in row:
        instruction = _string_field(row, "instruction", index)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(
                f"row {index}: field 'input' must be a string or absent, got a {_json_type(extra)}"
            )
        text = instruction + "\n\n" + extra if extra and extra.strip() else instruction
        return PromptCompletion(user_prompt(row, text, index), _completion_field(row, "output", index))

    for prompt_key, completion_key in _STRING_PAIRS:
        if prompt_key in row and completion_key in row:
            return PromptCompletion(
                user_prompt(row, _string_field(row, prompt_key, index), index),
                _completion_field(row, completion_key, index),
            )

    keys = ", ".join(repr(k) for k in row) or "none"
    raise DataError(
        f"row {index}: no known fields (row keys: {keys}); accepted field sets: {', '.join(ACCEPTED_FORMATS)} "
        "- rename your columns to one of them"
    )


def _string_field(row: Mapping[str, Any], key: str, index: int) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"row {index}: field {key!r} must be a string, got a {_json_type(value)}")
    return value


def _completion_field(row: Mapping[str, Any], key: str, index: int) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(
            f"row {index}: field {key!r} (the response to train on) must be a string, got a {_json_type(value)}"
        )
    if not value.strip():
        raise DataError(
            f"row {index}: field {key!r} (the response to train on) is empty; fill it in or drop the row"
        )
    return value


def check_row_object(row: Any, index: int) -> None:
    """A row is an object with named fields (every command's rows)."""
    if not isinstance(row, Mapping):
        raise DataError(f"row {index}: expected an object with named fields, got a {_json_type(row)}")


def user_prompt(row: Mapping[str, Any], text: str, index: int) -> list[dict[str, str]]:
    """`text` as a user message, after the row's `system` string if it has one (every command's plain prompts)."""
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"row {index}: field 'system' must be a string or absent, got a {_json_type(system)}")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages.append({"role": "user", "content": text})
    return messages


def check_messages(value: Any, index: int, field: str, allow_empty: bool = False) -> list[dict[str, str]]:
    """The {role, content} chat messages of a row's field, each checked (every command's chat rows)."""
    if not isinstance(value, list):
        raise DataError(
            f"row {index}: field {field!r} must be a list of {{role, content}} messages, got a {_json_type(value)}"
        )
    if not value and not allow_empty:
        raise DataError(
            f"row {index}: field {field!r} is an empty list; it needs at least an assistant message"
        )
    messages = []
    for j, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(
                f"row {index}: {field}[{j}] must be an object with 'role' and 'content', got a {_json_type(message)}"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise DataError(
                f"row {index}: {field}[{j}] needs a string 'role' (system/user/assistant), got {role!r}"
            )
        if not isinstance(content, str):
            raise DataError(
                f"row {index}: {field}[{j}] ({role}) needs a string 'content', got a {_json_type(content)}"
            )
        messages.append({"role": role, "content": content})
    return messages


def _split_final_assistant(messages: list[dict[str, str]], index: int, field: str) -> PromptCompletion:
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(
            f"row {index}: the last message in {field!r} has role {last['role']!r}; it must be the assistant "
            "reply (only the final assistant turn is trained) - end each conversation with an assistant message"
        )
    if not last["content"].strip():
        raise DataError(
            f"row {index}: the final assistant message in {field!r} is empty; fill it in or drop the row"
        )
    return PromptCompletion(messages[:-1], last["content"])


# --------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer defines a chat template (which then decides the whole text layout)."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(prompt_messages: Sequence[Mapping[str, str]] | str, tokenizer: Any) -> str:
    """The prompt text the model is given for generation, exactly as laid out in training.

    With a chat template this ends with the generation prompt (e.g. ``<|im_start|>assistant\\n``). Tokenize it
    with ``add_special_tokens=False`` when the tokenizer has a chat template and with the default special tokens
    otherwise -- or simply use :func:`encode_prompt`. A plain string is treated as one user message.
    """
    messages = _as_messages(prompt_messages)
    if has_chat_template(tokenizer):
        return _apply_template(tokenizer, messages, add_generation_prompt=True, index=None)
    return "\n".join(m["content"] for m in messages)


def encode_prompt(prompt_messages: Sequence[Mapping[str, str]] | str, tokenizer: Any) -> list[int]:
    """Token ids of :func:`format_prompt`, tokenized exactly as the prompt part of a training example."""
    text = format_prompt(prompt_messages, tokenizer)
    return _encode(tokenizer, [text], add_special_tokens=not has_chat_template(tokenizer))[0]


def tokenize_rows(rows: Sequence[Any], tokenizer: Any, max_seq_length: int):
    """Tokenize rows into a ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels``.

    ``labels`` is -100 on prompt tokens and the token id on completion tokens (including the end-of-turn / EOS
    token). Sequences are truncated from the right to ``max_seq_length``; a row left without any completion
    token raises ``DataError`` naming the row, its prompt length and ``max_seq_length``.
    """
    import datasets

    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise DataError(f"--max_seq_length must be an integer >= 2, got {max_seq_length!r}")
    if not rows:
        raise DataError("no rows to tokenize; the training data is empty")

    templated = has_chat_template(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if not templated and eos_id is None:
        raise DataError(
            "the tokenizer has neither a chat template nor an eos_token, so the model could not learn where a "
            "response ends; use a tokenizer that defines one (or set tokenizer.eos_token)"
        )

    pairs = [to_prompt_completion(row, i) for i, row in enumerate(rows)]
    prompt_texts, full_texts = [], []
    for i, (prompt, completion) in enumerate(pairs):
        if templated:
            prompt_texts.append(_apply_template(tokenizer, prompt, add_generation_prompt=True, index=i))
            conversation = [*prompt, {"role": "assistant", "content": completion}]
            full_texts.append(_apply_template(tokenizer, conversation, add_generation_prompt=False, index=i))
        else:
            prompt_text = "\n".join(m["content"] for m in prompt)
            prompt_texts.append(prompt_text)
            full_texts.append(prompt_text + completion)

    special = not templated
    prompt_ids = _encode(tokenizer, prompt_texts, add_special_tokens=special)
    full_ids = _encode(tokenizer, full_texts, add_special_tokens=special)

    input_ids, attention_mask, labels = [], [], []
    n_fallback = n_truncated = 0
    for i, (p_ids, f_ids) in enumerate(zip(prompt_ids, full_ids)):
        n_prompt = len(p_ids)
        if len(f_ids) > n_prompt and f_ids[:n_prompt] == p_ids:
            c_ids = list(f_ids[n_prompt:])
            if not templated and c_ids[-1] != eos_id:
                c_ids.append(eos_id)
        else:
            # The prompt tokens are not a prefix of the full tokens: tokenize the completion on its own. Keep the
            # template's end-of-turn markup when the prompt text is a prefix of the full text.
            n_fallback += 1
            prompt_text, full_text = prompt_texts[i], full_texts[i]
            if templated and full_text.startswith(prompt_text) and len(full_text) > len(prompt_text):
                completion_text = full_text[len(prompt_text) :]
            else:
                completion_text = pairs[i].completion
            c_ids = _encode(tokenizer, [completion_text], add_special_tokens=False)[0]
            if eos_id is not None and eos_id not in c_ids:
                c_ids.append(eos_id)
        if not c_ids:
            raise DataError(f"row {i}: the response produced no tokens; check its text and the tokenizer")
        if n_prompt >= max_seq_length:
            raise DataError(
                f"row {i}: the prompt is {n_prompt} tokens, so no response token fits in max_seq_length "
                f"{max_seq_length}; raise --max_seq_length above {n_prompt} or shorten/drop this row"
            )
        ids = list(p_ids) + c_ids
        row_labels = [IGNORE_INDEX] * n_prompt + c_ids
        if len(ids) > max_seq_length:
            n_truncated += 1
            ids, row_labels = ids[:max_seq_length], row_labels[:max_seq_length]
        input_ids.append(ids)
        attention_mask.append([1] * len(ids))
        labels.append(row_labels)

    if n_fallback:
        logger.info(
            "%d of %d rows: the tokenized prompt was not a prefix of the tokenized conversation; their prompt and "
            "response were tokenized separately",
            n_fallback,
            len(pairs),
        )
    if n_truncated:
        logger.warning(
            "%d of %d rows were longer than max_seq_length %d and were truncated from the right (their response "
            "end, including the end-of-turn token, is cut); raise --max_seq_length to keep them whole",
            n_truncated,
            len(pairs),
            max_seq_length,
        )
    return datasets.Dataset.from_dict(
        {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
        features=datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "attention_mask": datasets.Sequence(datasets.Value("int8")),
                "labels": datasets.Sequence(datasets.Value("int32")),
            }
        ),
    )


def _as_messages(prompt: Sequence[Mapping[str, str]] | str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _apply_template(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, index
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except (
        Exception
    ) as exc:  # jinja TemplateError / raise_exception() in templates, e.g. "roles must alternate"
        where = f"row {index}" if index is not None else "prompt"
        raise DataError(
            f"{where}: the tokenizer's chat template rejected the conversation ({_one_line(exc)}); check the "
            "message roles and order (some templates reject system messages or need alternating user/assistant)"
        ) from exc
    if not isinstance(text, str):  # defensive: tokenize=False should always give a string
        raise DataError(f"the chat template returned a {type(text).__name__}, expected text")
    return text


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    # verbose=False: no "sequence longer than model_max_length" warnings; truncation is done afterwards.
    out = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


# --------------------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer: Any) -> bool:
    """Give the tokenizer a pad token if it has none (reusing EOS). Returns True if it was changed.

    Reusing EOS as padding is safe here: padded positions get attention_mask 0 and label -100 from the
    collator, and real EOS tokens keep their labels because labels are built by ``tokenize_rows``, not
    derived from the pad token. Remember to mirror ``tokenizer.pad_token_id`` onto the model config.
    """
    if getattr(tokenizer, "pad_token", None) is not None:
        return False
    if getattr(tokenizer, "eos_token", None) is None:
        raise DataError(
            "the tokenizer has neither a pad_token nor an eos_token to pad with; set tokenizer.pad_token"
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.info("tokenizer has no pad token; using its eos token %r for padding", tokenizer.eos_token)
    return True


def make_collator(tokenizer: Any):
    """Batch collator: right-pads ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100).

    Uses ``transformers.DataCollatorForSeq2Seq``, which for decoder-only models simply pads the three columns
    (it builds ``attention_mask`` if a feature lacks it). Sets a pad token on ``tokenizer`` if missing.
    Padding is always on the right for training; the caller's tokenizer keeps its own ``padding_side``
    (e.g. left for batched generation).
    """
    from transformers import DataCollatorForSeq2Seq

    ensure_pad_token(tokenizer)
    pad_tokenizer = tokenizer
    if getattr(tokenizer, "padding_side", "right") != "right":
        pad_tokenizer = copy.copy(tokenizer)
        pad_tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(pad_tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
