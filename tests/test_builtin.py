"""Tests of the embedded default: the built-in base model and the built-in narrow task."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lopt.builtin import base as builtin
from lopt.builtin import tasks
from lopt.builtin.base import builtin_model_path, preset_config, retention_texts
from lopt.builtin.tasks import builtin_task_rows, exact_match, normalize_answer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Built once per module into a private cache; the "tiny" preset builds in seconds.
    return builtin_model_path("tiny", cache_dir=tmp_path_factory.mktemp("lopt-cache"), progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


def test_tiny_checkpoint_loads(tiny_dir, tiny):
    model, tok = tiny
    assert model.config.model_type == "llama"
    assert {"config.json", "model.safetensors", builtin.METADATA_FILE} <= {p.name for p in tiny_dir.iterdir()}
    assert tok.eos_token == "<|endoftext|>"
    assert tok.pad_token is not None
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    # Generation must stop on either end-of-turn marker.
    assert set(model.generation_config.eos_token_id) == {
        tok.eos_token_id,
        tok.convert_tokens_to_ids("<|im_end|>"),
    }


def test_cache_hit_returns_same_dir_without_rebuilding(tiny_dir):
    stamp = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    again = builtin_model_path("tiny", cache_dir=tiny_dir.parent, progress=False)
    assert again == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == stamp
    # Only the finished folder and its lock remain: no half-built temporaries.
    assert sorted(p.name for p in tiny_dir.parent.iterdir()) == sorted(
        [tiny_dir.name, tiny_dir.name + ".lock"]
    )


def test_chat_template(tiny):
    _, tok = tiny
    assert tok.chat_template
    user = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "42"}], tokenize=False)
    # The prompt is a prefix of the full conversation, and the assistant turn ends with the stop tokens.
    assert full == prompt + "42<|im_end|><|endoftext|>"
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[-2:] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]


def test_digits_are_single_tokens(tiny):
    _, tok = tiny
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    assert tok.decode(tok("What is 7 + 35?")["input_ids"]) == "What is 7 + 35?"


def test_heldout_perplexity_far_below_uniform(tiny_dir, tiny):
    model, tok = tiny
    meta = json.loads((tiny_dir / builtin.METADATA_FILE).read_text())
    assert meta["preset"] == "tiny" and meta["version"] == builtin.BUILTIN_VERSION
    assert meta["heldout_ppl"] < model.config.vocab_size / 5
    # Re-measure from the saved weights on a few retention texts: they really are trained.
    ids = []
    for text in retention_texts("tiny")[:8]:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    seq = model.config.max_position_embeddings
    rows = torch.tensor(ids[: (len(ids) // seq) * seq]).view(-1, seq)
    assert len(rows) > 0
    assert builtin.heldout_perplexity(model, rows) < model.config.vocab_size / 5


def test_tiny_model_generates(tiny):
    model, tok = tiny
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    batch = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_tokenizer_training_is_deterministic():
    docs = [text for _, text in builtin.pretraining_documents()[:40]]
    first = builtin.train_tokenizer(docs, vocab_size=512)
    second = builtin.train_tokenizer(docs, vocab_size=512)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    for i, token in enumerate(builtin.SPECIAL_TOKENS):
        assert first.convert_tokens_to_ids(token) == i


def test_retention_texts_are_held_out_and_deterministic():
    texts = retention_texts()
    assert texts == retention_texts()
    assert len(texts) >= 20 and all(t.strip() for t in texts)
    docs = builtin.pretraining_documents()
    heldout = [doc_id for doc_id, _ in docs if builtin._is_heldout(doc_id)]
    assert 0.02 < len(heldout) / len(docs) < 0.1
    # Every retention piece comes from a held-out document, never from a training one.
    train_text = "\n".join(text for doc_id, text in docs if not builtin._is_heldout(doc_id))
    assert not any(t in train_text for t in texts if len(t) > 200)


@pytest.mark.parametrize("task", sorted(tasks.BUILTIN_TASKS))
def test_task_rows_deterministic_and_disjoint(task):
    train, val, test = (builtin_task_rows(s, task=task) for s in ("train", "validation", "test"))
    assert train == builtin_task_rows("train", task=task) and test == builtin_task_rows("test", task=task)
    assert all(set(r) == {"prompt", "completion"} for r in train + val + test)
    assert len(train) >= 500 and len(val) >= 50 and len(test) >= 100
    # A prompt is a string or, for a chat task (extract), a list of messages: compare them as JSON text.
    prompts = [{json.dumps(r["prompt"], sort_keys=True) for r in rows} for rows in (train, val, test)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    # `seed` changes the order and the subset taken, never the split itself.
    shuffled = builtin_task_rows("train", seed=1, task=task)
    assert shuffled != train and sorted(shuffled, key=str) == sorted(train, key=str)
    assert builtin_task_rows("test", n=10, seed=3) == builtin_task_rows("test", seed=3)[:10]
    with pytest.raises(ValueError, match="split"):
        builtin_task_rows("dev")
    with pytest.raises(ValueError, match="unknown built-in task"):
        builtin_task_rows(task="nope")


def test_task_answers_are_correct():
    rows = builtin_task_rows("train") + builtin_task_rows("validation") + builtin_task_rows("test")
    assert len(rows) == tasks.TASK_MAX_N + 1
    for row in rows:
        number = int(row["prompt"].removeprefix("What number comes after ").removesuffix("?"))
        assert row["completion"] == str(number + 1) == tasks.task_answer(row["prompt"])
    with pytest.raises(ValueError):
        tasks.task_answer("What is 2 + 2?")


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("42", "42", True),
        ("  42\n", "42", True),
        ("42.", "42", True),
        ("Hello   World", "hello world", True),
        ("421", "42", False),
        ("4 2", "42", False),
        ("", "42", False),
    ],
)
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_normalize_answer():
    assert normalize_answer("  Foo\tBar. ") == "foo bar"


def test_default_preset_config_shape():
    config = preset_config("default")
    assert isinstance(config, LlamaConfig)
    assert config.num_hidden_layers >= 8 and config.num_hidden_layers % 2 == 0
    with torch.device("meta"):  # count parameters without allocating or training
        n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert 1e6 < n_params < 10e6


def test_preset_selection(monkeypatch):
    monkeypatch.setenv("LOPT_BUILTIN_PRESET", "tiny")
    assert preset_config().hidden_size == builtin.PRESETS["tiny"].hidden_size
    monkeypatch.delenv("LOPT_BUILTIN_PRESET")
    assert preset_config().hidden_size == builtin.PRESETS["default"].hidden_size
    with pytest.raises(ValueError):
        preset_config("huge")


def test_code_documents_never_include_heldout_modules():
    code = builtin.code_documents()
    assert len(code) > 100 and code == builtin.code_documents()
    heldout = [
        text
        for doc_id, text in builtin.pretraining_documents()
        if doc_id.startswith("stdlib:") and builtin._is_heldout(doc_id)
    ]
    # A held-out module's docstrings must not reach training through its source code.
    long_paragraphs = [p for text in heldout for p in text.split("\n\n")[1:] if len(p) > 300][:10]
    assert len(long_paragraphs) == 10
    joined = " ".join(" ".join(code).split())
    assert not any(" ".join(p.split()[:30]) in joined for p in long_paragraphs)


def test_code_fraction_mixes_code_into_every_batch(tmp_path, monkeypatch):
    # The evidence preset's recipe at tiny size: half of each batch from source code (a few files, to stay fast).
    tiny = builtin.PRESETS["tiny"]
    recipe = builtin.Preset(**{**tiny.__dict__, "steps": 30, "code_fraction": 0.5})
    monkeypatch.setitem(builtin.PRESETS, "tiny-code", recipe)
    monkeypatch.setattr(builtin, "code_documents", _few_code_files)
    path = builtin_model_path("tiny-code", cache_dir=tmp_path, progress=False)
    meta = json.loads((path / builtin.METADATA_FILE).read_text())
    assert meta["train_code_tokens"] > 0 and meta["recipe"]["code_fraction"] == 0.5
    assert meta["heldout_ppl"] < recipe.vocab_size  # it trained


def _few_code_files() -> list[str]:
    import inspect
    import json as json_module
    import textwrap

    return [inspect.getsource(json_module.decoder), inspect.getsource(textwrap)]


def test_evidence_preset_shape():
    config = preset_config("evidence")
    assert config.num_hidden_layers == 16 and config.hidden_size % config.num_attention_heads == 0
    assert builtin.PRESETS["evidence"].code_fraction > 0


def test_modules_task_asks_only_sft_facts():
    from lopt.builtin.knowledge import knowledge_facts, knowledge_items

    probe = {(f.name, f.module) for f in knowledge_facts("probe")}
    rows = [r for s in ("train", "validation", "test") for r in builtin_task_rows(s, task="modules")]
    assert (
        len(knowledge_facts("sft")) - 5 <= len(rows) <= len(knowledge_facts("sft"))
    )  # a few skipped (below)
    by_key = {f.key: f for f in knowledge_facts("probe")}
    probe_sentences = {by_key[row["id"]].summary for row in knowledge_items()}
    for row in rows:
        name = row["prompt"].rsplit(" ", 1)[-1].removesuffix("?")
        assert (name, row["completion"]) not in probe  # the retention probe stays held out
        # ... and no prompt shows a probe item's sentence (methods share docstrings with top-level names)
        assert row["prompt"].split("\n")[0] not in probe_sentences
    assert any(" method " in row["prompt"] for row in rows)  # methods are facts too (most of the items)


def test_a_method_fact_has_its_class_role():
    from lopt.builtin.knowledge import Fact, fact_role, knowledge_facts

    methods = [f for f in knowledge_facts() if f.is_method]
    assert len(methods) > 1000
    for fact in methods[:200]:
        owner = Fact(fact.name.split(".")[0], fact.module, "class", "")
        assert fact_role(fact) == fact_role(owner)  # a class and its methods are never split between roles
