"""Where each architecture keeps its embedding, decoder layers, final norm and LM head.

One table keyed by `config.model_type`, plus a structural fallback for decoder LMs we have not listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type -> (embedding, decoder layer list, final norm, LM head), as attribute paths from the CausalLM.
_LLAMA_LIKE = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")
ARCHITECTURES: dict[str, tuple[str, str, str, str]] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "starcoder2",
            "smollm3",
            "helium",
        ],
        _LLAMA_LIKE,
    ),
    "phi": ("model.embed_tokens", "model.layers", "model.final_layernorm", "lm_head"),
    "gpt2": ("transformer.wte", "transformer.h", "transformer.ln_f", "lm_head"),
    "gptj": ("transformer.wte", "transformer.h", "transformer.ln_f", "lm_head"),
    "falcon": ("transformer.word_embeddings", "transformer.h", "transformer.ln_f", "lm_head"),
    "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head"),
    "opt": (
        "model.decoder.embed_tokens",
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        "lm_head",
    ),
}
_FALLBACK_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")


@dataclass
class DecoderParts:
    """The four pieces of a decoder-only LM that LoPT needs to see."""

    embedding: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    source: str  # "table:<model_type>" or "fallback", for error messages and repr

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _get(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA etc.), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_decoder_parts(model: nn.Module) -> DecoderParts:
    """Locate embedding / layers / final norm / LM head, or raise a TypeError saying what was searched."""
    hf_model = unwrap_peft(model)
    config = getattr(hf_model, "config", None)
    if config is None:
        raise TypeError(
            f"{type(model).__name__} has no `.config`: get_lopt_model expects a transformers causal LM "
            "(e.g. AutoModelForCausalLM.from_pretrained(...))."
        )
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(ARCHITECTURES))
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(
            f"{type(hf_model).__name__} (model_type={model_type!r}) is an encoder-decoder model; LoPT cuts the layer "
            f"stack of a decoder-only causal LM. Supported model types: {supported}."
        )
    if model_type in ARCHITECTURES:
        paths = ARCHITECTURES[model_type]
        found = [_get(hf_model, p) for p in paths]
        missing = [p for p, m in zip(paths, found) if m is None]
        if missing:
            raise TypeError(
                f"{type(hf_model).__name__} (model_type={model_type!r}) lacks {missing}; LoPT needs a "
                "*ForCausalLM model, not a base model or a multimodal wrapper."
            )
        parts = DecoderParts(*found, source=f"table:{model_type}")
    else:
        parts = _fallback(hf_model, model_type, supported)
    if not isinstance(parts.layers, nn.ModuleList) or len(parts.layers) == 0:
        raise TypeError(
            f"{type(hf_model).__name__}: the decoder layers found are not a non-empty nn.ModuleList."
        )
    return parts


def _fallback(hf_model: nn.Module, model_type, supported: str) -> DecoderParts:
    """Structural search: input/output embeddings from the HF API, the decoder ModuleList by layer count."""
    config = (
        hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    )
    num_layers = getattr(config, "num_hidden_layers", None)
    embedding = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    lm_head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    layers, layers_owner = None, None
    for _, module in hf_model.named_modules():
        for _, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers:
                layers, layers_owner = child, module
                break
        if layers is not None:
            break
    final_norm = None
    if layers_owner is not None:
        final_norm = next(
            (getattr(layers_owner, n) for n in _FALLBACK_NORM_NAMES if hasattr(layers_owner, n)), None
        )
    if None in (embedding, lm_head, layers, final_norm):
        raise TypeError(
            f"Cannot apply LoPT to {type(hf_model).__name__} (model_type={model_type!r}): searched "
            f"get_input_embeddings()={'found' if embedding is not None else 'missing'}, "
            f"get_output_embeddings()={'found' if lm_head is not None else 'missing'}, "
            f"an nn.ModuleList of num_hidden_layers={num_layers} layers="
            f"{'found' if layers is not None else 'missing'}, and a final norm named one of "
            f"{list(_FALLBACK_NORM_NAMES)}={'found' if final_norm is not None else 'missing'}. "
            f"Supported model types: {supported}. Add an entry to lopt.engine.architectures.ARCHITECTURES to support it."
        )
    return DecoderParts(embedding, layers, final_norm, lm_head, source="fallback")


def hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer is called with (first positional argument or `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]
