"""Tests for lopt.data: loading, row normalisation, response-only labels, truncation, collation."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lopt.data import rows as data
from lopt.data.rows import (
    ACCEPTED_FORMATS,
    IGNORE_INDEX,
    encode_prompt,
    format_prompt,
    load_rows,
    make_collator,
    to_prompt_completion,
    tokenize_rows,
)
from lopt.errors import DataError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders the generation prompt differently from a finished assistant turn, so the tokenized prompt is not a
# prefix of the tokenized conversation (like templates that open a <think> block only when generating).
THINK_TEMPLATE = CHATML.replace(
    "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}"
)

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Translate hello to French: bonjour. Summarize the text in one sentence.",
    "question answer problem solution instruction input output 2+2=4",
    "You are a helpful assistant. The quick brown fox jumps over the lazy dog.",
]


def make_tokenizer(chat_template: str | None = CHATML, bos: bool = False) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer trained offline; decode(encode(text)) == text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    kwargs = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
        kwargs["bos_token"] = "<s>"
    if chat_template is None:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **kwargs)
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", **kwargs)
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return make_tokenizer(chat_template=None)


def unmasked(example: dict) -> list[int]:
    return [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]


def n_masked(example: dict) -> int:
    return sum(lab == IGNORE_INDEX for lab in example["labels"])


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------------------
# Row formats
# ----------------------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize(
    ("row", "prompt", "completion"),
    [
        ({"prompt": "What is the capital of France?", "completion": "Paris"}, USER, "Paris"),
        ({"query": "What is the capital of France?", "response": "Paris"}, USER, "Paris"),
        ({"question": "What is the capital of France?", "answer": "Paris"}, USER, "Paris"),
        ({"problem": "What is the capital of France?", "solution": "Paris"}, USER, "Paris"),
        ({"instruction": "What is the capital of France?", "output": "Paris"}, USER, "Paris"),
        ({"instruction": "What is the capital of France?", "input": "", "output": "Paris"}, USER, "Paris"),
        ({"instruction": "What is the capital of France?", "input": None, "output": "Paris"}, USER, "Paris"),
        (
            {"instruction": "Translate to French.", "input": "hello", "output": "bonjour"},
            [{"role": "user", "content": "Translate to French.\n\nhello"}],
            "bonjour",
        ),
        (
            {"messages": [*USER, {"role": "assistant", "content": "Paris"}]},
            USER,
            "Paris",
        ),
        (  # TRL conversational prompt-completion
            {"prompt": USER, "completion": [{"role": "assistant", "content": "Paris"}]},
            USER,
            "Paris",
        ),
        (  # conversational prompt, string completion
            {"prompt": USER, "completion": "Paris"},
            USER,
            "Paris",
        ),
        (
            {"system": "Be brief.", "question": "What is the capital of France?", "answer": "Paris"},
            [{"role": "system", "content": "Be brief."}, *USER],
            "Paris",
        ),
    ],
)
def test_formats(row, prompt, completion):
    result = to_prompt_completion(row, 0)
    assert result.prompt == prompt
    assert result.completion == completion
    assert tuple(result) == (prompt, completion)


def test_messages_only_final_assistant_turn_is_completion():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "extra": 1},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    prompt, completion = to_prompt_completion({"messages": messages}, 0)
    assert completion == "Paris"
    assert prompt == [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]


def test_accepted_formats_constant():
    assert ACCEPTED_FORMATS[0] == "messages"
    assert "prompt/completion" in ACCEPTED_FORMATS
    assert "instruction/input/output" in ACCEPTED_FORMATS


def test_unknown_fields_lists_accepted_fields_and_row_keys():
    with pytest.raises(DataError) as exc_info:
        to_prompt_completion({"text": "hi", "label": 1}, 7)
    message = one_line(exc_info)
    assert "row 7" in message
    assert "'text'" in message and "'label'" in message
    for fmt in ACCEPTED_FORMATS:
        assert fmt in message


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "Q", "completion": 3}, "'completion'"),
        ({"prompt": "Q", "completion": "   "}, "empty"),
        ({"question": "Q", "answer": None}, "'answer'"),
        ({"prompt": 5, "completion": "A"}, "'prompt'"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "assistant"),
        ({"messages": []}, "empty list"),
        ({"messages": "Q"}, "list"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}, "empty"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]}, "messages[0]"),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "user", "content": "A"}]},
            "assistant",
        ),
        ({"instruction": "Q", "input": 3, "output": "A"}, "'input'"),
        (["not", "an", "object"], "object"),
    ],
)
def test_row_errors(row, expected):
    with pytest.raises(DataError) as exc_info:
        to_prompt_completion(row, 4)
    message = one_line(exc_info)
    assert "row 4" in message
    assert expected in message


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(5)]


def test_load_jsonl_skips_blank_lines_and_max_samples(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + "\n".join(json.dumps(r) for r in ROWS[1:]) + "\n")
    assert load_rows(train_file=path) == ROWS
    assert load_rows(train_file=str(path), max_samples=2) == ROWS[:2]


def test_load_json_list_and_json_lines(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS, indent=2))
    assert load_rows(train_file=as_list) == ROWS
    as_lines = write_jsonl(tmp_path / "lines.json", ROWS)
    assert load_rows(train_file=as_lines, max_samples=3) == ROWS[:3]


def test_load_parquet(tmp_path):
    import datasets

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_rows(train_file=path) == ROWS
    assert load_rows(train_file=path, max_samples=1) == ROWS[:1]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as exc_info:
        load_rows(train_file=path)
    assert str(path) in one_line(exc_info)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\nQ,A\n")
    with pytest.raises(DataError) as exc_info:
        load_rows(train_file=path)
    message = one_line(exc_info)
    assert "'.csv'" in message
    for ext in (".jsonl", ".json", ".parquet"):
        assert ext in message


def test_malformed_jsonl_names_line_number(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "Q", "completion": \n'
    )
    with pytest.raises(DataError) as exc_info:
        load_rows(train_file=path)
    message = one_line(exc_info)
    assert str(path) in message and "line 3" in message


def test_malformed_json_list_names_position(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "Q", "completion": "A"},\n  {"prompt": "Q" "completion": "A"}\n]\n')
    with pytest.raises(DataError) as exc_info:
        load_rows(train_file=path)
    message = one_line(exc_info)
    assert str(path) in message and "line 3" in message and "column" in message


def test_non_object_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(["a", "b"]) + "\n")
    with pytest.raises(DataError) as exc_info:
        load_rows(train_file=path)
    assert "line 2" in one_line(exc_info)
    path = tmp_path / "train.json"
    path.write_text(json.dumps([ROWS[0], "text"]))
    with pytest.raises(DataError) as exc_info:
        load_rows(train_file=path)
    assert "item 1" in one_line(exc_info)


def test_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError) as exc_info:
        load_rows(train_file=path)
    message = one_line(exc_info)
    assert "no rows" in message and str(path) in message


def test_exactly_one_source(tmp_path):
    with pytest.raises(DataError, match="exactly one"):
        load_rows()
    with pytest.raises(DataError, match="exactly one"):
        load_rows(train_file=tmp_path / "a.jsonl", dataset_name="x/y")
    with pytest.raises(DataError, match="max_samples"):
        load_rows(train_file=tmp_path / "a.jsonl", max_samples=0)


def test_dataset_name_load_failure_is_one_line(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/data' on the Hub\n(offline)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError) as exc_info:
        load_rows(dataset_name="org/data", dataset_config="main", split="test")
    message = one_line(exc_info)
    assert "could not load dataset 'org/data'" in message
    assert "'main'" in message and "'test'" in message and "Couldn't reach" in message


def test_dataset_name_passes_arguments(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config, split, **kwargs):
        calls.append((name, config, split, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert (
        load_rows(dataset_name="org/data", dataset_config="cfg", split="validation", max_samples=2)
        == ROWS[:2]
    )
    assert calls == [("org/data", "cfg", "validation", {})]


def test_dataset_name_local_directory(tmp_path, monkeypatch):
    # Real datasets.load_dataset on a local folder: works offline. Keep its cache out of the home directory.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    assert load_rows(dataset_name=str(folder), split="train", max_samples=3) == ROWS[:3]
    with pytest.raises(DataError) as exc_info:
        load_rows(dataset_name=str(folder), split="nope")
    assert "could not load dataset" in one_line(exc_info)


# ----------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------


def test_chat_template_labels_cover_only_the_response(chat_tok):
    rows = [
        {"prompt": "What is the capital of France?", "completion": "Paris is the capital."},
        {"instruction": "Translate hello to French.", "input": "hello", "output": "bonjour"},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
        },
    ]
    ds = tokenize_rows(rows, chat_tok, max_seq_length=512)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    for row, example in zip(rows, ds):
        prompt, completion = to_prompt_completion(row, 0)
        assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])
        assert all(m == 1 for m in example["attention_mask"])
        assert chat_tok.decode(unmasked(example)) == completion + "<|im_end|>\n"
        n_prompt = n_masked(example)
        assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # masked part is a prefix
        # The prompt part is exactly what evaluation feeds the model.
        assert example["input_ids"][:n_prompt] == encode_prompt(prompt, chat_tok)
        assert chat_tok.decode(example["input_ids"][:n_prompt]) == format_prompt(prompt, chat_tok)
        assert format_prompt(prompt, chat_tok).endswith("<|im_start|>assistant\n")


def test_multi_turn_trains_only_final_assistant_turn(chat_tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    (example,) = tokenize_rows([{"messages": messages}], chat_tok, max_seq_length=512)
    assert chat_tok.decode(unmasked(example)) == "Paris<|im_end|>\n"
    assert "Hello there" in chat_tok.decode(example["input_ids"])


def test_no_chat_template_prompt_plus_completion_plus_eos(plain_tok):
    rows = [
        {"system": "Be brief.", "question": "What is the capital of France?", "answer": " Paris"},
        {"prompt": "The capital of France is", "completion": "Paris"},  # may merge across the boundary
    ]
    ds = tokenize_rows(rows, plain_tok, max_seq_length=512)
    assert (
        plain_tok.decode(ds[0]["input_ids"]) == "Be brief.\nWhat is the capital of France? Paris<|endoftext|>"
    )
    for row, example in zip(rows, ds):
        prompt, completion = to_prompt_completion(row, 0)
        assert plain_tok.decode(unmasked(example)) == completion + "<|endoftext|>"
        assert example["input_ids"][-1] == plain_tok.eos_token_id
        assert example["input_ids"][: n_masked(example)] == encode_prompt(prompt, plain_tok)
    assert format_prompt(to_prompt_completion(rows[0], 0).prompt, plain_tok) == (
        "Be brief.\nWhat is the capital of France?"
    )


def test_token_merge_across_the_boundary_falls_back(plain_tok):
    row = {"prompt": "What is the capital of Fran", "completion": "ce? Paris"}
    merged = plain_tok(row["prompt"] + row["completion"])["input_ids"]
    prompt_ids = encode_prompt(row["prompt"], plain_tok)
    assert merged[: len(prompt_ids)] != prompt_ids  # "Fran" + "ce" merge into one token
    (example,) = tokenize_rows([row], plain_tok, 512)
    assert example["input_ids"][: n_masked(example)] == prompt_ids
    assert plain_tok.decode(unmasked(example)) == "ce? Paris<|endoftext|>"


def test_no_chat_template_keeps_bos():
    tok = make_tokenizer(chat_template=None, bos=True)
    (example,) = tokenize_rows([{"prompt": "What is the capital?", "completion": " Paris"}], tok, 512)
    assert example["input_ids"][0] == tok.bos_token_id
    assert example["labels"][0] == IGNORE_INDEX
    assert tok.decode(unmasked(example)) == " Paris<|endoftext|>"
    assert encode_prompt("What is the capital?", tok)[0] == tok.bos_token_id


def test_template_prefix_mismatch_falls_back_to_separate_tokenization():
    tok = make_tokenizer(chat_template=THINK_TEMPLATE)
    (example,) = tokenize_rows([{"prompt": "What is the capital?", "completion": "Paris"}], tok, 512)
    n_prompt = n_masked(example)
    assert example["input_ids"][:n_prompt] == encode_prompt("What is the capital?", tok)
    assert tok.decode(example["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n<think>\n")
    assert tok.decode(unmasked(example)) == "Paris<|im_end|>"  # EOS appended


def test_truncation_from_the_right(chat_tok):
    row = {"prompt": "What is the capital of France?", "completion": "Paris is the capital of France. " * 5}
    (full,) = tokenize_rows([row], chat_tok, max_seq_length=1024)
    n_prompt = n_masked(full)
    max_len = n_prompt + 3
    (short,) = tokenize_rows([row], chat_tok, max_seq_length=max_len)
    assert len(short["input_ids"]) == len(short["labels"]) == len(short["attention_mask"]) == max_len
    assert short["input_ids"] == full["input_ids"][:max_len]
    assert short["labels"] == full["labels"][:max_len]
    assert len(unmasked(short)) == 3


def test_no_response_token_left_after_truncation(chat_tok):
    rows = [
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": "What is the capital of France? " * 10, "completion": "Paris"},
    ]
    n_prompt = len(encode_prompt(to_prompt_completion(rows[1], 1).prompt, chat_tok))
    with pytest.raises(DataError) as exc_info:
        tokenize_rows(rows, chat_tok, max_seq_length=n_prompt)
    message = one_line(exc_info)
    assert "row 1" in message
    assert f"{n_prompt} tokens" in message
    assert f"max_seq_length {n_prompt}" in message and "--max_seq_length" in message
    # One more token fits exactly one response token.
    ds = tokenize_rows(rows, chat_tok, max_seq_length=n_prompt + 1)
    assert len(unmasked(ds[1])) == 1


def test_tokenize_rows_reports_bad_rows_and_arguments(chat_tok):
    with pytest.raises(DataError) as exc_info:
        tokenize_rows([{"prompt": "Q", "completion": "A"}, {"foo": 1}], chat_tok, 64)
    assert "row 1" in one_line(exc_info)
    with pytest.raises(DataError, match="max_seq_length"):
        tokenize_rows([{"prompt": "Q", "completion": "A"}], chat_tok, 0)


def test_chat_template_errors_are_data_errors():
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    tok = make_tokenizer(chat_template=template)
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}
    with pytest.raises(DataError) as exc_info:
        tokenize_rows([row], tok, 64)
    message = one_line(exc_info)
    assert "row 0" in message and "System role not supported" in message


# ----------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------


def test_collator_pads_right_and_sets_pad_token():
    tok = make_tokenizer()
    tok.padding_side = "left"  # e.g. configured for batched generation
    assert tok.pad_token is None
    collator = make_collator(tok)
    assert tok.pad_token == tok.eos_token  # pad token set on the caller's tokenizer
    assert tok.padding_side == "left"  # ... whose padding side is left alone
    rows = [
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": "What is the capital of France?", "completion": "P"},
    ]
    ds = tokenize_rows(rows, tok, 128)
    batch = collator([ds[0], ds[1]])
    lengths = [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == ds[i]["input_ids"]
        assert batch["labels"][i, :n].tolist() == ds[i]["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (width - n)
    # Without attention_mask (e.g. dropped by Trainer column pruning) the collator rebuilds it.
    batch = collator([{k: ds[i][k] for k in ("input_ids", "labels")} for i in range(2)])
    assert batch["attention_mask"].sum().item() == sum(lengths)


def test_ensure_pad_token_keeps_existing():
    tok = make_tokenizer()
    tok.pad_token = "<|endoftext|>"
    assert data.ensure_pad_token(tok) is False
    assert tok.pad_token == "<|endoftext|>"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trl_sft_trainer_keeps_our_labels(tmp_path):
    """TRL's SFTTrainer treats a dataset with input_ids as processed and uses its labels column as is."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = make_tokenizer()
    rows = [
        {"prompt": "What is the capital of France?", "completion": "Paris"},
        {"prompt": "Hi", "completion": "Hey"},
    ]
    ds = tokenize_rows(rows, tok, 64)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    args = SFTConfig(
        output_dir=str(tmp_path), max_length=64, report_to=[], per_device_train_batch_size=2, use_cpu=True
    )
    trainer = SFTTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=ds, processing_class=tok)
    assert trainer.train_dataset["labels"] == ds["labels"]
    batch = next(iter(trainer.get_train_dataloader()))
    width = batch["labels"].shape[1]
    for i in range(2):
        n = len(ds[i]["labels"])
        assert batch["labels"][i].tolist() == ds[i]["labels"] + [IGNORE_INDEX] * (width - n)
