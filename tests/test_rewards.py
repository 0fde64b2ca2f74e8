"""Verifiable rewards: answer extraction and comparison on tricky strings."""

from __future__ import annotations

import pytest

from lopt.training.rewards import (
    answers_match,
    completion_text,
    exact_match_reward,
    extract_answer,
    extract_boxed,
    extract_hash_answer,
    extract_last_number,
    math_reward,
    normalize_math_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 1,234 apples.", "1,234"),
        ("The total is 12,345,678 dollars", "12,345,678"),
        ("Temperature fell to -7 degrees", "-7"),
        ("It costs $3.50 in total.", "3.50"),
        ("half is .5", ".5"),
        ("First 3, then 5, finally 42.", "42"),
        ("lists like 1,2 are two numbers", "2"),
        ("5-3 = 2", "2"),
        ("x2 and a1 are names, 7 is a number", "7"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b}} + {c}}", r"\sqrt{\frac{a}{b}} + {c}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed {7}", "7"),
        (r"\fbox{x}", "x"),
        (r"unclosed \boxed{1 + {2}", None),
        ("no box", None),
    ],
)
def test_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_hash_answer_takes_the_last_marker_to_the_end_of_its_line():
    assert extract_hash_answer("Work: 2+2=4\n#### 4") == "4"
    assert extract_hash_answer("#### 1\nmore\n#### 72\nThe end 9") == "72"
    assert extract_hash_answer("####   -1,000 \n") == "-1,000"
    assert extract_hash_answer("#### \n") is None
    assert extract_hash_answer("no marker 5") is None


def test_answer_precedence_boxed_then_hash_then_last_number():
    assert extract_answer(r"#### 3 but \boxed{4} and 5") == "4"
    assert extract_answer("#### 42\nCheck: 7 apples and 8 pears") == "42"  # "####" beats the last number
    assert extract_answer("7 apples and 8 pears") == "8"
    assert extract_answer("I do not know") is None


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("3.50", "3.5", True),
        ("1,234", "1234", True),
        ("$1,234.00", "1234", True),
        ("-0", "0", True),
        ("-5", "5", False),
        ("5.", "5", True),
        ("0.1", ".1", True),
        ("1,23", "123", False),  # not a thousands separator
        (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
        (r"\left(1, 2\right)", "(1,2)", True),
        (r"\text{Paris}", "paris", True),
        (None, "1", False),
        ("", "", False),
    ],
)
def test_answers_match(a, b, same):
    assert answers_match(a, b) is same
    assert answers_match(b, a) is same


def test_normalize_math_answer():
    assert normalize_math_answer("  1,000,000 ") == "1000000"
    assert normalize_math_answer("2.500") == "2.5"
    assert normalize_math_answer("100") == "100"  # trailing zeros of integers stay
    assert normalize_math_answer("1e3") == "1e3"  # not a plain number: compared as text
    assert normalize_math_answer("   ") is None


def test_math_reward_gsm8k_references_and_completions():
    gold = ["Natalia sold 48/2 = 24 clips in May.\n#### 72", "#### 1,200", "#### -3", "#### 3.5"]
    completions = [
        "48 + 24 = 72 clips.\n#### 72",  # right
        "The answer is 1200",  # right: last number, commas normalised
        "It drops 3 degrees, so -3",  # right: negative
        "#### 3.50",  # right: 3.50 == 3.5
    ]
    assert math_reward(None, completions, answer=gold) == [1.0, 1.0, 1.0, 1.0]
    wrong = ["#### 71", "no idea", "3", "#### 35"]
    assert math_reward(None, wrong, answer=gold) == [0.0, 0.0, 0.0, 0.0]


def test_math_reward_boxed_references_and_chat_completions():
    gold = [r"So the answer is $\boxed{\frac{1}{2}}$.", r"\boxed{18}", "Paris"]
    completions = [
        [{"role": "assistant", "content": r"Thus \boxed{\dfrac{1}{2}}"}],
        [{"role": "assistant", "content": r"The length is \boxed{18 \text{ cm}}"}],
        [{"role": "assistant", "content": " paris. "}],
    ]
    assert math_reward(prompts=["p"] * 3, completions=completions, answer=gold) == [1.0, 1.0, 1.0]
    assert math_reward(completions=[r"\boxed{2}"], solution=[r"\boxed{3}"]) == [0.0]  # NuminaMath's column


def test_exact_match_reward():
    chat = [[{"role": "assistant", "content": "  Forty Two. "}], "forty  two", "42", ""]
    assert exact_match_reward(None, chat, answer=["forty two"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_reward_argument_errors():
    with pytest.raises(ValueError, match="answer"):
        math_reward(None, ["1"])
    with pytest.raises(ValueError, match="2 completions but 1"):
        math_reward(None, ["1", "2"], answer=["1"])


def test_completion_text():
    assert completion_text(None) == ""
    assert completion_text("x") == "x"
    assert (
        completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}])
        == "a\nb"
    )
