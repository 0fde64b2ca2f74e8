"""Embedded default: a small, really-pretrained base model (its narrow SFT tasks: lopt.builtin.tasks).

Nothing here needs a GPU or the internet.  The base model is pretrained on text that
every CPython installation carries (``pydoc_data.topics`` plus standard-library
docstrings read with :mod:`ast`, never by importing the modules), so the same Python
version always produces the same checkpoint.  It is built on first use and cached.

Public API
----------
``builtin_model_path(preset=None, cache_dir=None, progress=True) -> Path``
    Directory with a standard Hugging Face checkpoint (config, safetensors weights,
    tokenizer with a ChatML chat template).  Built once, then cached.
``preset_config(preset=None) -> LlamaConfig``
    Model config of a preset, without building anything.
``retention_texts(preset=None) -> list[str]``
    Held-out pretraining documents, for measuring retention (perplexity) later.
The built-in tasks (``BUILTIN_TASKS``, ``builtin_task_rows``, ``exact_match``) are in ``lopt.builtin.tasks``.

Presets: ``"default"`` (Llama-shaped, 8 layers, ~3M parameters, builds in a few minutes on
2 CPU cores), ``"evidence"`` (16 layers, ~8M parameters, pretrained longer on the docs plus the
standard library's source code; the base for evidence runs) and ``"tiny"`` (same recipe scaled
down, builds in well under a minute; for tests).  ``$LOPT_BUILTIN_PRESET`` chooses the preset when none is given; the cache lives
under ``$LOPT_CACHE_DIR`` or ``~/.cache/lopt``.  ``$LOPT_BUILTIN_DEVICE=cuda`` pretrains on the GPU instead of the CPU:
much faster, but other arithmetic gives other weights, so such a build is cached under its own name (``-cuda``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lopt.io import cache_root, save_checkpoint_files

__all__ = [
    "BUILTIN_VERSION",
    "PRESETS",
    "builtin_model_path",
    "preset_config",
    "pretraining_documents",
    "retention_texts",
    "train_tokenizer",
]

# Bump whenever anything that changes the built checkpoint changes (corpus, tokenizer,
# model shape, training recipe); it is part of the cache folder name.
BUILTIN_VERSION = "1"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# ChatML.  Assistant turns end with <|im_end|> *and* the EOS token, so a model fine-tuned on
# rendered conversations learns to stop whichever of the two the generation code waits for.
# No newline follows an assistant turn: the completion then ends exactly at EOS.  The
# {% generation %} markers let `return_assistant_tokens_mask` (TRL's assistant_only_loss) work.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

METADATA_FILE = "lopt_builtin.json"


@dataclass(frozen=True)
class Preset:
    """Model shape and pretraining recipe of one built-in preset."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    eval_tokens: int  # cap on held-out tokens scored at build time
    vocab_size: int = 2048
    weight_decay: float = 0.1
    seed: int = 0
    # Share of every pretraining batch drawn from the standard library's own source code (of the training
    # modules only), next to the documentation corpus: more text for a larger model, with the docs still seen
    # as often as a docs-only recipe would see them.
    code_fraction: float = 0.0


PRESETS: dict[str, Preset] = {
    # ~3.2M parameters; ~5k tokens/s on 2 CPU cores -> a few minutes.
    "default": Preset(
        hidden_size=160,
        intermediate_size=448,
        num_layers=8,
        num_heads=5,
        seq_len=256,
        batch_size=8,
        steps=440,
        lr=2e-3,
        warmup_steps=30,
        eval_tokens=65536,
    ),
    # The stronger base for evidence runs (`--preset evidence` / LOPT_BUILTIN_PRESET=evidence): twice the depth, so
    # k=2 leaves 8 layers to the task and k=4 has 4-layer blocks.  A quarter of each batch is stdlib source code,
    # so the docs are still seen ~2.5 times (1100 x 6 rows x 256 tokens) while the model sees more text.
    "evidence": Preset(
        hidden_size=192,
        intermediate_size=512,
        num_layers=16,
        num_heads=6,
        seq_len=256,
        batch_size=8,
        steps=1100,
        lr=1.5e-3,
        warmup_steps=50,
        eval_tokens=65536,
        code_fraction=0.25,
    ),
    # Same recipe, scaled down so CI can build it in seconds.
    "tiny": Preset(
        hidden_size=64,
        intermediate_size=192,
        num_layers=4,
        num_heads=2,
        seq_len=128,
        batch_size=8,
        steps=300,
        lr=5e-3,
        warmup_steps=20,
        eval_tokens=16384,
    ),
}


def _resolve_preset(preset: str | None) -> str:
    name = preset or os.environ.get("LOPT_BUILTIN_PRESET") or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown builtin preset {name!r}; choose from {sorted(PRESETS)}")
    return name


def preset_config(preset: str | None = None):
    """The ``LlamaConfig`` of a preset (no training, no tokenizer needed)."""
    from transformers import LlamaConfig

    p = PRESETS[_resolve_preset(preset)]
    # The special tokens are the first ids of the trained vocabulary (see train_tokenizer).
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    return LlamaConfig(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_heads,
        max_position_embeddings=p.seq_len,
        tie_word_embeddings=False,
        bos_token_id=eos_id,  # no separate BOS: documents are separated by EOS, GPT-2 style
        eos_token_id=eos_id,
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
    )


# --------------------------------------------------------------------------------------
# Pretraining corpus
# --------------------------------------------------------------------------------------

# Directories of the standard library whose .py files are not library documentation.
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "__phello__",
    "ensurepip",
    "lib2to3",
    "encodings",  # ~100 near-identical generated codec docstrings
}
_HELDOUT_PER_MILLE = 50  # ~5% of documents held out
_DEDUP_MIN_CHARS = 64  # paragraphs at least this long occur once in the corpus


def _docstrings(tree: ast.Module) -> list[str]:
    """Docstrings of a module, its classes and functions, each headed by its qualified name."""
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(doc)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                if doc := ast.get_docstring(child):
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {name}:\n{doc}")
                visit(child, name + ".")

    visit(tree, "")
    return parts


def pretraining_documents() -> list[tuple[str, str]]:
    """All corpus documents as ``(doc_id, text)`` in a fixed order.

    Reads ``pydoc_data.topics`` (plain data) and parses standard-library sources with
    :mod:`ast`; no library module is imported, so nothing runs and the result depends only
    on the Python installation.
    """
    return list(_corpus())


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    # (doc_id, header, body) in a fixed order: topics by name, then modules by path.
    raw = [(f"topic:{key}", "", topics[key]) for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath, filename)
            rel = path.relative_to(root).as_posix()
            try:
                tree = ast.parse(path.read_bytes(), filename=rel)
            except (SyntaxError, ValueError):
                continue
            module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
            raw.append((f"stdlib:{rel}", f"Module {module}\n\n", "\n\n".join(_docstrings(tree))))

    # Drop every substantial paragraph already seen earlier in the corpus.  Pydoc topics
    # nest (a section is also part of its parent topic) and some modules share docstrings;
    # without this, held-out documents would repeat text the model was trained on.
    seen: set[str] = set()
    docs = []
    for doc_id, header, body in raw:
        kept = []
        for para in body.strip().split("\n\n"):
            key = para.strip()
            if len(key) >= _DEDUP_MIN_CHARS:
                if key in seen:
                    continue
                seen.add(key)
            kept.append(para)
        body = "\n\n".join(kept).strip()
        if body:
            docs.append((doc_id, header + body))
    return tuple(docs)


def code_documents() -> list[str]:
    """Source code of the standard-library modules whose documentation is in the training split (never of a
    held-out one, whose docstrings would otherwise leak into training), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            rel = Path(dirpath, filename).relative_to(root).as_posix()
            if filename.endswith(".py") and not _is_heldout(f"stdlib:{rel}"):
                texts.append(Path(dirpath, filename).read_bytes().decode("utf-8", errors="replace"))
    return texts


def _is_heldout(doc_id: str) -> bool:
    # A stable hash (not Python's salted hash()) so the split never changes between runs.
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < _HELDOUT_PER_MILLE


def _split_corpus() -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for doc_id, text in pretraining_documents():
        (heldout if _is_heldout(doc_id) else train).append(text)
    return train, heldout


def _chunk_paragraphs(text: str, max_chars: int) -> list[str]:
    """Split at blank lines into pieces of at most ~max_chars (a longer paragraph stays whole)."""
    chunks, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + 2 + len(para) > max_chars:
            chunks.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current.strip():
        chunks.append(current)
    return chunks


def retention_texts(preset: str | None = None, max_chars: int = 2000) -> list[str]:
    """Held-out corpus documents (never trained on), cut at paragraph breaks into pieces of
    at most ~``max_chars`` characters so that short-context perplexity sees many of them.

    All presets share the same corpus split; ``preset`` is only validated.
    """
    _resolve_preset(preset)
    _, heldout = _split_corpus()
    return [chunk for text in heldout for chunk in _chunk_paragraphs(text, max_chars)]


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = 2048, model_max_length: int = 256):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Digits are split one per token so numbers tokenize uniformly (arithmetic-friendly).
    The special tokens get ids 0..3 in the order of ``SPECIAL_TOKENS``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
    )


# --------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------


def _build_device() -> str:
    device = os.environ.get("LOPT_BUILTIN_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"LOPT_BUILTIN_DEVICE={device!r}: use cpu (the default) or cuda.")
    return device


def _build_name(preset: str) -> str:
    # The corpus is the installed standard library, so the exact Python version is part of
    # the recipe; so is the device that pretrains (its arithmetic differs from the CPU's).
    py = ".".join(map(str, sys.version_info[:3]))
    device = _build_device()
    return f"builtin-{preset}-v{BUILTIN_VERSION}-py{py}{'' if device == 'cpu' else '-' + device}"


def builtin_model_path(
    preset: str | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Path of the built-in base model of ``preset``, building it on first use.

    The result is a directory that ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load.  It is built into a temporary directory next to
    its final place and renamed into place once complete, under a file lock, so concurrent
    callers (parallel test workers, the ranks of a torchrun launch) build it once, whichever takes the lock, and
    never see a half-written one (`lopt.io.build_cache_folder`).
    """
    from lopt.io import build_cache_folder, is_complete_checkpoint

    name = _resolve_preset(preset)
    final = cache_root(cache_dir) / _build_name(name)

    def build(tmp: Path) -> None:
        import torch

        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            _build(name, tmp, progress=progress)

    return build_cache_folder(final, build, lambda folder: is_complete_checkpoint(folder, METADATA_FILE))


def _pack(tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None):
    """Concatenate documents, each followed by EOS, into rows of ``seq_len`` token ids."""
    import torch

    ids: list[int] = []
    # The backend tokenizer directly: no special tokens, and no max-length warnings.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    n_rows = len(ids) // seq_len
    return torch.tensor(ids[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


def _lr_at(step: int, p: Preset) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    t = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    return p.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def heldout_perplexity(model, rows, batch_size: int = 16) -> float:
    """Perplexity of ``model`` on packed rows of token ids (every position scored)."""
    import torch

    model.eval()
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size].to(model.device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def _build(preset: str, out_dir: Path, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    p = PRESETS[preset]
    start = time.time()
    torch.manual_seed(p.seed)  # weight init; the caller's RNG state is restored afterwards

    train_texts, heldout_texts = _split_corpus()
    code_texts = code_documents() if p.code_fraction > 0 else []
    tokenizer = train_tokenizer(train_texts + code_texts, vocab_size=p.vocab_size, model_max_length=p.seq_len)
    for token in SPECIAL_TOKENS:  # preset_config relies on these fixed ids
        assert tokenizer.convert_tokens_to_ids(token) == SPECIAL_TOKENS.index(token), token

    sources = [_pack(tokenizer, train_texts, p.seq_len)]  # each source is sampled in its own shuffled order
    per_batch = [p.batch_size - round(p.code_fraction * p.batch_size)]
    if code_texts:
        sources.append(_pack(tokenizer, code_texts, p.seq_len))
        per_batch.append(p.batch_size - per_batch[0])
    eval_rows = _pack(tokenizer, heldout_texts, p.seq_len, max_tokens=p.eval_tokens)

    config = preset_config(preset)
    model = LlamaForCausalLM(config)  # initialised on the CPU whatever the device, so both start alike
    device = _build_device()
    model.to(device)
    n_params = sum(t.numel() for t in model.parameters())

    # No weight decay on norms (1-d tensors), as usual.
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.lr,
        betas=(0.9, 0.95),
    )

    # Deterministic data order: a seeded permutation of each source's packed rows, reshuffled per epoch.
    gen = torch.Generator().manual_seed(p.seed)
    orders = [torch.empty(0, dtype=torch.long) for _ in sources]
    model.train()
    bar = tqdm(range(p.steps), desc=f"building lopt builtin '{preset}'", disable=not progress)
    ema_loss = None
    for step in bar:
        parts = []
        for i, (rows, n) in enumerate(zip(sources, per_batch)):
            if len(orders[i]) < n:
                orders[i] = torch.cat([orders[i], torch.randperm(len(rows), generator=gen)])
            parts.append(rows[orders[i][:n]])
            orders[i] = orders[i][n:]
        batch = torch.cat(parts).to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, p)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.3f}")
    bar.close()

    ppl = heldout_perplexity(model, eval_rows)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        # Stop on either end-of-turn marker (see CHAT_TEMPLATE).
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:  # save_pretrained shows its own bar; honour progress=False there too
        hf_logging.disable_progress_bar()
    try:
        save_checkpoint_files(model, out_dir)  # on whichever rank builds it
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    meta = {
        "preset": preset,
        "version": BUILTIN_VERSION,
        "python": sys.version.split()[0],
        "device": device,
        "params": n_params,
        "vocab_size": p.vocab_size,
        "heldout_ppl": round(ppl, 3),
        "heldout_tokens": int(eval_rows.numel()),
        "train_tokens_seen": p.steps * p.batch_size * p.seq_len,
        "train_corpus_tokens": int(sources[0].numel()),
        "train_code_tokens": int(sources[1].numel()) if code_texts else 0,
        "final_train_loss_ema": round(ema_loss, 4),
        "build_seconds": round(time.time() - start, 1),
        "recipe": asdict(p),
    }
    # Written last: its presence marks a complete checkpoint.
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
