"""Selective activation checkpointing (lopt.engine.checkpointing, --checkpoint_layers): exactly the chosen decoder
layers recompute in the backward, the gradients equal those without checkpointing (e2e and LoPT), and every bad
value is refused in one line."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import clone, make_batch, tiny_model

from lopt import LoPTConfig, find_decoder_parts, get_lopt_model
from lopt.engine.checkpointing import (
    checkpointed_layers,
    enable_selective_checkpointing,
    parse_checkpoint_layers,
    select_checkpointed_layers,
)


@pytest.mark.parametrize(
    "value, expected",
    [
        (3, [0, 1, 2]),
        ("3", [0, 1, 2]),
        (6, [0, 1, 2, 3, 4, 5]),
        (0.5, [0, 1, 2]),
        ("0.5", [0, 1, 2]),
        ("0.1", [0]),  # at least one layer
        ("1.0", [0, 1, 2, 3, 4, 5]),
        ("4,1", [1, 4]),
        ("5,", [5]),
        ([0, 2], [0, 2]),
    ],
)
def test_parse_count_fraction_and_indices(value, expected):
    assert parse_checkpoint_layers(value, 6) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "is empty"),
        ("  ", "is empty"),
        ("lots", "is not a number"),
        ("1,x", "is not a list of layer indices"),
        ("1,,2", "empty item"),
        (0, "at least 1"),
        ("7", "between 1 and 6"),
        (-1, "at least 1"),
        (1.5, "must be in (0, 1]"),
        ("0.0", "must be in (0, 1]"),
        ("nan", "must be in (0, 1]"),
        ("0,6", "layer 6 is out of range"),
        ([-1], "layer -1 is out of range; indices start at 0"),
        ([], "empty list"),
        ("1,1", "names a layer twice"),
        (True, "not a layer selection"),
    ],
)
def test_bad_values_are_refused_in_one_line(value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_checkpoint_layers(value, 6)
    text = str(err.value)
    assert "\n" not in text and text.startswith("--checkpoint_layers")


def _recompute_counter(model) -> list[int]:
    """Each layer's first sub-module runs twice when its layer is recomputed in the backward: calls[j] counts."""
    parts = find_decoder_parts(model.model if hasattr(model, "lopt_config") else model)
    calls = [0] * parts.num_layers
    for j, layer in enumerate(parts.layers):
        first_child = next(iter(layer.children()))
        first_child.register_forward_hook(lambda *_, j=j: calls.__setitem__(j, calls[j] + 1))
    return calls


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("layers, chosen", [(2, [0, 1]), ("0.5", [0, 1, 2]), ("1,4", [1, 4])])
def test_e2e_gradients_equal_no_checkpointing_and_only_chosen_layers_recompute(layers, chosen):
    base = tiny_model("llama", num_layers=6)
    batch = make_batch()
    plain = clone(base)
    plain(**batch).loss.backward()

    model = clone(base)
    assert enable_selective_checkpointing(model, layers) == chosen
    assert checkpointed_layers(model) == chosen
    calls = _recompute_counter(model)
    model(**batch).loss.backward()
    assert calls == [2 if j in chosen else 1 for j in range(6)]
    _assert_same(_grads(model), _grads(plain))


@pytest.mark.parametrize("mode", ["local", "joint"])
def test_lopt_gradients_equal_no_checkpointing_with_the_last_block_checkpointed(mode):
    """LoPT k=3 on 6 layers: blocks [0,2), [2,4), [4,6). Checkpoint the last block and one early layer."""
    base = tiny_model("llama", num_layers=6)
    batch = make_batch()

    def wrapped():
        torch.manual_seed(0)
        return get_lopt_model(clone(base), LoPTConfig(num_blocks=3, backward=mode))

    plain = wrapped()
    expected = plain(**batch)
    expected.loss.backward()
    lm = wrapped()
    chosen = enable_selective_checkpointing(lm, "1,4,5")
    assert chosen == checkpointed_layers(lm) == [1, 4, 5]
    calls = _recompute_counter(lm)
    out = lm(**batch)
    out.loss.backward()
    assert calls == [1, 2, 1, 1, 2, 2]
    torch.testing.assert_close(out.loss, expected.loss)
    _assert_same(_grads(lm.model), _grads(plain.model))
    for head, ref in zip(lm.aux_heads, plain.aux_heads):
        _assert_same(_grads(head), _grads(ref))


def test_select_keeps_the_trainer_enabled_checkpointing_on_chosen_layers_only():
    """What the trainer's callback does after train() has enabled checkpointing on every layer."""
    model = tiny_model("llama", num_layers=4)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed_layers(model) == [0, 1, 2, 3]
    assert select_checkpointed_layers(model, [3]) == [3]
    fresh = tiny_model("llama", num_layers=4)
    with pytest.raises(ValueError, match="not enabled"):
        select_checkpointed_layers(fresh, [0])


def test_cli_flag_turns_checkpointing_on_and_checks_its_form():
    from lopt.cli import sft
    from lopt.errors import UserError

    parsed, set_fields = sft.make_parser().parse(["--checkpoint_layers", "0.5"], sft.recipe)
    assert parsed[0].checkpoint_layers == "0.5" and parsed[-1].activation_checkpointing is True
    parsed[0].check(set_fields)
    parsed, set_fields = sft.make_parser().parse(["--checkpoint_layers", "half"], sft.recipe)
    with pytest.raises(UserError, match="--checkpoint_layers 'half' is not a number"):
        parsed[0].check(set_fields)
