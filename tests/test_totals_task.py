"""The real bases' second task "totals" (lopt.builtin.totals_task): gold counts recomputed from the notes, splits, the
strict JSON scorer, chat prompts with its own instruction, no world facts in its words, its registration and recipes,
and `lopt sft --task totals` end to end with the built-in tiny model."""

from __future__ import annotations

import collections
import json
import re

import pytest

from lopt.builtin import totals_task
from lopt.builtin.bases import base_of
from lopt.builtin.real_task import FIRST_NAMES, ITEMS, NUMBER_WORDS, SURNAMES, json_match
from lopt.builtin.tasks import (
    BUILTIN_TASKS,
    EXTRACT_TASK,
    REAL_BASE_TASKS,
    TOTALS_TASK,
    builtin_grpo_rows,
    builtin_task_rows,
    task_max_new_tokens,
    task_scorer,
)
from lopt.builtin.totals_task import INSTRUCTION, totals_items
from lopt.training.rewards import json_match_reward

SPLITS = ("train", "validation", "test")
# One line of a note: a quantity (digits, a number word, "a"/"an"), an item, a unit price.
LINE = re.compile(
    rf"\b(\d+|an?|{'|'.join(NUMBER_WORDS)}) ([a-z]+(?: [a-z]+)?) (?:at|for) (\d+) (?:each|apiece)\b"
)
SINGULAR = {word: singular for singular, plural in ITEMS for word in (singular, plural)}


def quantity_of(word: str) -> int:
    if word.isdigit():
        return int(word)
    return 1 if word in ("a", "an") else NUMBER_WORDS.index(word) + 1


def parse_note(note: str) -> tuple[str, list[tuple[str, int, int]]]:
    """The customer and the (item, quantity, price) lines of a note, read from its text alone."""
    names = re.findall(rf"\b(?:{'|'.join(FIRST_NAMES)}) (?:{'|'.join(SURNAMES)})\b", note)
    assert len(names) == 1, note
    lines = [(SINGULAR[item], quantity_of(q), int(price)) for q, item, price in LINE.findall(note)]
    return names[0], lines


def test_totals_is_registered_as_a_real_base_chat_task():
    assert totals_task.TOTALS_TASK == TOTALS_TASK == "totals" and TOTALS_TASK in BUILTIN_TASKS
    assert REAL_BASE_TASKS == (EXTRACT_TASK, TOTALS_TASK)
    assert task_scorer(TOTALS_TASK) is json_match
    assert task_max_new_tokens(TOTALS_TASK) == totals_task.MAX_NEW_TOKENS == 48
    assert base_of("smollm2-135m").default_task == EXTRACT_TASK  # a real base still defaults to extract


def record_key(note: str) -> str:
    """A record, read from its note: the customer and the set of lines, whatever the wording or order."""
    customer, lines = parse_note(note)
    return json.dumps([customer, sorted(lines)])


def test_gold_counts_are_right():
    items = totals_items()
    for note, completion, _ in items:
        gold = json.loads(completion)
        assert list(gold) == ["customer", "items"] and type(gold["items"]) is int, completion
        customer, lines = parse_note(note)
        assert len(lines) == len(re.findall(r"\b(?:each|apiece)\b", note)), note  # every line was read
        assert 2 <= len(lines) <= 3 and len({item for item, _, _ in lines}) == len(lines), note
        assert all(1 <= q <= 6 and 2 <= price <= 20 for _, q, price in lines), note
        assert gold == {"customer": customer, "items": sum(q for _, q, _ in lines)}, note
    counts = collections.Counter(json.loads(c)["items"] for _, c, _ in items)
    assert min(counts) == 2 and max(counts) == 18
    assert max(counts.values()) < 0.15 * len(
        items
    )  # no one count is right often: a constant guess scores little


def test_notes_vary_in_form():
    notes = [note for note, _, _ in totals_items()]
    assert any("\n- " in n for n in notes) and any("\n" not in n for n in notes)  # list and sentence forms
    assert any(re.search(r"\b(two|five|six) [a-z]", n) for n in notes)  # quantities as words
    assert any(re.search(r"\ban? [a-z]", n) for n in notes)  # "a mug", "an umbrella"
    assert {len(LINE.findall(n)) for n in notes} == {2, 3}
    assert len({n.split()[0] for n in notes}) > 20  # many templates and names lead


def test_splits_are_disjoint_deterministic_and_sized():
    rows = {split: builtin_task_rows(split, task=TOTALS_TASK) for split in SPLITS}
    assert [len(rows[s]) for s in SPLITS] == [3997, 310, 293]
    keys = {s: {record_key(r["prompt"][-1]["content"]) for r in rows[s]} for s in SPLITS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not keys[a] & keys[b], (a, b)
    assert all(len(keys[s]) == len(rows[s]) for s in SPLITS)  # no record twice within a split either
    # Same arguments, same rows; the seed only reorders; n keeps a prefix.
    assert builtin_task_rows("test", task=TOTALS_TASK) == rows["test"]
    shuffled = builtin_task_rows("test", seed=1, task=TOTALS_TASK)
    assert shuffled != rows["test"] and sorted(map(str, shuffled)) == sorted(map(str, rows["test"]))
    assert builtin_task_rows("test", n=5, seed=1, task=TOTALS_TASK) == shuffled[:5]
    assert totals_items.__wrapped__() == totals_items()  # generated afresh, the same items


def test_rows_are_chat_prompts_with_the_totals_instruction():
    extract_instruction = builtin_task_rows("test", n=1, task=EXTRACT_TASK)[0]["prompt"][0]["content"]
    assert INSTRUCTION != extract_instruction
    for row in builtin_task_rows("validation", task=TOTALS_TASK):
        system, user = row["prompt"]
        assert system == {"role": "system", "content": INSTRUCTION} and user["role"] == "user"
        assert json.loads(row["completion"])["customer"] in user["content"]
    for word in ("JSON", "customer", "items", "integer", "sum of the quantities", "prices do not count"):
        assert word in INSTRUCTION
    rows = builtin_grpo_rows("train", n=3, task=TOTALS_TASK)
    assert [r["answer"] for r in rows] == [
        r["completion"] for r in builtin_task_rows("train", n=3, task=TOTALS_TASK)
    ]


def test_scorer_is_strict_json():
    gold = '{"customer": "Maya Okafor", "items": 5}'
    score = task_scorer(TOTALS_TASK)
    assert score(gold, gold) and score(' {"items":5,"customer":"Maya Okafor"}\n', gold)
    for wrong in (
        '{"customer": "Maya Okafor", "items": 6}',  # a wrong count
        '{"customer": "Maya Okafor", "items": "5"}',  # a string, not an integer
        '{"customer": "Maya Okafor", "items": 5.0}',  # a float
        '{"customer": "Maya Okafor"}',  # a key missing
        '{"customer": "Maya Okafor", "items": 5, "currency": ""}',  # an extra key
        "There are 5 items.",
        "",
    ):
        assert not score(wrong, gold), wrong
    assert json_match_reward(
        None, [gold, '{"customer": "Maya Okafor", "items": 4}'], answer=[gold, gold]
    ) == [1.0, 0.0]


def test_no_word_of_the_task_is_a_country_fact():
    from test_real_task import country_words

    known = country_words()
    common = {"the", "and", "with"}  # function words, which also occur in place names ("Trinidad and Tobago")
    for note, _, _ in totals_items():
        assert not any(symbol in note for symbol in "$€£¥"), note
        assert {w for w in re.findall(r"[a-z]+", note.lower()) if len(w) >= 3} & known <= common, note
    assert set(re.findall(r"[a-z]+", INSTRUCTION.lower())) & known <= common


def test_sft_and_grpo_parse_totals_with_the_real_base_recipes():
    from types import SimpleNamespace

    from lopt.cli import grpo, sft
    from lopt.errors import UserError
    from lopt.training.arguments import DataArguments
    from lopt.training.checks import check_data
    from lopt.training.rewards import reward_function

    argv = ["--model_name_or_path", "smollm2-135m", "--task", TOTALS_TASK]
    parsed, _ = sft.make_parser().parse(argv, sft.recipe)
    assert parsed[2].task == TOTALS_TASK
    for name in ("learning_rate", "per_device_train_batch_size", "max_length"):
        assert (
            getattr(parsed[-1], name) == base_of("smollm2-135m").recipe("sft", EXTRACT_TASK).values[name]
        ), name
    assert (
        parsed[-1].max_steps == 150
    )  # totals needs more steps than extract's 40 (smollm2-135m/sft-totals.yaml)
    parsed, _ = sft.make_parser().parse([*argv, "--max_steps", "7"], sft.recipe)
    assert parsed[-1].max_steps == 7  # the user's flag wins
    parsed, _ = grpo.make_parser().parse(argv, grpo.recipe)
    assert (parsed[-1].num_generations, parsed[-1].per_device_train_batch_size) == (4, 8)
    assert parsed[0].aux_objective == "anchor"  # no labels in GRPO batches: not sft's task+anchor
    assert reward_function("auto", TOTALS_TASK) is json_match_reward

    def check(model, **data):
        return check_data(
            "sft", SimpleNamespace(model_name_or_path=model), DataArguments(**data), tuple(BUILTIN_TASKS)
        )

    assert check("some/model", task=TOTALS_TASK) == TOTALS_TASK  # any chat model may train on totals
    assert check("smollm2-135m", task=TOTALS_TASK) == TOTALS_TASK
    with pytest.raises(UserError, match="--task extract or totals"):
        check("some/model")


def test_sft_on_totals_end_to_end(builtin_tiny, tmp_path):
    from test_cli_sft import lopt

    out = tmp_path / "sft"
    fast = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_samples", "16", "--no_progress"]
    args = [
        "sft",
        "--task",
        TOTALS_TASK,
        "--method",
        "e2e",
        "--max_length",
        "192",
        "--eval_samples",
        "4",
        *fast,
    ]
    proc = lopt([*args, "--output_dir", str(out)], builtin_tiny["env"])
    assert "task=totals" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["heldout_exact_match"] <= 1.0
