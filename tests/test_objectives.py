"""The local "task" objective (logit-lens cross-entropy, lopt.engine.lens) and the aux-head warm-up: gradients against the
independent reference (with mutants the check must catch), chunking, label handling, refusals, and the warm-up
through the trainer mixin."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, clone, make_batch, tiny_model
from reference import pretrained_block_outputs
from test_anchor import _perturb
from test_model import ATOL, RTOL, _assert_same_grads, _grads, _reference, _step, _wrap

import lopt.engine.lens
import lopt.engine.model
from lopt import LoPTConfig, get_lopt_model


def _labelled_batch(seed: int = 0) -> dict:
    """Prompt tokens masked (-100) as in SFT, so the lens must skip them and shift like the task loss."""
    batch = make_batch(batch_size=2, seq_len=8, seed=seed)
    batch["labels"][0, :3] = -100
    batch["labels"][1, :5] = -100
    return batch


def _check_against_reference(model_type: str, num_layers: int, **config) -> None:
    base = tiny_model(model_type, num_layers=num_layers)
    batch = _labelled_batch()
    results = {}
    for mode in ("local", "joint"):
        lm = _wrap(clone(base), backward=mode, **config)
        _perturb(lm.model)  # for "anchor" terms: away from the snapshot just taken (harmless otherwise)
        out = _step(lm, batch)
        results[mode] = (_grads(lm), out, lm)
    lm = results["local"][2]
    moved = clone(base)
    _perturb(moved)
    anchor_states = (
        pretrained_block_outputs(clone(base), model_type, lm.block_ranges, batch["input_ids"])
        if lm.lopt_config.uses_anchor
        else None
    )
    ref_grads, ref_head_grads, ref_task, ref_auxes = _reference(moved, model_type, lm, batch, anchor_states)
    for grads, out, lm in results.values():
        torch.testing.assert_close(out.task_loss, ref_task, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            torch.stack(lm.last_aux_losses), torch.stack(ref_auxes), atol=ATOL, rtol=RTOL
        )
        objective = ref_task + lm.lopt_config.aux_weight * torch.stack(ref_auxes).mean()
        torch.testing.assert_close(out.loss.detach(), objective, atol=ATOL, rtol=RTOL)
        _assert_same_grads(grads, (ref_grads, ref_head_grads))
    _assert_same_grads(results["local"][0], results["joint"][0])  # and, directly, local == joint


# --- the task objective against the reference ----------------------------------------------------------------
@pytest.mark.parametrize("model_type", ARCHS)
def test_recon_plus_task_matches_reference_k2(model_type):
    _check_against_reference(model_type, 4, aux_objective="recon+task", task_weight=0.7)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("objective", ["task", "recon+task", "task+anchor"])
def test_task_objectives_match_reference_k3(model_type, objective):
    _check_against_reference(
        model_type, 6, num_blocks=3, aux_objective=objective, task_weight=2.0, aux_weight=3.0
    )


def test_task_alone_matches_reference_with_explicit_boundaries():
    _check_against_reference("qwen2", 6, boundaries=[1, 4], aux_objective="task")


def _lens_weights_trained(hidden, labels, final_norm, lm_head):
    """Mutant: the lens's CE backpropagates into the final norm and LM head too."""
    logits = lm_head(final_norm(hidden)).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _lens_unshifted(hidden, labels, final_norm, lm_head):
    """Mutant: position t scored against token t instead of t+1."""
    as_if_next = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
    return lopt.engine.lens.lens_cross_entropy(hidden, as_if_next, final_norm, lm_head)


@pytest.mark.parametrize(
    "mutant", [_lens_weights_trained, _lens_unshifted], ids=["weights-trained", "unshifted"]
)
def test_the_reference_check_catches_a_wrong_lens(monkeypatch, mutant):
    monkeypatch.setattr(lopt.engine.model, "lens_cross_entropy", mutant)
    with pytest.raises(AssertionError):
        _check_against_reference("llama", 4, aux_objective="task")


def test_chunked_lens_equals_one_chunk(monkeypatch):
    """Chunks of 3 labelled tokens (the tiny vocab would otherwise fit in one): the same loss and gradients."""
    base = tiny_model("llama", num_layers=4)
    batch = _labelled_batch()
    whole = _wrap(clone(base), aux_objective="task")
    out_whole = _step(whole, batch)
    monkeypatch.setattr(lopt.engine.lens, "CHUNK_LOGIT_ELEMENTS", 3 * base.config.vocab_size)
    chunked = _wrap(clone(base), aux_objective="task")
    out_chunked = _step(chunked, batch)
    torch.testing.assert_close(out_chunked.loss, out_whole.loss, atol=ATOL, rtol=RTOL)
    _assert_same_grads(_grads(chunked), _grads(whole))


# --- labels ------------------------------------------------------------------------------------------------------
def test_a_batch_without_labelled_tokens_gives_zero_and_no_early_gradient():
    lm = get_lopt_model(tiny_model("llama"), LoPTConfig(aux_objective="task"))
    batch = make_batch()
    batch["labels"][:, 1:] = -100  # the first label is never a target (nothing precedes it): no target at all
    lm(**batch)
    assert lm.last_aux_losses[0].item() == 0.0
    early = [p.grad for m in lm.early_block_modules(0) for p in m.parameters()]
    assert all(g is None or not g.any() for g in early)


@pytest.mark.parametrize("objective", ["task", "recon+task", "task+anchor"])
def test_a_training_forward_without_labels_is_refused(objective):
    lm = get_lopt_model(tiny_model("llama"), LoPTConfig(aux_objective=objective))
    with pytest.raises(ValueError, match=re.escape(f"aux_objective={objective!r} needs the batch's labels")):
        lm(input_ids=make_batch()["input_ids"])
    lm.eval()
    with torch.no_grad():
        lm(input_ids=make_batch()["input_ids"])  # inference needs no labels


@pytest.mark.parametrize("trainer", ["LoPTGRPOTrainer", "LoPTDPOTrainer"])
def test_trainers_without_labels_refuse_the_task_objective(trainer):
    import lopt.integrations

    cls = getattr(lopt.integrations, trainer)
    with pytest.raises(
        ValueError, match=f"--aux_objective recon\\+task needs labelled batches, which {trainer}"
    ):
        cls(model=None, lopt_config=LoPTConfig(aux_objective="recon+task"))


def test_bf16_autocast_step_with_the_task_objective():
    lm = get_lopt_model(tiny_model("llama"), LoPTConfig(aux_objective="recon+task"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(**_labelled_batch())
    out.loss.backward()
    assert torch.isfinite(lm.last_aux_losses[0])
    assert lm.embedding.weight.grad is not None and torch.isfinite(lm.embedding.weight.grad).all()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"task_weight": -1.0}, "task_weight=-1.0"),
        ({"aux_warmup_steps": -2}, "aux_warmup_steps=-2"),
        ({"aux_warmup_steps": 1.5}, "aux_warmup_steps=1.5"),
    ],
)
def test_invalid_task_and_warmup_config(bad, match):
    with pytest.raises(ValueError, match=match):
        LoPTConfig(**bad)


# --- aux-head warm-up ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["local", "joint"])
def test_aux_heads_only_trains_heads_and_the_last_block(mode):
    lm = _wrap(tiny_model("llama", num_layers=6), backward=mode, num_blocks=3)
    lm.aux_heads_only = True
    _step(lm, make_batch())
    late = {id(p) for m in lm.late_modules() for p in m.parameters()}
    for name, param in lm.model.named_parameters():
        if id(param) in late:
            assert param.grad is not None and param.grad.any(), name
        else:
            assert param.grad is None, name  # not even zeros: AdamW skips the parameter entirely
    for head in lm.aux_heads:
        assert all(p.grad is not None and p.grad.any() for p in head.parameters())


def test_aux_warmup_through_the_trainer(tmp_path):
    """Early weights stay put for aux_warmup_steps optimizer steps while the heads and the last block move; after
    that, everything trains."""
    from datasets import Dataset
    from transformers import TrainerCallback, TrainingArguments, default_data_collator

    from lopt.integrations import LoPTTrainer

    ids = torch.randint(3, 64, (8, 8), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{"input_ids": r, "attention_mask": [1] * 8, "labels": r} for r in ids]
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(_snapshot(trainer.lopt_model))

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = LoPTTrainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=default_data_collator,
        lopt_config=LoPTConfig(aux_warmup_steps=2),
        callbacks=[Snapshot()],
    )
    before = _snapshot(trainer.lopt_model)
    trainer.train()
    assert len(snapshots) == 4
    for step, snap in enumerate([before, *snapshots]):
        if step == 0:
            continue
        prev = [before, *snapshots][step - 1]
        early_moved = not torch.equal(snap["early"], prev["early"])
        assert early_moved == (step > 2), f"step {step}: early weights moved={early_moved}"
        assert not torch.equal(snap["heads"], prev["heads"]), f"step {step}: heads did not move"
        assert not torch.equal(snap["late"], prev["late"]), f"step {step}: last block did not move"


def _snapshot(lm) -> dict[str, torch.Tensor]:
    late = {id(p) for m in lm.late_modules() for p in m.parameters()}
    flat = lambda params: torch.cat([p.detach().flatten().clone() for p in params])  # noqa: E731
    return {
        "early": flat(p for p in lm.model.parameters() if id(p) not in late),
        "late": flat(p for p in lm.model.parameters() if id(p) in late),
        "heads": flat(lm.aux_heads.parameters()),
    }
