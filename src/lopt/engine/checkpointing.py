"""Selective activation checkpointing: checkpoint only some decoder layers, keep the others' activations.

Every layer checkpointed costs a recomputed forward in the backward and keeps only its input; every layer left out
keeps all its activations and costs nothing. Checkpointing the earliest layers first is the usual trade: the memory
saved is the same per layer, and under LoPT the last block's layers are the ones alive with the task loss.

This uses transformers' own per-layer switch: `model.activation_checkpointing_enable(...)` (the older name
`gradient_checkpointing_enable` where that is all there is) sets every decoder layer's `gradient_checkpointing`
flag and its checkpoint function, non-reentrant (LoPT's detached boundary needs it); then the flag is turned off on
the layers not chosen. Plain torch here: the model is reached through its methods and flags only.

    from lopt.engine.checkpointing import enable_selective_checkpointing
    enable_selective_checkpointing(model, 15)       # the earliest 15 decoder layers
    enable_selective_checkpointing(model, 0.5)      # the earliest half
    enable_selective_checkpointing(model, [0, 1, 2])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from lopt.engine.architectures import find_decoder_parts

FLAG = "--checkpoint_layers"
FORMS = "write a count (15: the earliest 15), a fraction (0.5) or layer indices (0,1,2)"


def checkpoint_layers_form(
    value: int | float | str | Sequence[int], flag: str = FLAG
) -> int | float | list[int]:
    """The selection's form before the depth is known: a count (int >= 1), a fraction (float in (0, 1]) or indices
    (a list of distinct ints >= 0). Raises ValueError in one line naming the value and the fix."""
    if isinstance(value, bool):
        raise ValueError(f"{flag} {value!r} is not a layer selection: {FORMS}.")
    original = value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError(f"{flag} is empty: {FORMS}.")
        if "," in text:
            items = [item.strip() for item in text.split(",")]
            if not all(items[:-1]) or items == [""]:  # one trailing comma allowed: "3," is layer 3
                raise ValueError(f"{flag} {original!r} has an empty item: {FORMS}.")
            try:
                value = [int(item) for item in items if item]
            except ValueError:
                raise ValueError(f"{flag} {original!r} is not a list of layer indices: {FORMS}.") from None
        else:
            try:
                value = int(text) if text.lstrip("+-").isdigit() else float(text)
            except ValueError:
                raise ValueError(f"{flag} {original!r} is not a number: {FORMS}.") from None
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"{flag} {original!r}: a fraction must be in (0, 1]; {FORMS}.")
        return value
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{flag} {original!r}: a count must be at least 1; {FORMS}.")
        return value
    layers = list(value)
    if not layers:
        raise ValueError(f"{flag} is an empty list: {FORMS}.")
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"{flag} {original!r}: layer {bad[0]!r} is out of range; indices start at 0.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{flag} {original!r} names a layer twice: list each layer once.")
    return layers


def parse_checkpoint_layers(
    value: int | float | str | Sequence[int], num_layers: int, flag: str = FLAG
) -> list[int]:
    """The decoder layers to checkpoint, sorted: a count (the earliest N), a fraction of the layers (the earliest
    round(f x L), at least one), or explicit indices (a list, or text with commas: "0,1,2"; one index: "3,").
    Raises ValueError in one line naming the value and the fix."""
    form = checkpoint_layers_form(value, flag)
    if isinstance(form, float):
        return list(range(max(1, round(form * num_layers))))
    if isinstance(form, int):
        if form > num_layers:
            raise ValueError(
                f"{flag} {value!r}: a count must be between 1 and {num_layers} (the model's layers); {FORMS}."
            )
        return list(range(form))
    bad = [i for i in form if i >= num_layers]
    if bad:
        raise ValueError(
            f"{flag} {value!r}: layer {bad[0]} is out of range; indices go from 0 to {num_layers - 1} "
            f"({num_layers} layers)."
        )
    return sorted(form)


def _decoder_model(model: nn.Module) -> nn.Module:
    """The transformers model (a PEFT wrapper's too): what `activation_checkpointing_enable` belongs to. A LoPT
    wrapper's `model` is what it wraps."""
    from lopt.engine.model import LoPTModel

    return model.model if isinstance(model, LoPTModel) else model


def select_checkpointed_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Keep checkpointing on exactly `layers` (indices, already parsed) among the decoder layers of a model whose
    checkpointing is enabled (the trainer enables all of them); the others keep their activations. Returns the
    indices checkpointed."""
    parts = find_decoder_parts(_decoder_model(model))
    chosen = set(layers)
    for index, layer in enumerate(parts.layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise ValueError(
                f"{FLAG}: decoder layer {index} ({type(layer).__name__}) has no per-layer checkpointing switch "
                "(transformers' GradientCheckpointingLayer): use --gradient_checkpointing for all layers."
            )
        if index in chosen and getattr(layer, "_gradient_checkpointing_func", None) is None:
            raise ValueError(
                f"{FLAG}: activation checkpointing is not enabled on this model: call "
                "enable_selective_checkpointing, or enable it first (--gradient_checkpointing true)."
            )
        layer.gradient_checkpointing = index in chosen
    return checkpointed_layers(model)


def enable_selective_checkpointing(model: nn.Module, layers: int | float | str | Sequence[int]) -> list[int]:
    """Enable non-reentrant activation checkpointing on `model` (a transformers causal LM, PEFT-wrapped or not, or
    a LoPT model) for the chosen decoder layers only: a count (the earliest N), a fraction, or indices (see
    `parse_checkpoint_layers`). Returns the indices checkpointed."""
    inner = _decoder_model(model)
    chosen = parse_checkpoint_layers(layers, find_decoder_parts(inner).num_layers)
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5 name, same function
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return select_checkpointed_layers(model, chosen)


def checkpointed_layers(model: nn.Module) -> list[int]:
    """The indices of the decoder layers that checkpoint their activations in training."""
    parts = find_decoder_parts(_decoder_model(model))
    return [i for i, layer in enumerate(parts.layers) if getattr(layer, "gradient_checkpointing", False)]
