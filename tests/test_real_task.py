"""The real bases' task "extract" (lopt.builtin.real_task): splits, the strict JSON scorer, chat rendering and label masking,
no world facts in its words, the default task and recipe of a real base, and `lopt sft` / `lopt grpo` on it end to end
with the built-in tiny model (no download, no real model)."""

from __future__ import annotations

import json
import re

import pytest

from lopt.builtin.base import CHAT_TEMPLATE, train_tokenizer
from lopt.builtin.bases import base_of
from lopt.builtin.real_task import INSTRUCTION, MONTHS, WORD_LISTS, extract_items, json_match
from lopt.builtin.tasks import (
    BUILTIN_TASKS,
    EXTRACT_TASK,
    builtin_grpo_rows,
    builtin_task_rows,
    task_max_new_tokens,
    task_scorer,
)
from lopt.data.rows import IGNORE_INDEX, tokenize_rows
from lopt.training.rewards import REWARD_FUNCTIONS, json_match_reward

SPLITS = ("train", "validation", "test")
# SmolLM2-Instruct's template: a default system message unless the conversation brings its own.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def gold_of(row: dict) -> dict:
    return json.loads(row["completion"])


def test_extract_is_registered_with_its_own_scorer():
    assert EXTRACT_TASK == "extract" and EXTRACT_TASK in BUILTIN_TASKS
    assert task_scorer(EXTRACT_TASK) is json_match
    assert task_scorer("successor")("42.", "42")  # the toy tasks keep exact_match
    assert task_max_new_tokens(EXTRACT_TASK) > task_max_new_tokens("successor")


def test_splits_are_disjoint_deterministic_and_sized():
    rows = {split: builtin_task_rows(split, task=EXTRACT_TASK) for split in SPLITS}
    assert (
        len(rows["train"]) >= 3000
        and 250 <= len(rows["validation"]) <= 500
        and 250 <= len(rows["test"]) <= 500
    )
    sentences = {s: {r["prompt"][-1]["content"] for r in rows[s]} for s in SPLITS}
    records = {s: {r["completion"] for r in rows[s]} for s in SPLITS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not sentences[a] & sentences[b] and not records[a] & records[b], (a, b)
    assert all(len(records[s]) == len(rows[s]) for s in SPLITS)  # no record twice within a split either
    # Same arguments, same rows; the seed only reorders; n keeps a prefix.
    assert builtin_task_rows("test", task=EXTRACT_TASK) == rows["test"]
    shuffled = builtin_task_rows("test", seed=1, task=EXTRACT_TASK)
    assert shuffled != rows["test"] and sorted(map(str, shuffled)) == sorted(map(str, rows["test"]))
    assert builtin_task_rows("test", n=5, seed=1, task=EXTRACT_TASK) == shuffled[:5]
    # Rows are fresh objects: changing one never changes the task.
    rows["test"][0]["prompt"][0]["content"] = "changed"
    assert builtin_task_rows("test", task=EXTRACT_TASK)[0]["prompt"][0]["content"] == INSTRUCTION


def test_every_row_states_the_format_and_its_gold_follows_it():
    for row in builtin_task_rows("validation", task=EXTRACT_TASK):
        system, user = row["prompt"]
        assert system == {"role": "system", "content": INSTRUCTION} and user["role"] == "user"
        gold = gold_of(row)
        assert list(gold) == ["customer", "item", "quantity", "date"]
        assert isinstance(gold["quantity"], int) and gold["quantity"] >= 1
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", gold["date"]) and gold["item"] == gold["item"].lower()
        assert gold["customer"] in user["content"]  # the name is copied; the rest must be normalised


def test_sentences_vary_in_how_they_write_quantities_and_dates():
    sentences = [sentence for sentence, _, _ in extract_items()]
    assert any(re.search(r"\b(three|seven|eleven)\b", s) for s in sentences)  # quantities as words
    assert any(re.search(r"\ban? [a-z]", s) for s in sentences)  # "a lamp", "an umbrella"
    assert any(re.search(r"\b\d+(st|nd|rd|th) of [A-Z]", s) for s in sentences)  # "the 3rd of May 2023"
    assert any(re.search(r"\b[A-Z][a-z]{2} \d+, \d{4}", s) for s in sentences)  # "Sep 3, 2023"
    assert len({s.split()[0] for s in sentences}) > 20  # many templates and names lead


def test_scorer_accepts_the_gold_and_rejects_near_misses():
    gold = '{"customer": "Maya Okafor", "item": "desk lamp", "quantity": 3, "date": "2023-03-14"}'
    assert json_match(gold, gold)
    assert json_match("  " + gold + "\n", gold)  # outer whitespace
    assert json_match('{"date":"2023-03-14","quantity":3,"item":"desk lamp","customer":"Maya Okafor"}', gold)
    near_misses = [
        gold.replace("3,", '"3",'),  # a string, not an integer
        gold.replace("3,", "3.0,"),  # a float
        gold.replace("desk lamp", "desk lamps"),  # not singular
        gold.replace("desk lamp", "Desk lamp"),
        gold.replace("2023-03-14", "March 14, 2023"),
        gold.replace("2023-03-14", "2023-3-14"),
        gold.replace("Maya Okafor", "maya okafor"),
        gold.replace(', "date": "2023-03-14"', ""),  # a key missing
        gold[:-1] + ', "note": ""}',  # an extra key
        gold + " Done.",  # text after the object
        "```json\n" + gold + "\n```",  # a code fence
        gold[:-1],  # not valid JSON
        "[" + gold + "]",  # not an object
        "",
    ]
    for prediction in near_misses:
        assert not json_match(prediction, gold), prediction
    with pytest.raises(ValueError, match="reference"):
        json_match(gold, "not json")


def test_grpo_rows_and_reward_use_the_scorer():
    rows = builtin_grpo_rows("train", n=3, task=EXTRACT_TASK)
    train = builtin_task_rows("train", n=3, task=EXTRACT_TASK)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in train]
    assert [r["answer"] for r in rows] == [r["completion"] for r in train]
    answers = [r["answer"] for r in rows]
    completions = [answers[0], [{"role": "assistant", "content": answers[1]}], answers[2].replace(":", "=")]
    assert json_match_reward(None, completions, answer=answers) == [1.0, 1.0, 0.0]
    assert REWARD_FUNCTIONS["json_match"] is json_match_reward


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, SMOL_TEMPLATE], ids=["builtin", "smollm2"])
def test_rows_render_with_the_chat_template_and_train_on_the_answer_only(template):
    rows = builtin_task_rows("train", n=16, task=EXTRACT_TASK)
    texts = [json.dumps(r) for r in builtin_task_rows("train", n=200, task=EXTRACT_TASK)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    tokenizer.chat_template = template
    dataset = tokenize_rows(rows, tokenizer, max_seq_length=1024)
    for row, ids, labels in zip(rows, dataset["input_ids"], dataset["labels"]):
        text = tokenizer.decode(ids)
        n_prompt = labels.count(IGNORE_INDEX)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in labels[n_prompt:]
        prompt, answer = tokenizer.decode(ids[:n_prompt]), tokenizer.decode(labels[n_prompt:])
        assert prompt.endswith("<|im_start|>assistant\n")
        assert (
            f"<|im_start|>system\n{INSTRUCTION}<|im_end|>" in prompt
        )  # the instruction replaces any default
        assert "helpful AI assistant" not in text and row["prompt"][1]["content"] in prompt
        assert answer.startswith(
            row["completion"] + "<|im_end|>"
        )  # the JSON and the end of the turn, trained
        assert row["completion"] not in prompt


# countryinfo names currencies by their codes only.
CURRENCY_NAMES = (
    "dollar euro pound yen yuan renminbi rupee peso franc krona krone real rand ruble rouble lira dinar dirham won "
    "shilling zloty forint baht ringgit rupiah dong naira cedi kwacha riyal rial taka lek lev leu kuna hryvnia lari"
).split()
COUNTRY_FIELDS = ("name", "capital", "demonym", "alt_spellings", "native_name", "provinces", "currencies")


def country_words() -> set[str]:
    """Every word of at least three letters in a country's name, capital, demonym, other spellings, regions or
    currency (codes, plus the common currency names): what a knowledge probe about countries can ask."""
    countryinfo = pytest.importorskip("countryinfo")
    words: set[str] = set(CURRENCY_NAMES)
    for country in countryinfo.all_countries():
        for field in COUNTRY_FIELDS:
            try:
                value = getattr(country, field)()
            except Exception:  # countryinfo raises on a field a country lacks
                continue
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str):
                    words.update(w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3)
    return words


def test_no_word_of_the_task_is_a_country_fact():
    known = country_words()
    assert {"paris", "french", "jordan", "eur"} <= known  # the reference list is real
    lists = {name: {w.lower() for x in words for w in x.split()} for name, words in WORD_LISTS.items()}
    content = set().union(*(words for name, words in lists.items() if name != "template_words"))
    assert not content & known, sorted(content & known)
    # Function words ("the", "new", "with") and abbreviated months ("Mar 3, 2023") also occur in place names.
    common = {"the", "new", "with"} | {month[:3].lower() for month in MONTHS}
    assert lists["template_words"] & known <= common
    for sentence, _, _ in extract_items():
        assert not any(symbol in sentence for symbol in "$€£¥"), sentence
        words = {w for w in re.findall(r"[a-z]+", sentence.lower()) if len(w) >= 3}
        assert words & known <= common, sentence
    assert set(re.findall(r"[a-z]+", INSTRUCTION.lower())) & known <= common


def test_a_real_base_defaults_to_extract_and_its_recipe(tmp_path, monkeypatch):
    from lopt.builtin.hub_bases import METADATA_FILE
    from lopt.cli import grpo, sft
    from lopt.training.rewards import reward_function

    assert base_of(None).default_task == "successor"
    assert base_of("smollm2-135m").default_task == EXTRACT_TASK and base_of("smollm2-135m").kind == "real"
    converted, other = tmp_path / "converted", tmp_path / "other"
    converted.mkdir(), other.mkdir()
    (converted / METADATA_FILE).write_text("{}")
    assert base_of(str(converted)).default_task == EXTRACT_TASK and base_of(str(other)).default_task is None

    real = base_of("smollm2-135m").recipe("sft", EXTRACT_TASK)
    parsed, _ = sft.make_parser().parse(["--model_name_or_path", "smollm2-135m"], sft.recipe)
    training_args = parsed[-1]
    for name, value in real.values.items():
        assert getattr(training_args, name) == value, name
    assert "bf16" not in real.values  # precision is not the task's: see test_default_precision
    # LoPT on a real base's task: the local task objective plus the anchor, clipped per block
    lopt_args = parsed[0]
    assert real.lopt_objective["aux_objective"] == "task+anchor"
    for name, value in real.lopt_objective.items():
        assert getattr(lopt_args, name) == value, name
    for flags, objective, clip in (
        (["--aux_objective", "recon"], "recon", False),  # the user's objective: nothing of the bundle
        (["--method", "e2e"], "recon", False),  # not LoPT: untouched
        (["--optimizer_in_backward"], "task+anchor", False),  # oib clips per parameter already
    ):
        parsed, _ = sft.make_parser().parse(["--model_name_or_path", "smollm2-135m", *flags], sft.recipe)
        assert (parsed[0].aux_objective, parsed[0].clip_per_block) == (objective, clip), flags
    parsed, _ = sft.make_parser().parse(["--model_name_or_path", "smollm2-135m", "--fp16"], sft.recipe)
    assert parsed[-1].fp16 and not parsed[-1].bf16  # the user's --fp16 replaces the recipe's bf16
    parsed, _ = sft.make_parser().parse([], sft.recipe)
    assert (
        parsed[-1].learning_rate == base_of(None).recipe("sft", "successor").values["learning_rate"] == 1e-3
    )
    parsed, _ = sft.make_parser().parse(
        ["--model_name_or_path", "smollm2-135m", "--train_file", "x.jsonl"], sft.recipe
    )
    assert parsed[-1].max_steps == -1  # the user's data: one epoch, not the task's recipe
    parsed, _ = grpo.make_parser().parse(["--model_name_or_path", "smollm2-135m"], grpo.recipe)
    assert (parsed[-1].num_generations, parsed[-1].per_device_train_batch_size) == (4, 8)
    # GRPO batches have no labels: the real base's LoPT objective there is the anchor, clipped per block
    assert (parsed[0].aux_objective, parsed[0].clip_per_block) == ("anchor", True)
    assert reward_function("auto", EXTRACT_TASK) is json_match_reward
    for flags, objective, clip in (
        (["--lambda_aux", "3"], "recon", False),  # the user's objective: nothing of the bundle
        (["--method", "e2e"], "recon", False),
        (["--optimizer_in_backward"], "anchor", False),
    ):
        parsed, _ = grpo.make_parser().parse(["--model_name_or_path", "smollm2-135m", *flags], grpo.recipe)
        assert (parsed[0].aux_objective, parsed[0].clip_per_block) == (objective, clip), flags


def test_grpo_completion_budget_follows_the_answers():
    from lopt.training.rl import completion_budget

    answers = [row["answer"] for row in builtin_grpo_rows("train", task=EXTRACT_TASK)]
    tokenizer = train_tokenizer(answers[:200], vocab_size=400)
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    budget = completion_budget(answers, tokenizer)
    assert longest + 1 < budget <= (longest + 1) * 1.25 + 1  # the answer, its end token and a quarter more
    assert completion_budget(["{}"], tokenizer) < budget  # from the rows, not a constant
    with pytest.raises(ValueError):
        completion_budget([], tokenizer)


def test_the_end_of_run_line_states_shares_with_their_counts():
    from lopt.evaluation.evaluate import Score, summary_line, summary_record

    summary = {
        "method": "lopt",
        "train_loss": 0.41234,
        "steps": 40,
        "heldout_exact_match": Score(188, 200),
        "knowledge_kept": Score(181, 208),
    }
    assert summary_line(summary) == (
        "test accuracy 94.0% (188/200) · knowledge kept 87.0% (181/208) · 40 steps"
    )
    record = summary_record(summary)  # summary.json keeps the shares, as lopt compare reads them
    assert record["heldout_exact_match"] == 0.94 and record["knowledge_kept"] == 181 / 208
    assert record["method"] == "lopt" and record["steps"] == 40
    json.dumps(record)
    none = "none (the base answers no item right)"
    grpo = {
        "reward_first_log": 0.03,
        "reward_last_log": 0.128,
        "heldout_exact_match": 0.5,
        "knowledge_kept": none,
    }
    assert summary_line(grpo) == f"test accuracy 50.0% · knowledge kept {none} · reward 0.03 -> 0.128"


@pytest.mark.parametrize("command", ["sft", "grpo", "dpo"])
def test_default_precision_is_fp32_on_a_cpu_whatever_its_bf16_units(monkeypatch, command):
    """On a CPU bf16 autocast is the user's choice: a CPU with bf16 units (avx512_bf16, AMX) trains the real base's
    recipe in fp32 like one without, so results do not depend on the CPU. On a GPU the default is bf16."""
    import importlib

    import torch

    from lopt.training import recipes
    from lopt.training.arguments import bf16_by_default

    module = importlib.import_module(f"lopt.cli.{command}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: True, raising=False)
    base = ["--model_name_or_path", "smollm2-135m"]
    parsed, _ = module.make_parser().parse(base, module.recipe)
    assert parsed[-1].bf16 is False and parsed[-1].fp16 is False
    parsed, set_fields = module.make_parser().parse([*base, "--bf16", "true"], module.recipe)
    assert parsed[-1].bf16 is True and "bf16" in set_fields  # asked for: bf16 on a CPU too

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bf16_by_default()
    values = {"method": "lopt", "gradient_checkpointing": False, "model_name_or_path": "smollm2-135m"}
    assert recipes.base_recipe(command, values, frozenset())["bf16"] is True  # a GPU: bf16 autocast
    assert "bf16" not in recipes.base_recipe(
        command, values, frozenset({"fp16"})
    )  # the user's --fp16 instead


def test_check_data_chooses_and_refuses_tasks_by_model():
    from types import SimpleNamespace

    from lopt.errors import UserError
    from lopt.training.arguments import DataArguments
    from lopt.training.checks import check_data

    def check(model, tasks=tuple(BUILTIN_TASKS), **data):
        return check_data("sft", SimpleNamespace(model_name_or_path=model), DataArguments(**data), tasks)

    assert check("smollm2-135m") == EXTRACT_TASK
    assert check(None) == "successor"
    assert check("some/model", task=EXTRACT_TASK) == EXTRACT_TASK  # any chat model may train on extract
    assert check(None, task=EXTRACT_TASK) == EXTRACT_TASK
    assert check("smollm2-135m", train_file="x.jsonl") is None
    with pytest.raises(UserError, match="made for the built-in model"):
        check("smollm2-135m", task="successor")
    with pytest.raises(UserError, match="--task extract"):
        check("some/model")
    with pytest.raises(UserError, match="no built-in task for smollm2-135m"):
        check("smollm2-135m", tasks=("successor",))  # e.g. lopt dpo, which has no extract rows


def test_check_data_takes_the_task_a_checkpoint_records():
    """`lopt grpo --model_name_or_path <a checkpoint of lopt sft>`: its records name the task and base."""
    from types import SimpleNamespace

    from lopt.builtin.bases import BUILTIN, REAL_BASE_OBJECTS
    from lopt.errors import UserError
    from lopt.evaluation.evaluate import ScoringDefaults
    from lopt.training.arguments import DataArguments
    from lopt.training.checks import check_data

    def check(recorded, **data):
        model = SimpleNamespace(model_name_or_path="runs/sft-lopt")
        return check_data("grpo", model, DataArguments(**data), (*BUILTIN_TASKS, "gsm8k"), recorded)

    smollm2 = REAL_BASE_OBJECTS["smollm2-135m"]
    real = ScoringDefaults("totals", smollm2, "lopt_args.json: trained from smollm2-135m, task totals")
    assert check(real) == "totals"
    assert check(real, task=EXTRACT_TASK) == EXTRACT_TASK  # --task wins
    assert check(real, train_file="x.jsonl") is None
    with pytest.raises(UserError, match="made for the built-in model"):
        check(real, task="successor")
    builtin = ScoringDefaults("successor", BUILTIN, "lopt_args.json: trained from the built-in model")
    assert check(builtin) == "successor"
    assert (
        check(builtin, task="successor") == "successor"
    )  # a checkpoint of the built-in model may take its tasks
    unknown = ScoringDefaults(
        None, smollm2, "lopt_args.json: trained from smollm2-135m on x.jsonl, not a built-in task"
    )
    with pytest.raises(UserError) as error:
        check(unknown)
    message = str(error.value)
    assert "\n" not in message and "cannot tell the task of --model_name_or_path runs/sft-lopt" in message
    assert "on x.jsonl, not a built-in task" in message and "--task (extract, totals, gsm8k)" in message


def test_sft_then_grpo_on_extract_end_to_end(builtin_tiny, tmp_path):
    """The README's main job, then GRPO from its checkpoint with no --task, on a stand-in real base (the built-in tiny
    model marked as a converted real base): the task comes from the checkpoint's records, the recipe is the real
    base's (anchor objective, early rate 0.3x, completions as long as the answers need), and the run ends with the
    held-out accuracy and the knowledge kept, as `lopt sft` does there."""
    import shutil

    from test_cli_sft import lopt, read_metrics
    from transformers import AutoTokenizer

    from lopt.builtin.base import METADATA_FILE as BUILTIN_METADATA
    from lopt.builtin.hub_bases import METADATA_FILE as REAL_BASE_METADATA
    from lopt.training.rl import completion_budget

    standin = tmp_path / "standin"
    shutil.copytree(builtin_tiny["path"], standin)
    (standin / BUILTIN_METADATA).unlink()
    (standin / REAL_BASE_METADATA).write_text("{}")
    fast = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--max_samples", "32", "--no_progress"]
    out = tmp_path / "sft"
    # max_length: the toy tokenizer makes ~150-token rows of this task (SmolLM2's ~110).
    args = ["sft", "--model_name_or_path", str(standin), "--method", "e2e", "--max_length", "192"]
    args += ["--eval_samples", "8", *fast]
    proc = lopt([*args, "--logging_steps", "1", "--output_dir", str(out)], builtin_tiny["env"])
    assert "task=extract" in proc.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and 0.0 <= summary["heldout_exact_match"] <= 1.0
    # the run ends with one readable line: the share with its count, as summary.json has it
    correct = round(summary["heldout_exact_match"] * 8)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"lopt sft: test accuracy {100 * summary['heldout_exact_match']:.1f}% ({correct}/8) · knowledge kept "
    ), last
    assert last.endswith(" · 3 steps"), last

    grpo_out = tmp_path / "grpo"
    argv = ["grpo", "--model_name_or_path", str(out), "--logging_steps", "1", *fast]
    argv += ["--num_generations", "2", "--eval_samples", "4"]
    proc = lopt([*argv, "--output_dir", str(grpo_out)], builtin_tiny["env"])
    assert "task=extract" in proc.stderr and "reward=json_match_reward" in proc.stderr
    assert "aux_objective=anchor" in proc.stderr
    summary = json.loads((grpo_out / "summary.json").read_text())
    assert summary["task"] == "extract" and summary["reward_function"] == "json_match_reward"
    assert summary["steps"] == 3 and 0.0 <= summary["heldout_exact_match"] <= 1.0
    kept = summary["knowledge_kept"]  # a share, or a sentence when the tiny base knows no fact
    assert (isinstance(kept, float) and 0.0 <= kept <= 1.0) or kept.startswith("none"), kept
    answers = [row["answer"] for row in builtin_grpo_rows("train", n=32, task=EXTRACT_TASK)]
    budget = completion_budget(answers, AutoTokenizer.from_pretrained(out))
    assert json.loads((grpo_out / "training_args.json").read_text())["max_completion_length"] == budget
    assert f"up to {budget} tokens" in proc.stderr
    for m in read_metrics(grpo_out):
        assert m["lr_early"] == pytest.approx(0.3 * m["lr_late"])
