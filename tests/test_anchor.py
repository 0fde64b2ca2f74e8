"""The anchor objectives ("anchor", "recon+anchor"): gradients against the independent reference, the frozen
pretrained copy (what it holds, its dtype, resuming), and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import ARCHS, clone, make_batch, tiny_model
from reference import pretrained_block_outputs
from test_model import ATOL, RTOL, _assert_same_grads, _grads, _reference, _step, _wrap

from lopt import LoPTConfig, get_lopt_model
from lopt.engine.anchor import ANCHOR_REFERENCE_NAME


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Move every weight a little, the same way for every copy, so the model differs from its pretrained self."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _check_anchor_against_reference(model_type: str, num_layers: int, tie: bool = False, **config) -> None:
    base = tiny_model(model_type, num_layers=num_layers, tie=tie)
    batch = make_batch()
    results = {}
    for mode in ("local", "joint"):
        lm = _wrap(clone(base), backward=mode, **config)  # the anchor snapshot is taken here...
        _perturb(lm.model)  # ...so after this the model has moved away from it
        out = _step(lm, batch)
        results[mode] = (_grads(lm), out, lm)

    lm = results["local"][2]
    moved = clone(base)
    _perturb(moved)
    anchor_states = pretrained_block_outputs(clone(base), model_type, lm.block_ranges, batch["input_ids"])
    ref_grads, ref_head_grads, ref_task, ref_auxes = _reference(moved, model_type, lm, batch, anchor_states)
    assert all(aux > 0 for aux in ref_auxes)  # the anchor term is really exercised
    for grads, out, lm in results.values():
        torch.testing.assert_close(out.task_loss, ref_task, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            torch.stack(lm.last_aux_losses), torch.stack(ref_auxes), atol=ATOL, rtol=RTOL
        )
        _assert_same_grads(grads, (ref_grads, ref_head_grads))


@pytest.mark.parametrize("model_type", ARCHS)
def test_recon_plus_anchor_gradients_match_reference(model_type):
    _check_anchor_against_reference(model_type, 4, aux_objective="recon+anchor", anchor_weight=0.5)


@pytest.mark.parametrize("objective", ["anchor", "recon+anchor"])
def test_anchor_gradients_match_reference_k3(objective):
    _check_anchor_against_reference("llama", 6, num_blocks=3, aux_objective=objective, anchor_weight=2.0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_tied_anchor_gradients_match_reference(model_type):
    """A tied embedding is late (the task loss trains it) but runs before the boundary: the reference keeps its
    pretrained copy, so the anchor target does not follow the trained matrix."""
    _check_anchor_against_reference(model_type, 4, tie=True, aux_objective="recon+anchor", anchor_weight=0.5)
    lm = get_lopt_model(tiny_model(model_type, tie=True), LoPTConfig(aux_objective="anchor"))
    assert {n for n, p in lm.model.named_parameters() if p is lm.embedding.weight} <= set(lm.anchor.params)


def test_anchor_alone_is_zero_at_the_pretrained_point():
    base = tiny_model("llama", num_layers=4)
    lm = get_lopt_model(clone(base), LoPTConfig(aux_objective="anchor"))
    assert len(lm.aux_heads) == 0
    out = _step(lm, make_batch())
    assert lm.last_aux_losses[0].item() == 0.0
    early = [p.grad for m in lm.early_block_modules(0) for p in m.parameters()]
    assert all(g is None or not g.any() for g in early)
    assert out.aux_loss.item() == 0.0


def test_reference_copies_only_trainable_pre_boundary_parameters():
    lm = get_lopt_model(tiny_model("llama", num_layers=4), LoPTConfig(aux_objective="anchor"))
    names = set(lm.anchor.params)
    assert "model.embed_tokens.weight" in names and any(n.startswith("model.layers.1.") for n in names)
    assert not any(
        n.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head")) for n in names
    )

    lora = peft.get_peft_model(
        tiny_model("llama", num_layers=4), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    lm = get_lopt_model(lora, LoPTConfig(aux_objective="recon+anchor"))
    assert lm.anchor.params and all(
        "lora_" in n for n in lm.anchor.params
    )  # frozen base weights are not copied
    _step(lm, make_batch())  # and the reference forward runs through PEFT


def test_bfloat16_reference_is_half_the_size_and_close():
    base = tiny_model("llama", num_layers=4)
    batch = make_batch()
    full = get_lopt_model(clone(base), LoPTConfig(aux_objective="anchor"))
    half = get_lopt_model(clone(base), LoPTConfig(aux_objective="anchor", anchor_dtype="bfloat16"))
    assert half.anchor.num_bytes * 2 == full.anchor.num_bytes
    assert {t.dtype for t in half.anchor.params.values()} == {torch.bfloat16}
    exact = full.anchor.boundary_states((), dict(batch))[0]
    approx = half.anchor.boundary_states((), dict(batch))[0]
    torch.testing.assert_close(approx.float(), exact, atol=0.05, rtol=0.05)
    _step(half, batch)
    assert torch.isfinite(half.last_aux_losses[0])


def test_anchor_reference_round_trip(tmp_path):
    base = tiny_model("llama", num_layers=4)
    lm = get_lopt_model(clone(base), LoPTConfig(aux_objective="anchor"))
    _perturb(lm.model)
    lm.save_aux_heads(tmp_path)
    assert (tmp_path / ANCHOR_REFERENCE_NAME).is_file()

    resumed = get_lopt_model(
        clone(lm.model), LoPTConfig(aux_objective="anchor")
    )  # snapshot of the moved model
    resumed.load_aux_heads(tmp_path)  # ...replaced by the original pretrained reference
    for name, tensor in lm.anchor.params.items():
        torch.testing.assert_close(resumed.anchor.params[name], tensor, atol=0, rtol=0)

    (tmp_path / ANCHOR_REFERENCE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="anchor reference"):
        resumed.load_aux_heads(tmp_path)


def test_calling_the_wrapped_model_works_and_a_submodule_is_refused():
    """Trainers call the HF model itself (the mixin keeps it), so that path must compute the reference too."""
    base = tiny_model("llama", num_layers=4)
    batch = make_batch()
    via_wrapper = _wrap(clone(base), aux_objective="recon+anchor")
    via_model = _wrap(clone(base), aux_objective="recon+anchor")
    for lm in (via_wrapper, via_model):
        _perturb(lm.model)
    via_wrapper(**batch).loss.backward()
    out = via_model.model(**batch)
    (out.loss + via_model.take_aux_loss()).backward()
    _assert_same_grads(_grads(via_model), _grads(via_wrapper))
    assert via_model._anchor_states is None  # dropped after the forward

    with pytest.raises(RuntimeError, match="not one of its submodules"):
        via_model.model.model(input_ids=batch["input_ids"])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"aux_objective": "mse"}, "aux_objective='mse'"),
        ({"anchor_weight": -1.0}, "anchor_weight=-1.0"),
        ({"anchor_dtype": "int8"}, "anchor_dtype='int8'"),
    ],
)
def test_invalid_anchor_config(bad, match):
    with pytest.raises(ValueError, match=match):
        LoPTConfig(**bad)
