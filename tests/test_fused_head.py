"""LoPT through TRL's fused LM head (`add_fused_lm_head`, called with fused_lm_head=True), the loss path `lopt sft`
trains through: local == joint == the independent oracle (tests/reference.py, which computes the loss from the
plain model's full logits) for every aux objective, with checkpointing and with LoRA."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import clone, make_batch, tiny_model
from reference import pretrained_block_outputs
from test_anchor import _perturb
from test_model import ATOL, RTOL, _assert_same_grads, _grads, _reference, _step, _wrap
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

from lopt.experiments.meter import SavedTensorMeter


def _fused(model):
    add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return model


def _lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(7)
    return peft.get_peft_model(model, config)


def _check(objective: str, gc: bool = False, lora: bool = False, num_layers: int = 4, **config) -> None:
    base = tiny_model("llama", num_layers=num_layers)
    batch = make_batch()
    fused_batch = {**batch, "fused_lm_head": True}
    anchored = objective != "recon"
    results = {}
    for mode in ("local", "joint"):
        model = _fused(clone(base))
        if lora:
            model = _lora(model)
        lm = _wrap(model, backward=mode, aux_objective=objective, anchor_weight=0.5, **config)
        if anchored:
            _perturb(lm.model)  # move away from the anchor's snapshot so the anchor term is exercised
        if gc:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = _step(lm, fused_batch)
        assert isinstance(out, FusedCausalLMOutput)  # really the fused path, not the model's own loss
        results[mode] = (_grads(lm), out, lm)
    _assert_same_grads(results["local"][0], results["joint"][0])

    lm = results["local"][2]
    oracle = clone(base)  # the plain model (no fused head): the oracle computes the loss from full logits
    if lora:
        oracle = _lora(oracle)
        oracle.load_state_dict(lm.model.state_dict())
    anchor_states = None
    if anchored:
        _perturb(oracle)
        anchor_states = pretrained_block_outputs(clone(base), "llama", lm.block_ranges, batch["input_ids"])
    ref_grads, ref_head_grads, ref_task, ref_auxes = _reference(oracle, "llama", lm, batch, anchor_states)
    for grads, out, lm in results.values():
        torch.testing.assert_close(out.task_loss, ref_task, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            torch.stack(lm.last_aux_losses), torch.stack(ref_auxes), atol=ATOL, rtol=RTOL
        )
        _assert_same_grads(grads, (ref_grads, ref_head_grads))


@pytest.mark.parametrize("objective", ["recon", "anchor", "recon+anchor"])
def test_fused_head_gradients_match_reference(objective):
    _check(objective, num_layers=6, num_blocks=3)


@pytest.mark.parametrize("objective", ["recon", "recon+anchor"])
def test_fused_head_with_checkpointing_matches_reference(objective):
    _check(objective, gc=True)


def test_fused_head_with_lora_matches_reference():
    _check("recon", lora=True, num_layers=6, num_blocks=3)


def test_fused_head_saves_no_logits():
    """The reason to measure through it: no [B, T, V] logits are saved, so the plain loss saves more."""
    vocab = 4096  # large enough that logits dominate a tiny model's activations
    base = tiny_model("llama", num_layers=2, vocab_size=vocab)
    ids = torch.randint(3, vocab, (2, 32))
    plain = clone(base)
    with SavedTensorMeter() as plain_meter:
        plain(input_ids=ids, labels=ids).loss.backward()
    fused = _fused(clone(base))
    with SavedTensorMeter() as fused_meter:
        fused(input_ids=ids, labels=ids, fused_lm_head=True).loss.backward()
    log_softmax_bytes = 2 * 31 * vocab * 4  # the plain loss keeps log-softmax of the shifted fp32 logits
    assert plain_meter.peak - fused_meter.peak >= log_softmax_bytes


def test_compare_measures_activations_through_the_fused_head(builtin_tiny):
    from lopt.experiments.compare.runs import activation_peak_bytes
    from lopt.experiments.compare.spec import CompareSpec

    spec = CompareSpec(methods=["e2e", "lopt", "lora"], seeds=1)
    fused = {m: activation_peak_bytes(builtin_tiny["path"], m, spec) for m in ("e2e", "lopt", "lora")}
    plain = {m: activation_peak_bytes(builtin_tiny["path"], m, spec, head="hf") for m in ("e2e", "lopt")}
    assert fused["lopt"] < fused["e2e"] and fused["lora"] > 0
    assert fused["e2e"] < plain["e2e"] and fused["lopt"] < plain["lopt"]
