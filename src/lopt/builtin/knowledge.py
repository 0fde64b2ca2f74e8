"""Facts the built-in model was pretrained on, for tasks that test what pretraining taught it.

The built-in corpus (``lopt.builtin``) renders each standard-library module as ``Module <name>`` followed by the
docstrings of its module, classes and functions (``def <name>:`` / ``class <name>:``, methods as
``def <Class>.<method>:``).  A *fact* here is one public top-level function or class of a module whose document the
model was trained on, or one public method of such a class: its (qualified) name, its defining module and the first
sentence of its docstring.

Facts are split once and for all, by a stable hash of ``module.<top-level name>``, into two disjoint roles (a class
and its methods always share one):

- ``"probe"``: the knowledge-retention probe (multiple choice, scored by log-likelihood, never trained on);
- ``"sft"``: the question-answering SFT task (its own train / validation / test split, see ``lopt.builtin``).

So a retention probe never asks about an item that any SFT task taught.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Fact",
    "knowledge_facts",
    "fact_role",
    "PROBE_PERCENT",
    "knowledge_items",
]

PROBE_PERCENT = 50  # share of facts held out for the retention probe
_MIN_SUMMARY_CHARS = 20
_MAX_SUMMARY_CHARS = (
    120  # a question must fit the built-in models' short context (128 tokens in the tiny one)
)


@dataclass(frozen=True)
class Fact:
    name: str  # "urljoin", or "TarFile.open" for a method
    module: str  # "urllib.parse"
    kind: str  # "def" or "class"
    summary: str  # first sentence of the docstring

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def is_method(self) -> bool:
        return "." in self.name


def fact_role(fact: Fact) -> str:
    """``"probe"`` or ``"sft"``: a stable hash (never Python's salted hash()) of ``module.<top-level name>``, so a
    class and its methods share a role."""
    top_level = fact.name.split(".", 1)[0]
    digest = hashlib.sha256(f"knowledge-role:{fact.module}.{top_level}".encode()).digest()
    return "probe" if int.from_bytes(digest[:8], "big") % 100 < PROBE_PERCENT else "sft"


def knowledge_facts(role: str | None = None) -> list[Fact]:
    """Facts from the built-in model's pretraining *training* documents, in a fixed order (by module, then line).

    Only (qualified) names defined in exactly one module are kept, so every question has one right module.
    ``role`` keeps only ``"probe"`` or ``"sft"`` facts.
    """
    if role not in (None, "probe", "sft"):
        raise ValueError(f"role must be 'probe', 'sft' or None, not {role!r}")
    facts = _facts()
    return list(facts) if role is None else [f for f in facts if fact_role(f) == role]


@functools.lru_cache(maxsize=1)
def _facts() -> tuple[Fact, ...]:
    from lopt.builtin.base import _SKIP_DIRS, _is_heldout, pretraining_documents

    trained_modules = {
        doc_id.removeprefix("stdlib:")
        for doc_id, _ in pretraining_documents()
        if doc_id.startswith("stdlib:") and not _is_heldout(doc_id)
    }
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[Fact] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            rel = Path(dirpath, filename).relative_to(root).as_posix()
            if not filename.endswith(".py") or rel not in trained_modules:
                continue
            module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
            if any(part.startswith("_") for part in module.split(".")):
                continue  # private modules: nobody asks which of them defines a name
            try:
                tree = ast.parse(Path(dirpath, filename).read_bytes(), filename=rel)
            except (SyntaxError, ValueError):
                continue
            for node in tree.body:
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                if node.name.startswith("_"):
                    continue
                named = [(node.name, node)]
                if isinstance(node, ast.ClassDef):
                    named += [
                        (f"{node.name}.{child.name}", child)
                        for child in node.body
                        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and not child.name.startswith("_")
                    ]
                for name, defined in named:
                    if not (doc := ast.get_docstring(defined)):
                        continue
                    summary = _first_sentence(doc)
                    if _MIN_SUMMARY_CHARS <= len(summary) <= _MAX_SUMMARY_CHARS:
                        kind = "class" if isinstance(defined, ast.ClassDef) else "def"
                        candidates.append(Fact(name, module, kind, summary))
    # A name defined in several modules (os.path.join, posixpath.join, ...) has no single answer.
    modules_of: dict[str, set[str]] = {}
    for fact in candidates:
        modules_of.setdefault(fact.name, set()).add(fact.module)
    return tuple(f for f in candidates if len(modules_of[f.name]) == 1)


def _first_sentence(doc: str) -> str:
    """The docstring's first paragraph up to its first full stop, on one line."""
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    end = para.find(". ")
    return para if end < 0 else para[: end + 1]


# None: every usable probe fact (~700), for a standard error under 2 points; still cheap after each run.
KNOWLEDGE_ITEMS: int | None = None


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# A cloze answer: a lowercase word of at least four letters (shorter ones are mostly function words).
_CLOZE_WORD = re.compile(r"\b[a-z]{4,}\b")
_MIN_WORD_COUNT = 3  # answers and distractors occur at least this often in the training documents


@functools.lru_cache(maxsize=1)
def _training_word_counts() -> dict[str, int]:
    from lopt.builtin.base import _is_heldout, pretraining_documents

    counts: dict[str, int] = {}
    for doc_id, text in pretraining_documents():
        if not _is_heldout(doc_id):
            for word in _CLOZE_WORD.findall(text):
                counts[word] = counts.get(word, 0) + 1
    return counts


def knowledge_items(n: int | None = KNOWLEDGE_ITEMS) -> list[dict]:
    """Multiple-choice cloze rows ``{"id", "context", "choices", "answer"}`` over probe facts, in a fixed order.

    The context is a fact the way the pretraining corpus presents it (``Module M``, ``def NAME:``, its docstring's
    first sentence) cut before the sentence's last word of four or more lowercase letters; the choices are that
    word and three other words of the training documents that occur about as often (0.5x to 2x), so word
    frequency alone cannot pick the answer.  Items are the first ``n`` usable probe facts (none sharing its
    summary with an SFT fact) in a stable hash order, so a prefix is a fair sample of modules; each fact's
    distractors are drawn by a generator seeded from its key.
    """
    # Top-level names only (the design was chosen and measured on them).  A sentence that is also a top-level SFT
    # fact's summary could be learned through SFT: leave such facts out (the `modules` task in turn skips methods
    # whose summary is a probe item's).
    top_level = [f for f in knowledge_facts() if not f.is_method]
    sft_summaries = {f.summary for f in top_level if fact_role(f) == "sft"}
    probe = [f for f in top_level if fact_role(f) == "probe" and f.summary not in sft_summaries]
    facts = sorted(probe, key=lambda f: _stable_int(f"probe-order:{f.key}"))
    counts = _training_word_counts()
    words = sorted(w for w, c in counts.items() if c >= _MIN_WORD_COUNT)
    rows = []
    for fact in facts:
        if n is not None and len(rows) == n:
            break
        last = next(reversed(list(_CLOZE_WORD.finditer(fact.summary))), None)
        if last is None or counts.get(last.group(), 0) < _MIN_WORD_COUNT:
            continue
        answer = last.group()
        pool = [w for w in words if w != answer and 0.5 <= counts[w] / counts[answer] <= 2]
        if len(pool) < 3:
            continue
        rng = random.Random(_stable_int(f"distractors:{fact.key}"))
        choices = [answer, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        # How the pretraining corpus introduces a docstring (see lopt.builtin.base._corpus).
        context = f"Module {fact.module}\n\n{fact.kind} {fact.name}:\n{fact.summary[: last.start()].rstrip()}"
        rows.append({"id": fact.key, "context": context, "choices": choices, "answer": choices.index(answer)})
    return rows
