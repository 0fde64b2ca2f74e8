"""The LoPT step: gradients against the independent reference, backward modes, checkpointing, accumulation,
mixed precision, saving, PEFT, optimizer groups, generation and unloading."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from conftest import ARCHS, clone, make_batch, tiny_model
from reference import (
    PARTS,
    ReferenceAuxHead,
    causal_lm_loss,
    reference_gradients,
    split_layers,
    tied_reference_gradients,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lopt import LoPTConfig, LoPTModel, find_decoder_parts, get_lopt_model, param_groups

ATOL, RTOL = 1e-6, 1e-5


# --- helpers -------------------------------------------------------------------------------------------------
def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _wrap(model, seed: int = 0, **config) -> LoPTModel:
    """get_lopt_model with seeded aux heads, moved off their near-zero init so every gradient path is exercised."""
    torch.manual_seed(seed)
    lm = get_lopt_model(model, LoPTConfig(**config))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in lm.aux_heads.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return lm


def _step(lm: LoPTModel, batch: dict, scale: float = 1.0):
    """One training forward + backward of `scale * loss`, telling the local backward the same scale."""
    lm.loss_scale = scale
    out = lm(**batch)
    (scale * out.loss).backward()
    return out


def _grads(lm: LoPTModel) -> tuple[dict, list]:
    model_grads = {n: p.grad for n, p in _base(lm.model).named_parameters()}
    head_grads = [[p.grad for p in head.parameters()] for head in lm.aux_heads]
    return model_grads, head_grads


def _assert_same_grad(actual, expected, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    """None and all-zero both mean "no gradient"; anything else must match within tolerance."""
    if expected is None:
        assert actual is None or not actual.any(), f"{what}: expected no gradient"
        return
    actual = torch.zeros_like(expected) if actual is None else actual
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _assert_same_grads(actual: tuple[dict, list], expected: tuple[dict, list], **tol) -> None:
    (model_a, heads_a), (model_e, heads_e) = actual, expected
    assert model_a.keys() == model_e.keys()
    for name in model_e:
        _assert_same_grad(model_a[name], model_e[name], name, **tol)
    assert len(heads_a) == len(heads_e)
    for i, (head_a, head_e) in enumerate(zip(heads_a, heads_e)):
        for j, (a, e) in enumerate(zip(head_a, head_e)):
            _assert_same_grad(a, e, f"aux head {i} param {j}", **tol)


def _is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _reference(base_copy, model_type: str, lm: LoPTModel, batch: dict, anchor_states=None):
    """Reference gradients, losses for the (unwrapped, identical) copy of lm's model, with lm's aux heads (none for
    the "anchor" objective) and, for the anchor objectives, the pretrained model's block outputs. A tied copy gets
    the tied oracle (the embedding's and the head's gradients of an untied copy, summed)."""
    heads = None
    if lm.lopt_config.uses_reconstruction:
        hidden = lm.aux_heads[0].norm.weight.shape[0]
        heads = [
            ReferenceAuxHead(hidden, lm.lopt_config.aux_head_ratio).load_lopt_state(h.state_dict())
            for h in lm.aux_heads
        ]
    oracle = tied_reference_gradients if _is_tied(_base(base_copy)) else reference_gradients
    return oracle(
        base_copy,
        model_type,
        heads,
        lm.block_ranges,
        lm.lopt_config.aux_weight,
        batch["input_ids"],
        batch["labels"],
        anchor_states=anchor_states,
        anchor_weight=lm.lopt_config.anchor_weight,
        task_weight=lm.lopt_config.task_weight if lm.lopt_config.uses_task else None,
    )


def _check_against_reference(
    model_type: str, num_layers: int, expected_ranges, tie: bool = False, **config
) -> None:
    base = tiny_model(model_type, num_layers=num_layers, tie=tie)
    batch = make_batch()
    results = {}
    for mode in ("local", "joint"):
        lm = _wrap(clone(base), backward=mode, **config)
        assert lm.block_ranges == expected_ranges
        assert _is_tied(lm.model) == tie  # LoPT keeps a tie by default
        out = _step(lm, batch)
        results[mode] = (_grads(lm), out, lm)
    lm = results["local"][2]
    ref_model_grads, ref_head_grads, ref_task, ref_auxes = _reference(clone(base), model_type, lm, batch)
    assert len(ref_auxes) == len(expected_ranges) - 1
    for grads, out, lm in results.values():
        torch.testing.assert_close(out.task_loss, ref_task, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            torch.stack(lm.last_aux_losses), torch.stack(ref_auxes), atol=ATOL, rtol=RTOL
        )
        objective = ref_task + lm.lopt_config.aux_weight * torch.stack(ref_auxes).mean()
        torch.testing.assert_close(out.loss.detach(), objective, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.aux_loss, objective - ref_task, atol=ATOL, rtol=RTOL)
        _assert_same_grads(grads, (ref_model_grads, ref_head_grads))
    # and, directly, local == joint
    _assert_same_grads(results["local"][0], results["joint"][0])


# --- gradients against the reference ---------------------------------------------------------------------------
def test_reference_matches_end_to_end_when_blocks_are_trivial():
    """Sanity check of the oracle: with aux_weight=0 its late gradients are the plain model's task gradients."""
    base = tiny_model("llama")
    batch = make_batch()
    heads = [ReferenceAuxHead(32)]
    grads, _, task, _ = reference_gradients(clone(base), "llama", heads, [(0, 2), (2, 4)], 0.0, **batch)
    loss = base(**batch).loss
    torch.testing.assert_close(task, loss.detach())
    loss.backward()
    for name, param in base.named_parameters():
        if name.startswith(("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head.")):
            torch.testing.assert_close(grads[name], param.grad, atol=ATOL, rtol=RTOL)
        else:
            assert grads[name] is None or not grads[name].any(), name


@pytest.mark.parametrize("model_type", ARCHS)
def test_gradients_match_reference_k2(model_type):
    _check_against_reference(model_type, 4, [(0, 2), (2, 4)], num_blocks=2)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize(
    ("num_layers", "config", "expected"),
    [
        (8, dict(num_blocks=4), [(0, 2), (2, 4), (4, 6), (6, 8)]),
        (5, dict(num_blocks=2), [(0, 3), (3, 5)]),
        (4, dict(num_blocks=4, aux_weight=3.0), [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (6, dict(boundaries=[1, 4]), [(0, 1), (1, 4), (4, 6)]),
    ],
    ids=["8L-k4", "5L-k2-uneven", "4L-k4-single-layers", "6L-boundaries-1-4"],
)
def test_gradients_match_reference_block_layouts(model_type, num_layers, config, expected):
    assert split_layers(num_layers, config.get("num_blocks", 2), config.get("boundaries")) == expected
    _check_against_reference(model_type, num_layers, expected, **config)


# --- a tied embedding and LM head: one parameter -------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "opt", "falcon"])
def test_tied_gradients_match_reference_k2(model_type):
    """The shared matrix's gradient is block 0's local gradient through the embedding plus the task gradient through
    the head; every other parameter gets what it gets untied (no gradient crosses a boundary)."""
    _check_against_reference(model_type, 4, [(0, 2), (2, 4)], tie=True, num_blocks=2)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_tied_gradients_match_reference_k3(model_type):
    _check_against_reference(model_type, 6, [(0, 2), (2, 4), (4, 6)], tie=True, num_blocks=3)


def test_tied_matrix_gets_the_local_and_the_task_gradient():
    """Not vacuous: in local mode the local backward writes the embedding's part during the forward, and the task
    backward adds the head's part to the same .grad."""
    lm = _wrap(tiny_model("llama", tie=True))
    shared = lm.embedding.weight
    out = lm(**make_batch())
    local = shared.grad.clone()
    assert local.any()
    out.loss.backward()
    task = shared.grad - local
    assert task.any() and not torch.allclose(task, local)


def test_tied_matrix_is_one_parameter_in_the_late_group():
    base = tiny_model("llama", tie=True)
    base_numel = sum(p.numel() for p in base.parameters())
    lm = get_lopt_model(base, LoPTConfig(num_blocks=2))
    shared = lm.embedding.weight
    assert lm.model.lm_head.weight is shared and lm.config.tie_word_embeddings is True
    aux = sum(p.numel() for p in lm.aux_heads.parameters())
    assert sum(p.numel() for p in lm.parameters()) == base_numel + aux  # no second matrix
    groups = param_groups(lm, lr=1e-3, early_lr=1e-4)
    assert [g["name"] for g in groups for p in g["params"] if p is shared] == ["late"]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(lm.parameters()))
    torch.optim.AdamW(groups)  # torch refuses a parameter listed twice

    # untie_embeddings=True: the authors' setting, one more matrix, the embedding back in the early group
    untied = get_lopt_model(tiny_model("llama", tie=True), LoPTConfig(untie_embeddings=True))
    assert untied.model.lm_head.weight is not untied.embedding.weight
    assert untied.config.tie_word_embeddings is False
    assert sum(p.numel() for p in untied.parameters()) == base_numel + aux + shared.numel()
    by_name = {g["name"]: g for g in param_groups(untied, lr=1e-3, early_lr=1e-4)}
    assert any(p is untied.embedding.weight for p in by_name["early"]["params"])
    assert any(p is untied.model.lm_head.weight for p in by_name["late"]["params"])


def test_trainer_optimizer_holds_the_tied_matrix_once_in_the_late_group(tmp_path):
    from transformers import TrainingArguments

    from lopt.integrations import LoPTTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=1e-3)
    trainer = LoPTTrainer(
        model=tiny_model("llama", tie=True), args=args, lopt_config=LoPTConfig(), early_learning_rate=1e-4
    )
    optimizer = trainer.create_optimizer()
    shared = trainer.model.lm_head.weight
    assert shared is trainer.model.model.embed_tokens.weight
    holding = [g for g in optimizer.param_groups for p in g["params"] if p is shared]
    assert len(holding) == 1 and holding[0]["name"] == "late" and holding[0]["lr"] == 1e-3


@pytest.mark.parametrize("mode", ["local", "joint"])
def test_task_loss_alone_never_reaches_early_blocks(mode):
    """With aux_weight > 0, backpropagating only the task loss (computed from the logits) adds nothing early."""
    lm = _wrap(tiny_model("llama"), backward=mode, aux_weight=10.0)
    batch = make_batch()
    out = lm(**batch)
    early_before = {n: None if p.grad is None else p.grad.clone() for n, p in lm.named_parameters()}
    causal_lm_loss(out.logits, batch["labels"]).backward()
    late = {id(p) for m in lm.late_modules() for p in m.parameters()}
    for name, param in lm.named_parameters():
        if id(param) in late:
            assert param.grad is not None and param.grad.any(), name
        elif early_before[name] is None:
            assert param.grad is None or not param.grad.any(), name
        else:
            torch.testing.assert_close(param.grad, early_before[name], rtol=0, atol=0)
    if mode == "local":  # the aux backward already ran during the forward
        assert lm.embedding.weight.grad is not None and lm.embedding.weight.grad.any()


def test_forward_without_labels_leaves_the_aux_loss_to_the_caller():
    """Trainers that compute the loss themselves: take_aux_loss() hands over lambda * mean(aux) once."""
    lm = _wrap(tiny_model("llama", num_layers=6), backward="joint", num_blocks=3, aux_weight=2.0)
    out = lm(input_ids=make_batch()["input_ids"])
    assert out.loss is None
    aux = lm.take_aux_loss()
    assert aux.requires_grad
    torch.testing.assert_close(aux.detach(), 2.0 * torch.stack(lm.last_aux_losses).mean())
    assert lm.take_aux_loss() is None
    aux.backward()
    assert lm.embedding.weight.grad.any() and lm.aux_heads[1].up.weight.grad.any()

    lm = _wrap(tiny_model("llama"), backward="local")
    lm(input_ids=make_batch()["input_ids"])
    assert not lm.take_aux_loss().requires_grad  # already backpropagated
    assert lm.embedding.weight.grad.any()


# --- gradient checkpointing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["local", "joint"])
def test_gradient_checkpointing_gives_the_same_gradients(model_type, mode):
    base = tiny_model(model_type, num_layers=6)
    batch = make_batch()
    plain = _wrap(clone(base), backward=mode, num_blocks=3)
    expected = _step(plain, batch)

    checkpointed = _wrap(clone(base), backward=mode, num_blocks=3)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parts = find_decoder_parts(checkpointed.model)
    assert all(layer.gradient_checkpointing for layer in parts.layers)
    calls = []  # a sub-module of each layer runs twice when its layer is recomputed in the backward
    for j, layer in enumerate(parts.layers):
        first_child = next(iter(layer.children()))
        first_child.register_forward_hook(lambda *_, j=j: calls.append(j))
    out = _step(checkpointed, batch)
    assert sorted(calls) == sorted(2 * list(range(6)))
    torch.testing.assert_close(out.loss, expected.loss)
    _assert_same_grads(_grads(checkpointed), _grads(plain))


def test_reentrant_checkpointing_is_refused(llama):
    lm = get_lopt_model(llama)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        lm(**make_batch())
    lm.eval()
    with torch.no_grad():
        lm(**make_batch())  # inference is unaffected


# --- gradient accumulation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["local", "joint"])
def test_gradient_accumulation_equals_full_batch(mode):
    base = tiny_model("llama", num_layers=6)
    full_batch = make_batch(batch_size=4, seq_len=8, seed=3)
    halves = [{k: v[i : i + 2] for k, v in full_batch.items()} for i in (0, 2)]

    full = _wrap(clone(base), backward=mode, num_blocks=3)
    _step(full, full_batch)

    accumulated = _wrap(clone(base), backward=mode, num_blocks=3)
    for half in halves:
        _step(accumulated, half, scale=0.5)
    _assert_same_grads(_grads(accumulated), _grads(full), atol=1e-6, rtol=1e-5)


def test_local_backward_honours_loss_scale():
    """Without loss_scale the early blocks would get 2x the gradient they should under accumulation."""
    base = tiny_model("llama")
    batch = make_batch()
    scaled, unscaled = _wrap(clone(base)), _wrap(clone(base))
    _step(scaled, batch, scale=0.5)
    out = unscaled(**batch)
    (0.5 * out.loss).backward()  # loss_scale left at 1.0
    emb_scaled, emb_unscaled = scaled.embedding.weight.grad, unscaled.embedding.weight.grad
    torch.testing.assert_close(emb_unscaled, 2 * emb_scaled)
    torch.testing.assert_close(scaled.model.lm_head.weight.grad, unscaled.model.lm_head.weight.grad)


# --- mixed precision -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["local", "joint"])
def test_bf16_autocast_training_step(mode):
    lm = _wrap(tiny_model("llama"), backward=mode)
    optimizer = torch.optim.AdamW(param_groups(lm, lr=1e-3))
    before = lm.embedding.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(**make_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.task_loss) and torch.isfinite(out.aux_loss)
    assert all(torch.isfinite(a) for a in lm.last_aux_losses)
    for name, param in lm.named_parameters():
        assert param.grad is not None, name
        assert param.grad.dtype == param.dtype and torch.isfinite(param.grad).all(), name
    optimizer.step()
    assert not torch.equal(lm.embedding.weight, before)


@pytest.mark.parametrize("mode", ["local", "joint"])
def test_bf16_weights_training_step(mode):
    lm = get_lopt_model(tiny_model("llama").to(torch.bfloat16), LoPTConfig(backward=mode))
    out = lm(**make_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(a) for a in lm.last_aux_losses)
    for name, param in lm.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert lm.embedding.weight.grad.dtype == torch.bfloat16 and lm.embedding.weight.grad.any()


# --- saving --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "tie", "untie"),
    [
        ("llama", False, False),
        ("llama", True, False),
        ("gpt2", True, False),
        ("llama", True, True),
        ("gpt2", True, True),
    ],
)
def test_save_and_reload_as_plain_model(tmp_path, model_type, tie, untie):
    """A tied model saves in its base's shape (same keys and shapes, tie_word_embeddings true); with
    untie_embeddings=True (the authors' setting) the head is saved as its own matrix."""
    base = tiny_model(model_type, tie=tie)
    base.save_pretrained(tmp_path / "base")
    lm = _wrap(clone(base), untie_embeddings=untie)
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.5)
    _step(lm, make_batch())
    optimizer.step()  # after a step an untied head differs from the embedding: a re-tie on load would show
    tied = tie and not untie
    head, embedding = lm.get_output_embeddings().weight, lm.get_input_embeddings().weight
    assert (head is embedding) == tied
    assert tied or not torch.equal(head, embedding)

    lm.save_pretrained(tmp_path / "ckpt")
    files = os.listdir(tmp_path / "ckpt")
    assert "model.safetensors" in files and "config.json" in files
    assert not any("aux" in f or "lopt" in f for f in files)
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    base_state = load_file(tmp_path / "base" / "model.safetensors")
    assert state and not any("aux" in key for key in state)
    extra = {"lm_head.weight"} if tie and untie else set()
    assert set(state) == set(base_state) | extra
    assert all(state[key].shape == base_state[key].shape for key in base_state)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tie_word_embeddings"] is tied

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    lm.eval()
    batch = make_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, lm(**batch).logits, rtol=0, atol=0)


def test_save_into_existing_directory_keeps_other_files(tmp_path, llama):
    lm = get_lopt_model(llama)
    (tmp_path / "trainer_log.txt").write_text("keep me")
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "trainer_log.txt").read_text() == "keep me"
    assert (tmp_path / "model.safetensors").is_file()
    assert not [f for f in os.listdir(tmp_path.parent) if f.startswith(".tmp-")]


def test_aux_heads_round_trip(tmp_path):
    base = tiny_model("llama", num_layers=6)
    lm = _wrap(clone(base), num_blocks=3, aux_weight=2.5, seed=1)
    path = lm.save_aux_heads(tmp_path)
    assert os.path.isfile(path) and (tmp_path / "lopt_config.json").is_file()
    restored_config = LoPTConfig.from_pretrained(tmp_path)
    assert restored_config == lm.lopt_config

    fresh = get_lopt_model(clone(base), restored_config)
    assert not torch.equal(fresh.aux_heads[0].up.weight, lm.aux_heads[0].up.weight)
    fresh.load_aux_heads(tmp_path)
    for (name, a), b in zip(lm.aux_heads.state_dict().items(), fresh.aux_heads.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    wrong = get_lopt_model(clone(base), LoPTConfig(num_blocks=2))
    with pytest.raises(ValueError, match="1 heads"):
        wrong.load_aux_heads(tmp_path)
    with pytest.raises(FileNotFoundError):
        fresh.load_aux_heads(tmp_path / "missing")


# --- PEFT ----------------------------------------------------------------------------------------------------
def _lora(model):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    return peft.get_peft_model(model, config)


def test_lora_then_lopt():
    base = tiny_model("llama", num_layers=6)
    batch = make_batch()
    results = {}
    for mode in ("local", "joint"):
        torch.manual_seed(7)
        lm = _wrap(_lora(clone(base)), backward=mode, num_blocks=3)
        trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n or n.startswith("aux_heads.") for n in trainable)
        assert any(n.startswith("aux_heads.") for n in trainable)
        _step(lm, batch)
        for name, param in lm.named_parameters():
            assert (param.grad is not None) == param.requires_grad, name
        results[mode] = (_grads(lm), lm)
    _assert_same_grads(results["local"][0], results["joint"][0])

    lm = results["local"][1]
    torch.manual_seed(7)
    ref_model = _lora(clone(base))
    ref_model.load_state_dict(lm.model.state_dict())
    ref_grads, ref_head_grads, _, _ = _reference(ref_model, "llama", lm, batch)
    _assert_same_grads(results["local"][0], (ref_grads, ref_head_grads))

    groups = param_groups(lm, lr=1e-3, early_lr=1e-4)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in lm.parameters() if p.requires_grad}
    late_group = next(g for g in groups if g["name"] == "late")
    late = {n for n, p in lm.named_parameters() if any(p is q for q in late_group["params"])}
    assert late and all(".layers.4." in n or ".layers.5." in n for n in late)


@pytest.mark.parametrize("mode", ["local", "joint"])
def test_lora_boundary_holds(mode):
    lm = get_lopt_model(_lora(tiny_model("llama")), LoPTConfig(aux_weight=0.0, backward=mode))
    lm(**make_batch()).loss.backward()
    lora = [(n, p) for n, p in lm.named_parameters() if "lora_" in n]
    early = [(n, p) for n, p in lora if ".layers.0." in n or ".layers.1." in n]
    late = [(n, p) for n, p in lora if ".layers.2." in n or ".layers.3." in n]
    assert early and late
    assert all(p.grad is None or not p.grad.any() for _, p in early)
    assert all(p.grad is not None and p.grad.any() for _, p in late)


# --- optimizer groups ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_param_groups(model_type):
    lm = get_lopt_model(tiny_model(model_type, num_layers=6), LoPTConfig(num_blocks=3))
    groups = param_groups(lm, lr=1e-3, early_lr=1e-4, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert len(groups) == 2 and by_name.keys() == {"early", "late"}
    assert by_name["early"]["lr"] == 1e-4 and by_name["late"]["lr"] == 1e-3
    assert all(g["weight_decay"] == 0.01 for g in groups)
    early, late = ({id(p) for p in by_name[name]["params"]} for name in ("early", "late"))
    assert not early & late
    assert early | late == {id(p) for p in lm.parameters()}

    layers_path, norm_path, head_path = PARTS[model_type]
    late_prefixes = (f"{layers_path}.4.", f"{layers_path}.5.", f"{norm_path}.", f"{head_path}.")
    for name, param in lm.model.named_parameters():
        assert (id(param) in late) == name.startswith(late_prefixes), name
    assert id(lm.embedding.weight) in early
    assert {id(p) for p in lm.aux_heads.parameters()} <= early
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in lm.parameters())

    torch.optim.AdamW(groups)  # the groups are valid optimizer input
    assert all(g["lr"] == 2e-3 for g in param_groups(lm, lr=2e-3))  # early_lr defaults to lr


def test_param_groups_leave_out_frozen_parameters_and_refuse_plain_models(llama):
    lm = get_lopt_model(llama)
    lm.embedding.weight.requires_grad_(False)
    groups = param_groups(lm, lr=1e-3)
    assert all(p is not lm.embedding.weight for g in groups for p in g["params"])
    with pytest.raises(TypeError, match="LoPTModel"):
        param_groups(llama, lr=1e-3)


# --- generation and unloading ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_generate(model_type):
    base = tiny_model(model_type).eval()
    lm = _wrap(clone(base))
    prompt = make_batch(batch_size=2, seq_len=5)["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = base.generate(prompt, **kwargs)
    assert expected.shape == (2, 11)
    for training in (False, True):
        lm.train(training)
        torch.testing.assert_close(lm.generate(prompt, **kwargs), expected, rtol=0, atol=0)
        assert lm.last_aux_losses == []
    assert all(p.grad is None for p in lm.parameters())


def test_unload_removes_the_hooks(llama):
    lm = get_lopt_model(llama, LoPTConfig(aux_weight=0.0))
    lm(**make_batch()).loss.backward()
    assert llama.model.embed_tokens.weight.grad is None or not llama.model.embed_tokens.weight.grad.any()

    plain = lm.unload()
    assert plain is llama
    assert all(not layer._forward_pre_hooks for layer in plain.model.layers)
    plain.zero_grad(set_to_none=True)
    lm.last_aux_losses = []
    plain(**make_batch()).loss.backward()
    assert plain.model.embed_tokens.weight.grad.any() and plain.model.layers[0].mlp.up_proj.weight.grad.any()
    assert lm.last_aux_losses == []


# --- validation happens before the model is changed ----------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [dict(num_blocks=5), dict(boundaries=[4]), dict(boundaries=[2, 7])],
    ids=["too-many-blocks", "boundary-at-end", "boundary-past-end"],
)
def test_invalid_layout_for_the_model_leaves_it_untouched(config):
    model = tiny_model("llama", tie=True)
    with pytest.raises(ValueError, match="4 layers"):
        get_lopt_model(model, LoPTConfig(**config))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is True
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)


def test_repr_and_attribute_passthrough(llama):
    lm = get_lopt_model(llama, LoPTConfig(num_blocks=4, backward="joint", aux_weight=1.5))
    text = repr(lm)
    assert "block_ranges=[(0, 1), (1, 2), (2, 3), (3, 4)]" in text and "'joint'" in text
    assert lm.unwrap() is llama
    assert lm.get_input_embeddings() is llama.model.embed_tokens  # delegated to the wrapped model
    assert len(lm.aux_heads) == 3
    with pytest.raises(AttributeError):
        lm.no_such_attribute  # noqa: B018
