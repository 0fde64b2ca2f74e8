"""A second post-training task for real pretrained bases (``lopt.builtin.hub_bases``): an order's item count, as JSON.

"totals": a short order note of 2 or 3 lines, each a quantity, an item and a unit price ("Order for Maya Okafor: 3 mugs
at 12 each, two candles at 7 each.") -> the JSON object ``{"customer": "Maya Okafor", "items": 5}``.  The model must
copy the name, read each quantity (digits, a word, or "a"/"an"), add them up and leave the prices out, and answer
with nothing but the object.  Where "extract" (lopt.builtin.real_task) asks to copy and normalise, this asks for a
sum.  Why the count and not the cost: SmolLM2-135M trained with e2e for 40 steps learned the format of the cost
(quantity x price summed) but answered one constant total for every note (1.4% right): no room to separate methods.

Notes are made from extract's names and items, number words and the templates below: prices are bare numbers ("at
12 each"), with no currency word or symbol, and no country, capital, nationality or other fact about the world (the
knowledge probe asks about those, and SFT on this task must not teach what it measures).

Rows, chat format and scoring are extract's: ``{"prompt": [system message, user message], "completion": "<the JSON
object>"}``, scored with the strict :func:`lopt.builtin.real_task.json_match` (the total must be a JSON integer).

Splits: records (the customer and the set of lines) are generated in a fixed order from string seeds and split once
and for all by a stable hash of the record into 3,997 train, 310 validation and 293 test rows; a record that repeats
an earlier one (in any order or wording) is dropped, so no record is in two splits.

Public API: ``TOTALS_TASK``, ``INSTRUCTION``, ``MAX_NEW_TOKENS``, ``totals_items()``, ``chat_prompt(note)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random

from lopt.builtin import real_task
from lopt.builtin.real_task import FIRST_NAMES, ITEMS, SURNAMES, _things

__all__ = ["INSTRUCTION", "MAX_NEW_TOKENS", "TOTALS_TASK", "chat_prompt", "totals_items"]

TOTALS_TASK = "totals"
INSTRUCTION = (
    "Reply with only a JSON object for the order: customer (the name) and items (the number of items ordered, an "
    "integer: the sum of the quantities; prices do not count)."
)
# Tokens generated when scoring: a gold answer is ~15 tokens of SmolLM2's tokenizer (a digit each).
MAX_NEW_TOKENS = 48

# Difficulty knobs (inclusive ranges): counts from 2 to 18.
QUANTITY = (1, 6)
PRICE = (2, 20)
LINES = (2, 3)  # distinct items per note

NUM_RECORDS = 4600  # records generated before the split (duplicates, if any, are dropped)
_TEST_PER_MILLE = 65
_VALIDATION_PER_MILLE = 65  # the next 65 per mille

# How a line states its unit price: a bare number, never a currency.
PRICE_FORMS = ("at {price} each", "for {price} each", "at {price} apiece")
# {name} and {lines} (the lines joined into one phrase); LIST_TEMPLATES put one line per row instead.
TEMPLATES = (
    "Order for {name}: {lines}.",
    "{name} bought {lines}.",
    "Invoice for {name}: {lines}.",
    "{name} ordered {lines}.",
    "Please bill {name} for {lines}.",
    "Customer {name} paid for {lines}.",
    "Receipt: {lines}, sold to {name}.",
)
LIST_TEMPLATES = (
    "Order for {name}:\n{lines}",
    "Invoice for {name}:\n{lines}",
    "Customer: {name}\nItems:\n{lines}",
)


def _join(phrases: list[str], style: int) -> str:
    """The lines as one phrase: "a, b, c", "a, b and c" or "a; b; c"."""
    if style == 1:
        return f"{', '.join(phrases[:-1])} and {phrases[-1]}"
    return ("; " if style == 2 else ", ").join(phrases)


def _record(index: int) -> tuple[str, dict, str]:
    """The note, gold object and split key of record `index` (a string seed: the same on every platform and run)."""
    rng = random.Random(f"{TOTALS_TASK}:{index}")
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
    lines = [
        (item, rng.randint(*QUANTITY), rng.randint(*PRICE)) for item in rng.sample(ITEMS, rng.randint(*LINES))
    ]
    price_form = rng.choice(PRICE_FORMS)
    phrases = [
        f"{_things(quantity, singular, plural, rng.randrange(2))} {price_form.format(price=price)}"
        for (singular, plural), quantity, price in lines
    ]
    if rng.random() < 0.25:
        note = rng.choice(LIST_TEMPLATES).format(name=name, lines="\n".join(f"- {p}" for p in phrases))
    else:
        note = rng.choice(TEMPLATES).format(name=name, lines=_join(phrases, rng.randrange(3)))
    gold = {"customer": name, "items": sum(quantity for _, quantity, _ in lines)}
    key = json.dumps([name, sorted([singular, quantity, price] for (singular, _), quantity, price in lines)])
    return note, gold, key


def _split(key: str) -> str:
    per_mille = (
        int.from_bytes(hashlib.sha256(f"{TOTALS_TASK}-split:{key}".encode()).digest()[:8], "big") % 1000
    )
    if per_mille < _TEST_PER_MILLE:
        return "test"
    return "validation" if per_mille < _TEST_PER_MILLE + _VALIDATION_PER_MILLE else "train"


@functools.cache
def totals_items() -> tuple[tuple[str, str, str], ...]:
    """All ``(note, gold JSON text, split)`` items in a fixed order; a record that repeats an earlier one is dropped,
    so no record (and no note) is in two splits."""
    items, seen = [], set()
    for index in range(NUM_RECORDS):
        note, gold, key = _record(index)
        if key in seen:
            continue
        seen.add(key)
        items.append((note, json.dumps(gold), _split(key)))
    return tuple(items)


def chat_prompt(note: str) -> list[dict[str, str]]:
    """The prompt of one item as chat messages: this task's instruction as the system message, the note as the user's."""
    return real_task.chat_prompt(note, INSTRUCTION)
