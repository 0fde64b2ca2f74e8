"""The "synth" local objective (predicted boundary gradients, lopt.engine.synthetic): with a perfect predictor every
gradient equals end-to-end's; the predictor's training signal is exactly the true boundary gradient; an untrained
predictor holds the early blocks; the stop-gradient holds; and on the built-in model the predictor learns (its
cosine with the true gradient, in the training log, rises)."""

from __future__ import annotations

import pytest
import torch
from conftest import clone, make_batch, tiny_model
from test_cli_sft import FAST, lopt, read_metrics
from test_model import _assert_same_grads, _grads, _step
from torch import nn

from lopt import LoPTConfig, get_lopt_model
from lopt.engine.architectures import find_decoder_parts, hidden_states_arg
from lopt.engine.synthetic import GradientPredictor, tap_boundary


def _e2e_grads_and_boundary_grads(model, block_ranges, batch):
    """End-to-end: every parameter's gradient and the task loss's gradient at each block boundary (the input of
    each later block's first layer)."""
    parts = find_decoder_parts(model)
    boundary_states = {}

    def capture(index):
        def hook(module, args, kwargs):
            hidden = hidden_states_arg(args, kwargs)
            hidden.retain_grad()
            boundary_states[index] = hidden

        return hook

    handles = [
        parts.layers[start].register_forward_pre_hook(capture(i), with_kwargs=True)
        for i, (start, _) in enumerate(block_ranges[1:])
    ]
    model.train()
    model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return grads, [boundary_states[i].grad.detach() for i in range(len(block_ranges) - 1)]


class _Oracle(nn.Module):
    """A 'predictor' that returns a given gradient (in the predictor's per-position units)."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction

    def forward(self, hidden, target_embedding=None):
        assert hidden.shape == self.prediction.shape
        return self.prediction


class _Free(nn.Module):
    """A 'predictor' whose output is one free parameter: its gradient is exactly the predictor's training signal."""

    def __init__(self, shape):
        super().__init__()
        self.output = nn.Parameter(torch.randn(shape))

    def forward(self, hidden, target_embedding=None):
        return self.output


@pytest.mark.parametrize("model_type, num_blocks", [("llama", 2), ("gpt2", 2), ("qwen2", 3)])
@pytest.mark.parametrize("backward", ["local", "joint"])
def test_a_perfect_predictor_gives_end_to_end_gradients(model_type, num_blocks, backward):
    base = tiny_model(model_type, num_layers=6)
    batch = make_batch(batch_size=2, seq_len=8)
    lm = get_lopt_model(
        clone(base), LoPTConfig(num_blocks=num_blocks, aux_objective="synth", backward=backward)
    )
    e2e_grads, boundary_grads = _e2e_grads_and_boundary_grads(clone(base), lm.block_ranges, batch)
    positions = batch["input_ids"].numel()
    for index, grad in enumerate(boundary_grads):
        lm.aux_heads[index] = _Oracle(grad * positions)  # per-position units: n g
    _step(lm, batch)
    _assert_same_grads(_grads(lm), (e2e_grads, [[] for _ in boundary_grads]))


def test_the_predictor_learns_from_the_true_boundary_gradient_at_any_loss_scale():
    base = tiny_model("llama", num_layers=4)
    batch = make_batch(batch_size=2, seq_len=8)
    lm = get_lopt_model(clone(base), LoPTConfig(aux_objective="synth"))
    _, (true_grad,) = _e2e_grads_and_boundary_grads(clone(base), lm.block_ranges, batch)
    free = _Free(true_grad.shape)
    lm.aux_heads[0] = free
    scale = 0.25  # e.g. 1/gradient accumulation: the target is the unscaled gradient, the update scales alike
    _step(lm, batch, scale=scale)
    n = batch["input_ids"].numel()
    expected = (free.output.detach() - n * true_grad) * (scale / n)
    torch.testing.assert_close(free.output.grad, expected, atol=1e-6, rtol=1e-5)
    stats = lm.synthetic_gradient_stats.take()
    cosine = torch.nn.functional.cosine_similarity(free.output.detach().flatten(), true_grad.flatten(), dim=0)
    assert stats["synth_cosine_0"] == pytest.approx(float(cosine), abs=1e-5)
    assert lm.synthetic_gradient_stats.take() == {}  # taken: cleared


def test_an_untrained_predictor_holds_the_early_blocks_and_starts_learning():
    lm = get_lopt_model(
        tiny_model("llama", num_layers=4), LoPTConfig(aux_objective="synth", untie_embeddings=True)
    )
    _step(lm, make_batch())
    early = [p for m in lm.early_block_modules(0) for p in m.parameters()] + [lm.embedding.weight]
    assert all(p.grad is None or not p.grad.any() for p in early), "a zero prediction must move nothing"
    predictor = lm.aux_heads[0]
    assert isinstance(predictor, GradientPredictor)
    assert predictor.up.weight.grad is not None and predictor.up.weight.grad.abs().sum() > 0
    late = [p for m in lm.late_modules() for p in m.parameters()]
    assert all(p.grad is not None for p in late)


def test_predictors_learn_at_their_own_rate_and_belong_to_the_block_after_their_boundary():
    from lopt.engine.optim import param_groups

    config = LoPTConfig(num_blocks=3, aux_objective="synth+anchor", synth_lr=3e-3)
    lm = get_lopt_model(tiny_model("llama", num_layers=6), config)
    late, early, predictors = param_groups(lm, lr=1e-4, early_lr=1e-5)
    assert (late["name"], early["name"], predictors["name"]) == ("late", "early", "predictor")
    assert {id(p) for p in predictors["params"]} == {id(p) for p in lm.aux_heads.parameters()}
    assert predictors["lr"] == 3e-3 and predictors["weight_decay"] == 0.0
    config.synth_lr = None
    assert param_groups(lm, lr=1e-4, early_lr=1e-5)[2]["lr"] == 1e-4  # None: the main rate
    blocks = lm.block_parameters()
    for index, head in enumerate(lm.aux_heads):
        owner = [i for i, params in enumerate(blocks) if any(p is next(head.parameters()) for p in params)]
        assert owner == [index + 1]


def test_the_boundary_stays_detached():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="detached"):
        tap_boundary(hidden, torch.zeros(2, 3, 4, requires_grad=True), 1.0)
    boundary = tap_boundary(hidden.detach(), torch.zeros(2, 3, 4, requires_grad=True), 1.0)
    boundary.sum().backward()
    assert hidden.grad is None


def test_synth_weight_is_checked():
    with pytest.raises(ValueError, match="synth_weight"):
        LoPTConfig(aux_objective="synth", synth_weight=-1.0)


def test_sft_logs_a_predictor_that_learns_the_boundary_gradient(builtin_tiny, tmp_path):
    """On the built-in model and task, the predicted gradient's cosine with the true one rises as it trains."""
    out = tmp_path / "synth"
    args = ["sft", *FAST, "--aux_objective", "synth", "--output_dir", str(out)]
    steps = ["--max_steps", "40", "--logging_steps", "10", "--eval_samples", "0"]
    lopt([*args, *steps], builtin_tiny["env"])
    cosines = [m["synth_cosine_0"] for m in read_metrics(out)]
    assert len(cosines) == 4
    assert cosines[-1] > cosines[0] and cosines[-1] > 0.3, cosines
