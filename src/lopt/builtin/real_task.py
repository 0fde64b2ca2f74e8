"""A post-training task for real pretrained bases (``lopt.builtin.hub_bases``): structured extraction to JSON.

"extract": a one-sentence order ("On 14 March 2023, Maya Okafor bought three desk lamps.") -> the JSON object
``{"customer": "Maya Okafor", "item": "desk lamp", "quantity": 3, "date": "2023-03-14"}``.  The model must copy the
name, put the item in the singular, turn the quantity into an integer (it is written as a digit string, a word or
"a"/"an") and the date into ISO form (it is written in one of several English styles), and answer with nothing but the
object.  The system message states exactly that, so a chat model is told the format it is scored on.

Every sentence is synthetic, made from the fixed word lists below: names, household items, quantities and dates, and
no countries, capitals, currencies, nationalities or other facts about the world (a separate knowledge probe asks
about those, and SFT on this task must not teach what it measures).

Rows are conversational prompt / completion pairs: ``{"prompt": [system message, user message], "completion": "<the
JSON object>"}``.  ``lopt.data`` renders them with the tokenizer's chat template and trains on the assistant turn only;
generation at evaluation time uses the same prompt.  Scoring (:func:`json_match`) is strict: the output, with outer
whitespace removed, must parse as one JSON object equal to the gold one, with the same keys, the same values and the
same JSON types (``3`` is not ``"3"``); anything else, a parse failure included, is wrong.

Splits: records are generated in a fixed order from string seeds and split once and for all by a stable hash of the
record (customer, item, quantity, date) into about 3,970 train, 320 validation and 310 test rows, so the same record
never appears in two splits.

Public API: ``EXTRACT_TASK``, ``INSTRUCTION``, ``extract_items()``, ``chat_prompt(sentence, instruction)``, ``json_match``,
``parse_json_object``, ``WORD_LISTS`` (every word the sentences are made of, for checks). Which models are real bases:
``lopt.builtin.bases.base_of``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from typing import Any

__all__ = [
    "EXTRACT_TASK",
    "INSTRUCTION",
    "MAX_NEW_TOKENS",
    "WORD_LISTS",
    "chat_prompt",
    "extract_items",
    "json_match",
    "parse_json_object",
]

EXTRACT_TASK = "extract"
KEYS = ("customer", "item", "quantity", "date")
INSTRUCTION = (
    "Reply with only a JSON object for the order: customer, item (singular, lowercase), quantity (integer), "
    "date (YYYY-MM-DD)."
)
# Tokens generated when scoring: a gold answer is at most ~35 tokens of SmolLM2's tokenizer (a digit each).
MAX_NEW_TOKENS = 64

NUM_RECORDS = 4600  # records generated before the split (a handful of duplicates are dropped)
_TEST_PERCENT = 7
_VALIDATION_PERCENT = 7  # the next 7 percent

FIRST_NAMES = (
    "Maya", "Liam", "Nora", "Owen", "Ada", "Ethan", "Ruth", "Felix", "Cora", "Hugo", "Iris", "Jonah", "Leah",
    "Marcus", "Nina", "Oscar", "Priya", "Quinn", "Rhea", "Silas", "Tara", "Umar", "Vera", "Wes", "Yara", "Zane",
    "Alma", "Boris", "Celia", "Dmitri", "Edith", "Farid", "Greta", "Hana", "Ivan", "Joy", "Kofi", "Lena", "Mateo",
    "Noor", "Otto", "Petra", "Ravi", "Sunita", "Theo", "Uma", "Vikram", "Wendy", "Ximena", "Yusuf",
)  # fmt: skip
SURNAMES = (
    "Okafor", "Lindqvist", "Moreau", "Castillo", "Brennan", "Nakamura", "Adeyemi", "Fischer", "Haddad", "Kowalski",
    "Pavlik", "Rahman", "Sorensen", "Tanaka", "Vasquez", "Whitfield", "Abara", "Baptiste", "Delacroix", "Eriksen",
    "Fontaine", "Gallagher", "Horvat", "Ishida", "Jablonski", "Kaplan", "Lombardi", "Mbeki", "Novak", "Oyelaran",
    "Pereira", "Quintero", "Rosales", "Sato", "Thornton", "Ulrich", "Varga", "Winslow", "Yilmaz", "Zhou",
    "Ambrose", "Beaumont", "Carver", "Dunmore", "Ellison", "Fairbanks", "Greaves", "Holloway", "Iverson", "Jennings",
)  # fmt: skip
# (singular, plural): regular, -es, -ies, -ves plurals and two-word items.
ITEMS = (
    ("lamp", "lamps"), ("chair", "chairs"), ("notebook", "notebooks"), ("pillow", "pillows"), ("towel", "towels"),
    ("mug", "mugs"), ("candle", "candles"), ("blanket", "blankets"), ("stool", "stools"), ("kettle", "kettles"),
    ("basket", "baskets"), ("mirror", "mirrors"), ("umbrella", "umbrellas"), ("backpack", "backpacks"),
    ("box", "boxes"), ("brush", "brushes"), ("glass", "glasses"), ("dish", "dishes"), ("bench", "benches"),
    ("battery", "batteries"), ("diary", "diaries"), ("puzzle", "puzzles"), ("shelf", "shelves"), ("knife", "knives"),
    ("desk lamp", "desk lamps"), ("coffee mug", "coffee mugs"), ("tape measure", "tape measures"), ("tea towel", "tea towels"),
    ("picture frame", "picture frames"), ("water bottle", "water bottles"), ("flower pot", "flower pots"),
    ("wall clock", "wall clocks"), ("cutting board", "cutting boards"), ("lunch box", "lunch boxes"),
    ("paint brush", "paint brushes"), ("phone charger", "phone chargers"), ("hand towel", "hand towels"),
    ("storage bin", "storage bins"), ("garden hose", "garden hoses"), ("night light", "night lights"),
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
# No 29 February: every year below is a common year.
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
YEARS = (2019, 2021, 2022, 2023, 2025, 2026)
NUMBER_WORDS = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
)  # fmt: skip

# {name}, {qty} {items} (the quantity and the noun, agreeing), {date}.  Fixed text only, no world facts.
TEMPLATES = (
    "{name} ordered {things} on {date}.",
    "On {date}, {name} bought {things}.",
    "Order placed {date}: {things} for {name}.",
    "Please send {things} to {name} by {date}.",
    "{name} asked for {things}, to be delivered on {date}.",
    "{name} would like {things}; the order date is {date}.",
    "New order from {name} on {date}: {things}.",
    "Customer {name} requested {things} on {date}.",
)
_TEMPLATE_WORDS = (
    "ordered on bought order placed for please send to by asked be delivered would like the date is new from "
    "customer requested a an"
)

WORD_LISTS: dict[str, tuple[str, ...]] = {
    "first_names": FIRST_NAMES,
    "surnames": SURNAMES,
    "items": tuple(word for pair in ITEMS for word in pair),
    "months": MONTHS,
    "number_words": NUMBER_WORDS,
    "template_words": tuple(_TEMPLATE_WORDS.split()),
}


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date_text(year: int, month: int, day: int, style: int) -> str:
    name = MONTHS[month - 1]
    return (
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"the {_ordinal(day)} of {name} {year}",
        f"{name} {_ordinal(day)}, {year}",
        f"{name[:3]} {day}, {year}",
    )[style]


def _things(quantity: int, singular: str, plural: str, style: int) -> str:
    """The quantity and the noun: "3 lamps", "three lamps", "a lamp", "an umbrella", "one lamp"."""
    if quantity == 1:
        if style == 0:
            return f"one {singular}"
        return f"{'an' if singular[0] in 'aeiou' else 'a'} {singular}"
    if quantity <= len(NUMBER_WORDS) and style == 0:
        return f"{NUMBER_WORDS[quantity - 1]} {plural}"
    return f"{quantity} {plural}"


def _record(index: int) -> tuple[str, dict]:
    """The sentence and gold object of record `index` (a string seed: the same on every platform and run)."""
    rng = random.Random(f"{EXTRACT_TASK}:{index}")
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
    singular, plural = rng.choice(ITEMS)
    # Half small quantities (often written as words), half up to 60 (written as digits).
    quantity = rng.randint(1, 12) if rng.random() < 0.5 else rng.randint(2, 60)
    year, month = rng.choice(YEARS), rng.randint(1, 12)
    day = rng.randint(1, _DAYS_IN_MONTH[month - 1])
    sentence = rng.choice(TEMPLATES).format(
        name=name,
        things=_things(quantity, singular, plural, rng.randrange(2)),
        date=_date_text(year, month, day, rng.randrange(5)),
    )
    gold = {
        "customer": name,
        "item": singular,
        "quantity": quantity,
        "date": f"{year:04d}-{month:02d}-{day:02d}",
    }
    return sentence, gold


def _split(gold: dict) -> str:
    key = json.dumps(gold, sort_keys=True)
    percent = int.from_bytes(hashlib.sha256(f"{EXTRACT_TASK}-split:{key}".encode()).digest()[:8], "big") % 100
    if percent < _TEST_PERCENT:
        return "test"
    return "validation" if percent < _TEST_PERCENT + _VALIDATION_PERCENT else "train"


@functools.cache
def extract_items() -> tuple[tuple[str, str, str], ...]:
    """All ``(sentence, gold JSON text, split)`` items in a fixed order; a record that repeats an earlier one is
    dropped, so no record (and no sentence) is in two splits."""
    items, seen = [], set()
    for index in range(NUM_RECORDS):
        sentence, gold = _record(index)
        key = json.dumps(gold, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        items.append((sentence, json.dumps(gold), _split(gold)))
    return tuple(items)


def chat_prompt(sentence: str, instruction: str = INSTRUCTION) -> list[dict[str, str]]:
    """The prompt of one item as chat messages: the instruction as the system message, the sentence as the user's
    (every real-base task's format: lopt.builtin.totals_task passes its own instruction)."""
    return [{"role": "system", "content": instruction}, {"role": "user", "content": sentence}]


def parse_json_object(text: str) -> dict | None:
    """The JSON object `text` is (outer whitespace allowed), or None when it is anything else."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _canonical(value: Any) -> str:
    # Sorted keys, JSON's own types: 3, 3.0, "3" and true all differ; key order and spacing do not matter.
    return json.dumps(value, sort_keys=True)


def json_match(prediction: str, answer: str) -> bool:
    """Whether the model's output is exactly the gold JSON object (see the module docstring)."""
    predicted, gold = parse_json_object(prediction), parse_json_object(answer)
    if gold is None:
        raise ValueError(f"the reference answer is not a JSON object: {answer!r}")
    return predicted is not None and _canonical(predicted) == _canonical(gold)
