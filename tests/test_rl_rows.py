"""GRPO and DPO rows (lopt.data.rl_rows): each accepted form normalised to chat messages, each bad row refused in one
line naming the row and the field, in the same words as SFT rows (lopt.data.rows)."""

from __future__ import annotations

import pytest

from lopt.data.rl_rows import to_preference, to_prompt_answer
from lopt.data.rows import to_prompt_completion
from lopt.errors import DataError


def test_prompt_answer_forms():
    assert to_prompt_answer({"question": "2+3?", "answer": 5}, 0) == (
        [{"role": "user", "content": "2+3?"}],
        "5",
    )
    messages, answer = to_prompt_answer({"problem": "p", "solution": "s", "system": "be brief"}, 0, "Solve.")
    assert messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Solve.\n\np"}]
    assert answer == "s"
    chat = [{"role": "user", "content": "hi"}]
    assert to_prompt_answer({"prompt": chat, "answer": "x"}, 0) == (chat, "x")


@pytest.mark.parametrize(
    "row, message",
    [
        ([1, 2], "row 3: expected an object with named fields, got a list"),
        ({"prompt": "p"}, "row 3: no prompt/answer fields (row keys: 'prompt')"),
        (
            {"prompt": "p", "answer": True},
            "row 3: field 'answer' (the reference answer) must be a string or a number",
        ),
        ({"prompt": "p", "answer": " "}, "row 3: field 'answer' (the reference answer) is empty"),
        (
            {"prompt": [], "answer": "a"},
            "row 3: field 'prompt' must be a string or a non-empty list of chat messages",
        ),
        ({"prompt": [{"role": "user"}], "answer": "a"}, "row 3: prompt[0] (user) needs a string 'content'"),
        (
            {"prompt": "p", "answer": "a", "system": 1},
            "row 3: field 'system' must be a string or absent, got a number",
        ),
    ],
)
def test_bad_prompt_answer_rows_fail_in_one_line(row, message):
    with pytest.raises(DataError) as err:
        to_prompt_answer(row, 3)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_preference_rows():
    prompt, chosen, rejected = to_preference({"prompt": "2+3?", "chosen": "5", "rejected": "6"}, 0)
    assert prompt == [{"role": "user", "content": "2+3?"}]
    assert chosen == [{"role": "assistant", "content": "5"}] and rejected == [
        {"role": "assistant", "content": "6"}
    ]
    with pytest.raises(DataError, match="row 1: missing field\\(s\\) rejected"):
        to_preference({"prompt": "p", "chosen": "c"}, 1)
    with pytest.raises(DataError, match="row 1: 'chosen' must end with a non-empty assistant message"):
        to_preference({"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}, 1)


def test_the_shared_rules_read_the_same_for_every_command():
    """A non-object row and a bad system field: one text for SFT, GRPO and DPO rows."""
    texts = set()
    for check in (to_prompt_completion, to_prompt_answer, to_preference):
        with pytest.raises(DataError) as err:
            check("text", 0)
        texts.add(str(err.value))
    assert texts == {"row 0: expected an object with named fields, got a string"}
