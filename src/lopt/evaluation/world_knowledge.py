"""What a real pretrained base knows about the world, and how much of it a fine-tuned model keeps.

The toy probe (`lopt.builtin.knowledge`, lm-eval task ``lopt_knowledge``) asks about facts the built-in model was pretrained
on.  A real base (`lopt.builtin.hub_bases`, e.g. smollm2-135m) learned facts about the world instead; this module asks about
some of them and measures retention on text like its pretraining data.

Facts: countries from the ``countryinfo`` package (MIT licence; version 1.0.1 ships one JSON file per country in its
``data/`` folder, read here directly, never through its API).  Each question type turns a country's record into a
short chat question and the first words of the assistant's answer (``"What is the capital of France?"`` /
``"The capital of France is"``); the model completes the sentence by greedy decoding.  SmolLM2-135M-Instruct answers a
bare question with a sentence that restates it, so without these first words nearly every answer would start with
something other than the fact.

Scoring is strict (`is_correct`): the first line of the completion and the gold answer are normalized (accents,
case, punctuation and a leading "a", "an" or "the" dropped) and the completion must *start* with the gold answer as
whole words.  "Paris." and "Paris, the largest city" are right; "the city of Paris", "Lyon or Paris" and a list of
every choice are wrong.  An exact match would also refuse "Ottawa, Canada."; a whole-word match anywhere in the line
would accept hedges and echoed choice lists, which the base produces for the continent question.

What is kept (`KEPT_TYPES`: capitals, the country of a capital, demonyms) is what the base knows well above chance;
`QUESTION_TYPES` gives the base's accuracy per type and why the continent question was dropped.  Three uses:

- the lm-eval group ``lopt_world_knowledge`` (`world_knowledge_task_dir`): one generate_until task per question
  type over JSONL files in lopt's cache, run with the model's chat template and scored by `is_correct`, so
  `lopt eval --lm_eval_tasks lopt_world_knowledge` prints the accuracy overall and per type;
- `world_knowledge_answers` (batched greedy generation, the same prompts) and `knowledge_kept`: the share of the
  facts the *base* answers right that a fine-tuned model still answers right, for `lopt compare` (the base's
  answers are cached per base checkpoint, `base_world_knowledge`);
- `prose_texts` and `code_texts`: perplexity sets of English prose (CPython's ``pydoc_data.topics``) and Python
  source (the standard library), scored with `lopt.evaluation.evaluate.perplexity` in windows of `PERPLEXITY_SEQ_LEN` tokens.
  A real base may well have been pretrained on these very files: their perplexity rise measures forgetting, not
  generalization.

`CompareWorldKnowledge`, `add_world_knowledge`, `format_world_knowledge_report` and `plot_knowledge_fronts` are what
`lopt compare` calls on a real base.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import os
import re
import statistics
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lopt.errors import UserError
from lopt.io import atomic_write_json, cache_root, publish_directory

if TYPE_CHECKING:
    from lopt.evaluation.evaluate import Score

__all__ = [
    "KEPT_TYPES",
    "QUESTION_TYPES",
    "WORLD_KNOWLEDGE_TASK",
    "Country",
    "accuracy_by_type",
    "base_world_knowledge",
    "code_texts",
    "countries",
    "is_correct",
    "knowledge_kept",
    "kept_by_type",
    "lm_eval_process_results",
    "normalize",
    "prompt_text",
    "prose_texts",
    "type_task",
    "world_knowledge_answers",
    "world_knowledge_generations",
    "world_knowledge_items",
    "world_knowledge_task_dir",
]

WORLD_KNOWLEDGE_TASK = "lopt_world_knowledge"
# Bump when the items, the prompts, the scoring or the YAML change: part of the task folder's and the cache's names.
WORLD_KNOWLEDGE_VERSION = "1"
# Tokens generated per answer: the longest gold answer is ~10 SmolLM2 tokens ("Saint Vincent and the Grenadines").
MAX_NEW_TOKENS = 16
COUNTRYINFO_HINT = "pip install 'countryinfo==1.0.1'"


# --- facts ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Country:
    """The fields of one countryinfo record that questions use ("" where the record has none)."""

    code: str  # ISO 3166-1 alpha-3, the item id
    name: str
    capital: str
    region: str  # countryinfo's continent: Africa, Americas, Asia, Europe or Oceania
    demonym: str


def _countryinfo_data_dir() -> Path:
    """countryinfo's data folder, located without importing the package."""
    spec = importlib.util.find_spec("countryinfo")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the world-knowledge probe needs the package countryinfo: {COUNTRYINFO_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not folder.is_dir():
        raise UserError(f"countryinfo has no data folder at {folder}: reinstall it with {COUNTRYINFO_HINT}")
    return folder


@functools.lru_cache(maxsize=1)
def countries() -> tuple[Country, ...]:
    """Every country or territory with an ISO alpha-3 code and a plain name, sorted by name.

    Only ``data/`` is read: countryinfo's ``data_no_iso/`` holds duplicates and parts of countries (Burma next to
    Myanmar, Scotland).  Names with brackets or commas ("Virgin Islands, British") are left out: nobody says them.
    A code found twice (two files for Curaçao) keeps its first file, in sorted path order.
    """
    found: dict[str, Country] = {}
    for path in sorted(glob.glob(str(_countryinfo_data_dir() / "*.json"))):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        name, code = record.get("name") or "", (record.get("ISO") or {}).get("alpha3") or ""
        if not name or not code or any(c in name for c in "(),"):
            continue
        capital = record.get("capital")
        found.setdefault(
            code,
            Country(
                code=code,
                name=name,
                capital=capital if isinstance(capital, str) else "",  # one record has a list
                region=record.get("region") or "",
                demonym=record.get("demonym") or "",
            ),
        )
    return tuple(sorted(found.values(), key=lambda c: (c.name, c.code)))


@dataclass(frozen=True)
class QuestionType:
    """One kind of question: its user message, the first words of the answer, and the gold answer of a country."""

    question: str  # format string over Country fields
    prefix: str  # the assistant turn's opening words, completed by the model
    gold: Callable[[Country], str]  # "" for a country the question does not apply to
    note: str  # what the base scores, for readers
    choices: tuple[str, ...] = ()  # the answers the question lists, if it lists them


def _unique_capital(country: Country) -> str:
    shared = [c for c in countries() if c.capital == country.capital]
    return country.name if country.capital and len(shared) == 1 else ""


# The notes give smollm2-135m's accuracy on every item (greedy, MAX_NEW_TOKENS tokens, `is_correct`), measured with
# `world_knowledge_answers` on CPU; for the kept types `lopt eval --model_name_or_path smollm2-135m --lm_eval_tasks
# lopt_world_knowledge` prints the same per type.  Chance is near 0 for an open answer.  Tried without an answer's
# first words and left out: the ISO 4217 currency code, the internet domain, the calling code and the ISO alpha-2
# code (0-8% right).  countryinfo names currencies and languages only by code, so neither is asked by name.
QUESTION_TYPES: dict[str, QuestionType] = {
    "capital": QuestionType(
        "What is the capital of {name}?",
        "The capital of {name} is",
        lambda c: c.capital,
        "92 of 231 right (39.8%)",
    ),
    "capital_country": QuestionType(
        "{capital} is the capital of which country?",
        "{capital} is the capital of",
        _unique_capital,
        "49 of 222 right (22.1%); 'the Republic of Armenia' and the like are wrong",
    ),
    "continent": QuestionType(
        "Which continent is {name} in: Africa, the Americas, Asia, Europe or Oceania?",
        "{name} is on the continent of",
        lambda c: c.region,
        "119 of 242 right (49.2%), but mostly a default: the base says Africa for 150 of the 242 (91 of them "
        "wrong; always Africa scores 24.4%) and gets 10 of 51 Asian and 3 of 27 Oceanian countries; not kept",
        choices=("Africa", "Americas", "Asia", "Europe", "Oceania"),
    ),
    "demonym": QuestionType(
        "What is the adjective for things from {name}?",
        "The adjective is",
        # "Antiguan,Barbudan", "Serbian/Montenegrin": two answers in one field
        lambda c: c.demonym if not any(ch in c.demonym for ch in ",/") else "",
        "67 of 225 right (29.8%)",
    ),
}
# The question types the base knows well above chance: 208 of 678 items (30.7%) right on smollm2-135m.
KEPT_TYPES: tuple[str, ...] = ("capital", "capital_country", "demonym")

# countryinfo's region "Americas" joins two continents; an answer naming either (or the whole) is right.
_ALIASES = {"americas": ("america", "north america", "south america", "central america", "latin america")}


def world_knowledge_items(types: Sequence[str] = KEPT_TYPES) -> list[dict]:
    """Rows ``{"id", "type", "question", "prefix", "answer", "answers", "choices"}`` in a fixed order (type, then
    country).

    ``answers`` holds every accepted answer (the gold one first); ``choices`` the answers the question lists (see
    `is_correct`), empty for an open question.  A question whose answer is part of the country's
    name or capital it shows (the capital of Singapore, Panama City, South Africa's continent) is left out: copying
    is not knowing.
    """
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown:
        raise ValueError(f"unknown question types {unknown}; choose from {', '.join(QUESTION_TYPES)}")
    rows = []
    for name in types:
        kind = QUESTION_TYPES[name]
        shown = {field for _, field, _, _ in string.Formatter().parse(kind.question + kind.prefix) if field}
        for country in countries():
            gold = kind.gold(country)
            if not gold:
                continue
            fields = {"name": country.name, "capital": country.capital}
            if any(_has_words(normalize(fields[f]), normalize(gold)) for f in shown):
                continue
            question, prefix = kind.question.format(**fields), kind.prefix.format(**fields)
            answers = [gold, *_ALIASES.get(normalize(gold), ())]
            rows.append(
                {
                    "id": f"{name}:{country.code}",
                    "type": name,
                    "question": question,
                    "prefix": prefix,
                    "answer": gold,
                    "answers": answers,
                    "choices": list(kind.choices),
                }
            )
    return rows


# --- scoring -------------------------------------------------------------------------------------------------------
_ARTICLE = re.compile(r"^(?:the|an|a)\s+")


def normalize(text: str) -> str:
    """Lowercase ASCII words separated by single spaces: accents dropped (Bogotá -> bogota), every other character
    that is not a letter or digit a space (Sana'a -> sana a), and a leading article removed."""
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    words = " ".join(re.sub(r"[^0-9a-z]+", " ", text.casefold()).split())
    return _ARTICLE.sub("", words)


def _starts_with_words(text: str, words: str) -> bool:
    return bool(words) and (text == words or text.startswith(words + " "))


def _has_words(text: str, words: str) -> bool:
    return bool(words) and f" {words} " in f" {text} "


def _first_line(generation: str) -> str:
    """What the answer says before its first line break (lm-eval stops generating there too)."""
    return generation.split("\n", 1)[0]


def is_correct(generation: str, answers: Sequence[str], choices: Sequence[str] = ()) -> bool:
    """Whether the completion's first line starts with one of the accepted answers, as whole words, after
    `normalize`; for a question that lists its ``choices``, a line naming two or more of them is a hedge (an echo
    of the list) and wrong whatever comes first."""
    said = normalize(_first_line(generation))
    if sum(_has_words(said, normalize(choice)) for choice in choices) > 1:
        return False
    return any(_starts_with_words(said, normalize(answer)) for answer in answers)


def knowledge_kept(base_correct: Sequence[bool], model_correct: Sequence[bool]) -> float:
    """The share of the items the base answered right that the model also answers right (1.0: nothing lost)."""
    if len(base_correct) != len(model_correct):
        raise ValueError(
            f"base_correct has {len(base_correct)} items and model_correct {len(model_correct)}: score the same items"
        )
    known = [model for base, model in zip(base_correct, model_correct) if base]
    if not known:
        raise ValueError("the base answered no item right: there is no knowledge to keep")
    return sum(map(bool, known)) / len(known)


def accuracy_by_type(items: Sequence[dict], correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy per question type, in the items' order of types."""
    by_type: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct, strict=True):
        by_type.setdefault(item["type"], []).append(bool(ok))
    return {name: statistics.fmean(oks) for name, oks in by_type.items()}


def kept_by_type(items: Sequence[dict], base_correct: Sequence[bool], model_correct: Sequence[bool]) -> dict:
    """`knowledge_kept` per question type (types the base answered nothing right of are left out)."""
    out = {}
    for name in dict.fromkeys(item["type"] for item in items):
        picked = [i for i, item in enumerate(items) if item["type"] == name and base_correct[i]]
        if picked:
            out[name] = sum(bool(model_correct[i]) for i in picked) / len(picked)
    return out


# --- the direct scorer -----------------------------------------------------------------------------------------------
def prompt_text(tokenizer, item: dict) -> str:
    """The item as the model sees it: the chat template over the question, then the answer's first words (the
    string lm-eval builds with apply_chat_template and gen_prefix)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the world-knowledge probe asks chat questions, and this tokenizer has no chat template: use a chat "
            "model (e.g. smollm2-135m)."
        )
    messages = [
        {"role": "user", "content": item["question"]},
        {"role": "assistant", "content": item["prefix"]},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


def _encode(tokenizer, text: str) -> list[int]:
    # As lm-eval's HF model does: no second BOS when the template already starts with it.
    bos = tokenizer.bos_token
    special = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    return tokenizer(text, **special)["input_ids"]


def world_knowledge_generations(
    model,
    tokenizer,
    items: Sequence[dict],
    batch_size: int = 128,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = False,
    desc: str = "scoring: facts",
) -> list[str]:
    """Greedy completions of every item, in the items' order: left-padded batches of prompts of similar length,
    each row stopping at a line break or the end-of-turn token. `progress`: a bar of the items, batch by batch."""
    import torch
    from tqdm.auto import tqdm

    prompts = [_encode(tokenizer, prompt_text(tokenizer, item)) for item in items]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc=desc, unit="fact", disable=not progress)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in rows)
                input_ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in rows])
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    stop_strings=["\n"],
                    tokenizer=tokenizer,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                for i, text in zip(rows, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
                    texts[i] = _first_line(text)
                bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return texts


def world_knowledge_answers(
    model,
    tokenizer,
    items: Sequence[dict],
    batch_size: int = 128,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = False,
    desc: str = "scoring: facts",
) -> list[bool]:
    """Whether the model answers each item right (`is_correct` of its greedy completion), in the items' order."""
    generations = world_knowledge_generations(
        model, tokenizer, items, batch_size, max_new_tokens, progress, desc
    )
    return [is_correct(text, item["answers"], item["choices"]) for text, item in zip(generations, items)]


def _items_digest(items: Sequence[dict]) -> str:
    text = json.dumps([WORLD_KNOWLEDGE_VERSION, MAX_NEW_TOKENS, list(items)], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """The checkpoint folder's identity: its resolved path, config and the size and modification time of every
    weight file (a rewritten checkpoint gets a new fingerprint; reading 0.5 GB of weights is not needed)."""
    folder = Path(path).expanduser().resolve()
    parts = [str(folder)]
    for name in sorted(os.listdir(folder)):
        file = folder / name
        if name == "config.json":
            parts.append(file.read_text(encoding="utf-8"))
        elif name.endswith((".safetensors", ".bin", ".json")) and file.is_file():
            stat = file.stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def base_world_knowledge(
    model,
    tokenizer,
    base_path: str | os.PathLike,
    items: Sequence[dict],
    cache_dir=None,
    progress: bool = False,
) -> list[bool]:
    """`world_knowledge_answers` of the base model, computed once per base checkpoint, item set and kind of
    device (a GPU's arithmetic can flip a close greedy choice) and then read from lopt's cache (``world_knowledge/``
    next to the built-in models), so every compare and every --jobs worker scores the base once.  ``model`` may be
    None when the answers are cached (the device is then the one compare scores on: the GPU when there is one)."""
    import torch

    if model is not None:
        device = next(model.parameters()).device.type
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = f"base-{_checkpoint_fingerprint(base_path)}-{_items_digest(items)}-{device}.json"
    path = cache_root(cache_dir) / "world_knowledge" / name
    if path.is_file():
        with open(path) as f:
            cached = json.load(f)
        if cached.get("ids") == [item["id"] for item in items]:
            return [bool(x) for x in cached["correct"]]
    if model is None:
        raise ValueError(f"no cached world-knowledge answers of {base_path}: pass the loaded base model")
    correct = world_knowledge_answers(
        model, tokenizer, items, progress=progress, desc="scoring: the base's facts (once)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        str(path), {"base": str(base_path), "ids": [i["id"] for i in items], "correct": correct}
    )
    return correct


def knowledge_kept_after_training(
    model, tokenizer, base_path: str | os.PathLike, progress: bool = False
) -> Score | None:
    """Of the world-knowledge items the base at `base_path` answers right, how many `model` still answers right
    (None when the base knows none). The base's answers come from lopt's cache (`base_world_knowledge`); when they
    are missing, the base is loaded once, beside the model, to compute them. `progress`: bars of the facts scored."""
    from lopt.evaluation.evaluate import Score

    items = world_knowledge_items()
    try:
        base_correct = base_world_knowledge(None, tokenizer, base_path, items)
    except ValueError:  # not cached yet
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=next(model.parameters()).dtype)
        base.to(next(model.parameters()).device)
        base_correct = base_world_knowledge(base, tokenizer, base_path, items, progress=progress)
        del base
    known = [item for item, ok in zip(items, base_correct) if ok]
    if not known:
        return None
    still = world_knowledge_answers(model, tokenizer, known, progress=progress, desc="scoring: facts kept")
    return Score(sum(still), len(still))


# --- perplexity on prose and code ----------------------------------------------------------------------------
# Windows of this many tokens (`lopt.evaluation.evaluate.perplexity`); the text budgets below give a few hundred windows with
# SmolLM2's tokenizer (~4.1 characters per token of prose, ~3.8 of code): ~210 and ~185 windows.
PERPLEXITY_SEQ_LEN = 256
PROSE_CHARS = 220_000
CODE_CHARS = 180_000
_CHUNK_CHARS = 2000  # documents are cut at blank lines into pieces of about this size, like retention_texts


def _stable_order(texts: Sequence[str], salt: str) -> list[str]:
    return sorted(texts, key=lambda t: hashlib.sha256(f"{salt}:{t}".encode()).digest())


def _take(chunks: Sequence[str], max_chars: int) -> list[str]:
    taken, total = [], 0
    for chunk in chunks:
        if total >= max_chars:
            break
        taken.append(chunk)
        total += len(chunk)
    return taken


def prose_texts(max_chars: int = PROSE_CHARS) -> list[str]:
    """English prose: pieces of CPython's ``pydoc_data.topics`` (the language reference's topics, each paragraph
    once), in a fixed shuffled order so the sample spans many topics; about ``max_chars`` characters."""
    from lopt.builtin.base import _chunk_paragraphs, pretraining_documents

    topics = [text for doc_id, text in pretraining_documents() if doc_id.startswith("topic:")]
    chunks = [c for text in _stable_order(topics, "prose") for c in _chunk_paragraphs(text, _CHUNK_CHARS)]
    return _take([c for c in chunks if c.strip()], max_chars)


def code_texts(max_chars: int = CODE_CHARS) -> list[str]:
    """Python source: from standard-library modules in a fixed shuffled order, one piece each so the sample spans
    many: whole lines from the module's first top-level ``def`` or ``class`` (past the docstring and imports, which
    read more like prose) up to about 2,000 characters; about ``max_chars`` characters in all."""
    from lopt.builtin.base import code_documents

    pieces = []
    for source in _stable_order(code_documents(), "code"):
        lines = source.splitlines(keepends=True)
        start = next((i for i, line in enumerate(lines) if line.startswith(("def ", "class "))), None)
        if start is None:  # no function or class: a script or a data table
            continue
        piece = ""
        for line in lines[start:]:
            if piece and len(piece) + len(line) > _CHUNK_CHARS:
                break
            piece += line
        if piece.strip():
            pieces.append(piece.rstrip())
    return _take(pieces, max_chars)


# --- the lm-eval task ----------------------------------------------------------------------------------------------
_GROUP_YAML = """\
# Written by lopt (lopt.evaluation.world_knowledge): short questions about countries, one task per question type, asked in the
# model's chat format (run it with apply_chat_template; lopt does) and answered by greedy completion of the answer's
# first words.  The group's acc is over all items.
group: {group}
task:
{tasks}
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: {version}
"""

_TASK_YAML = """\
# Written by lopt (lopt.evaluation.world_knowledge): the "{kind}" questions, scored by lopt's own strict rule (utils.py), so
# lm-eval and `lopt compare` agree.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
gen_prefix: prefix
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

_UTILS = """\
# Written by lopt: the task is scored by lopt's own rule (lopt.evaluation.world_knowledge.is_correct).
from lopt.evaluation.world_knowledge import lm_eval_process_results as process_results  # noqa: F401
"""


def lm_eval_process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's per-document hook: ``{"acc": 1.0 or 0.0}`` for the greedy completion ``results[0]``."""
    return {"acc": float(is_correct(results[0], doc["answers"], doc["choices"]))}


def type_task(kind: str) -> str:
    """The lm-eval task of one question type, in the group `WORLD_KNOWLEDGE_TASK`."""
    return f"{WORLD_KNOWLEDGE_TASK}_{kind}"


def world_knowledge_task_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the lm-eval group `WORLD_KNOWLEDGE_TASK` (its acc is over every item) and one task per kept
    question type (`type_task`), each over its own JSONL file, with the scoring hook; written on first use into
    lopt's cache (named by a hash of its contents) and renamed into place, so a reader never sees half of it."""
    items = world_knowledge_items()
    kinds = list(dict.fromkeys(item["type"] for item in items))
    rows = {
        kind: "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items if i["type"] == kind)
        for kind in kinds
    }
    text = json.dumps([rows, _GROUP_YAML, _TASK_YAML, _UTILS, MAX_NEW_TOKENS])
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    final = (
        cache_root(cache_dir)
        / "lm_eval_tasks"
        / f"{WORLD_KNOWLEDGE_TASK}-v{WORLD_KNOWLEDGE_VERSION}-{digest}"
    )

    def write(folder: Path) -> None:
        (folder / "utils.py").write_text(_UTILS, encoding="utf-8")
        for kind in kinds:
            task = type_task(kind)
            (folder / f"{task}.jsonl").write_text(rows[kind], encoding="utf-8")
            # lm-eval resolves data_files against the working directory, so the YAML names the final absolute path.
            yaml = _TASK_YAML.format(
                kind=kind,
                task=task,
                data_file=json.dumps(str(final.resolve() / f"{task}.jsonl")),
                max_new_tokens=MAX_NEW_TOKENS,
                version=WORLD_KNOWLEDGE_VERSION,
            )
            (folder / f"{task}.yaml").write_text(yaml, encoding="utf-8")
        group = _GROUP_YAML.format(
            group=WORLD_KNOWLEDGE_TASK,
            tasks="".join(f"  - {type_task(kind)}\n" for kind in kinds).rstrip("\n"),
            version=WORLD_KNOWLEDGE_VERSION,
        )
        (folder / f"{WORLD_KNOWLEDGE_TASK}.yaml").write_text(group, encoding="utf-8")

    return publish_directory(final, write, marker=f"{WORLD_KNOWLEDGE_TASK}.yaml")
