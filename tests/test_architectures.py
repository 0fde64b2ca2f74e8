"""Per-architecture behaviour: part discovery, unchanged inference, the gradient boundary, tied embeddings, and
clear errors for models LoPT cannot train."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, FALLBACK_ARCHS, HIDDEN, VOCAB, clone, make_batch, tiny_model
from reference import PARTS, causal_lm_loss
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
)

from lopt import ARCHITECTURES, LoPTConfig, LoPTModel, find_decoder_parts, get_lopt_model

BERT = dict(
    hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB
)


def _get(module, path):
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _is_zero(grad) -> bool:
    return grad is None or bool((grad == 0).all())


def _nonzero(grad) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


# --- part discovery -------------------------------------------------------------------------------------
def test_every_built_architecture_is_listed_or_a_fallback():
    assert set(ARCHS) - set(FALLBACK_ARCHS) <= set(ARCHITECTURES)
    assert not set(FALLBACK_ARCHS) & set(ARCHITECTURES)


def test_find_decoder_parts(arch):
    model = tiny_model(arch)
    parts = find_decoder_parts(model)
    layers_path, norm_path, head_path = PARTS[arch]
    assert parts.layers is _get(model, layers_path)
    assert parts.num_layers == 4
    assert parts.final_norm is _get(model, norm_path)
    assert parts.lm_head is _get(model, head_path)
    assert parts.embedding is model.get_input_embeddings()
    assert parts.source == ("fallback" if arch in FALLBACK_ARCHS else f"table:{arch}")


# --- inference is the base model's ---------------------------------------------------------------------
def test_logits_equal_base_model_and_no_aux_work_outside_training(arch):
    base = tiny_model(arch)
    lm = get_lopt_model(clone(base), LoPTConfig(num_blocks=2))
    batch = make_batch()

    base.eval()
    lm.eval()
    with torch.no_grad():
        expected = base(**batch)
    out = lm(**batch)  # eval mode, grad enabled: the hooks must still do nothing
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    assert "aux_loss" not in out and "task_loss" not in out
    assert lm.last_aux_losses == [] and lm.take_aux_loss() is None

    lm.train()
    with torch.no_grad():
        out = lm(**batch)  # train mode under no_grad (generation, reference log-probs)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    assert lm.last_aux_losses == [] and lm.take_aux_loss() is None
    assert all(p.grad is None for p in lm.parameters()), "no backward may run outside a training forward"


def test_training_forward_logits_equal_base_model(arch):
    """The detach changes gradients, never values: a training forward returns the base model's logits."""
    base = tiny_model(arch)
    lm = get_lopt_model(clone(base), LoPTConfig(num_blocks=2, backward="joint"))
    batch = make_batch()
    expected = base(**batch).logits
    out = lm(**batch)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.task_loss, causal_lm_loss(expected, batch["labels"]).detach())
    assert len(lm.last_aux_losses) == 1


# --- the gradient boundary -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["local", "joint"])
def test_task_loss_reaches_only_the_last_block(arch, mode):
    lm = get_lopt_model(tiny_model(arch), LoPTConfig(num_blocks=2, aux_weight=0.0, backward=mode))
    out = lm(**make_batch())
    out.loss.backward()
    parts = find_decoder_parts(lm.model)
    late = {id(p) for m in lm.late_modules() for p in m.parameters()}
    early = [(n, p) for n, p in lm.model.named_parameters() if id(p) not in late]
    assert any(p is parts.embedding.weight for _, p in early)
    assert any(n.startswith(PARTS[arch][0] + ".0.") for n, _ in early)
    for name, param in early:
        assert _is_zero(param.grad), f"task loss reached early parameter {name}"
    for head in lm.aux_heads:
        assert all(_is_zero(p.grad) for p in head.parameters())
    start, end = lm.block_ranges[-1]
    late_modules = {"final norm": parts.final_norm, "lm head": parts.lm_head}
    late_modules.update({f"layer {j}": parts.layers[j] for j in range(start, end)})
    for name, module in late_modules.items():
        assert any(_nonzero(p.grad) for p in module.parameters()), f"{name} got no task gradient"
    # every parameter of the last block is reached (a layer silently skipped would show up here)
    for name, param in parts.layers[start:end].named_parameters():
        assert param.grad is not None, name


# --- tied embeddings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "gemma2", "opt", "falcon", "llama"])
def test_tied_embeddings_stay_one_matrix_by_default(model_type):
    """The default keeps the tie: the task loss reaches the shared matrix through the head, and nothing else early."""
    model = tiny_model(model_type, tie=True)
    shared = model.get_input_embeddings().weight
    lm = get_lopt_model(model, LoPTConfig(aux_weight=0.0))
    assert model.get_output_embeddings().weight is shared and model.get_input_embeddings().weight is shared
    assert model.config.tie_word_embeddings is True
    assert model.config.get_text_config().tie_word_embeddings is True
    lm(**make_batch()).loss.backward()
    assert _nonzero(shared.grad)
    late = {id(p) for m in lm.late_modules() for p in m.parameters()}
    assert id(shared) in late
    for name, param in lm.model.named_parameters():
        if id(param) not in late:
            assert _is_zero(param.grad), f"task loss reached early parameter {name}"


@pytest.mark.parametrize("model_type", ["gpt2", "gemma2", "opt", "falcon", "llama"])
def test_untie_embeddings_unties_at_wrap_time(model_type):
    model = tiny_model(model_type, tie=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = model.get_input_embeddings().weight.detach().clone()
    lm = get_lopt_model(model, LoPTConfig(aux_weight=0.0, untie_embeddings=True))
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not embedding and head.data_ptr() != embedding.data_ptr()
    assert head.requires_grad
    torch.testing.assert_close(head.detach(), before, rtol=0, atol=0)
    assert model.config.tie_word_embeddings is False
    assert model.config.get_text_config().tie_word_embeddings is False
    lm(**make_batch()).loss.backward()
    assert _is_zero(embedding.grad) and _nonzero(head.grad)


# --- unsupported models --------------------------------------------------------------------------------------
def test_plain_module_is_refused():
    with pytest.raises(TypeError, match="config"):
        get_lopt_model(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8)))


def test_module_with_non_hf_config_is_refused():
    model = nn.Linear(4, 4)
    model.config = object()
    with pytest.raises((TypeError, ValueError), match="Supported model types"):
        get_lopt_model(model)


def _assert_refused_and_unchanged(model, *fragments):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((TypeError, ValueError)) as info:
        get_lopt_model(model)
    for fragment in fragments:
        assert fragment in str(info.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bert_base_model_is_refused_with_what_was_searched():
    model = AutoModel.from_config(AutoConfig.for_model("bert", **BERT))
    _assert_refused_and_unchanged(
        model,
        "BertModel",
        "get_output_embeddings()=missing",
        "final norm",
        "Supported model types",
        "llama",
        "gpt2",
    )


def test_bert_masked_lm_is_refused():
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model("bert", **BERT))
    _assert_refused_and_unchanged(model, "BertForMaskedLM", "Supported model types")


def test_encoder_decoder_model_is_refused():
    """T5 is not a decoder-only LM: its *encoder* blocks must not be mistaken for a decoder stack."""
    config = AutoConfig.for_model(
        "t5", d_model=32, d_ff=64, num_layers=4, num_heads=4, d_kv=8, vocab_size=VOCAB
    )
    model = AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises((TypeError, ValueError)):
        get_lopt_model(model)


def test_base_model_without_lm_head_is_refused():
    model = AutoModel.from_config(tiny_model("llama").config)
    _assert_refused_and_unchanged(model, "LlamaModel", "ForCausalLM")


def test_already_wrapped_model_is_refused(llama):
    lm = get_lopt_model(llama)
    with pytest.raises(TypeError, match="already a LoPTModel"):
        get_lopt_model(lm)


def test_causal_lm_from_auto_class_is_accepted():
    model = AutoModelForCausalLM.from_config(tiny_model("qwen3").config)
    assert isinstance(get_lopt_model(model), LoPTModel)
