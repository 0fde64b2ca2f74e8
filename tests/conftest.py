"""Shared tiny-model construction helpers for the test suite.

Every model is built from a config (no downloads): 4 layers, hidden size 32, vocabulary 96, fp32, eager attention,
every dropout off, so a training-mode forward is deterministic and gradients can be compared exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# Tiny models are far faster on one thread: with two, each op pays thread hand-off (seconds per step when the
# machine is busy, milliseconds on one thread).
torch.set_num_threads(1)

VOCAB = 96
HIDDEN = 32
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_DECODER = dict(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4)
_GQA = dict(_DECODER, num_key_value_heads=2, head_dim=8)

# model_type -> (name of the layer-count field, config kwargs). Every dropout is 0.
ARCH_SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("num_hidden_layers", _GQA),
    "qwen2": ("num_hidden_layers", _GQA),
    "qwen3": ("num_hidden_layers", _GQA),
    "mistral": ("num_hidden_layers", _GQA),
    "gemma2": ("num_hidden_layers", _GQA),
    "gemma3_text": ("num_hidden_layers", _GQA),
    "phi3": ("num_hidden_layers", dict(_DECODER, num_key_value_heads=2)),
    "gpt2": (
        "n_layer",
        dict(n_embd=HIDDEN, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
    "gpt_neox": ("num_hidden_layers", dict(_DECODER, max_position_embeddings=64)),
    "phi": ("num_hidden_layers", dict(_DECODER, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    "opt": (
        "num_hidden_layers",
        dict(
            hidden_size=HIDDEN,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
        ),
    ),
    "falcon": ("num_hidden_layers", dict(hidden_size=HIDDEN, num_attention_heads=4)),
    # Not in lopt's table: found by the structural fallback.
    "stablelm": ("num_hidden_layers", dict(_DECODER, num_key_value_heads=2)),
}
ARCHS = list(ARCH_SPECS)
FALLBACK_ARCHS = ["stablelm"]


def tiny_config(
    model_type: str = "llama", num_layers: int = 4, tie: bool | None = None, **overrides
) -> PretrainedConfig:
    """A tiny config of `model_type`; `tie` sets tie_word_embeddings (None keeps the architecture's default)."""
    layer_key, spec = ARCH_SPECS[model_type]
    kwargs = dict(spec, vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    kwargs[layer_key] = num_layers
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(
    model_type: str = "llama", num_layers: int = 4, tie: bool | None = False, seed: int = 0, **overrides
) -> PreTrainedModel:
    """A freshly initialised tiny causal LM in train mode (fp32, eager attention, deterministic weights).

    Untied by default so gradient tests compare disjoint parameters; pass tie=True (or None for the architecture's
    default) to test tied embeddings.
    """
    config = tiny_config(model_type, num_layers, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _perturb_norms(model, seed)
    return model.train()


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Move norm weights/biases off their 1/0 init so a wrong norm (or a skipped one) changes the numbers."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or "layer_norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def make_batch(batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids and labels (= input_ids), no padding, tokens drawn from the non-special ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def clone(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy (same weights, own parameters), e.g. a base model to compare the wrapped one with."""
    return copy.deepcopy(model)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    """Every architecture we build a tiny model for (all listed in lopt's table except FALLBACK_ARCHS)."""
    return request.param


@pytest.fixture
def llama() -> PreTrainedModel:
    return tiny_model("llama")


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


# --- the built-in model, "tiny" preset, built once per test session --------------------------------------------
@pytest.fixture(scope="session")
def builtin_tiny(tmp_path_factory):
    """Environment for subprocesses that use the built-in default (tiny preset, session cache), and its path."""
    import os

    from lopt.builtin.base import builtin_model_path

    cache = os.environ.get("LOPT_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("lopt-cache"))
    path = builtin_model_path(preset="tiny", cache_dir=cache, progress=False)
    env = {
        **os.environ,
        "LOPT_BUILTIN_PRESET": "tiny",
        "LOPT_CACHE_DIR": cache,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("LOPT_DEBUG", None)
    return {"env": env, "path": str(path), "cache": cache}
