"""`--round_to_bfloat16` (lopt.integrations.RoundToBfloat16Callback): weights and AdamW states kept at bf16 values
while computing in fp32, so that small updates are lost as in pure-bf16 training; refused where it cannot hold."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model
from safetensors.torch import load_file
from test_cli_sft import FAST, lopt

from lopt.integrations import RoundToBfloat16Callback


def _is_bf16_valued(tensor: torch.Tensor) -> bool:
    return torch.equal(tensor, tensor.to(torch.bfloat16).to(tensor.dtype))


def _adamw_steps(lr: float, rounded: bool, steps: int = 3):
    """The weights before `steps` AdamW steps, the model and the optimizer after them, with the callback's rounding
    or without."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    callback = RoundToBfloat16Callback()
    if rounded:
        callback.on_train_begin(None, None, None, model=model, optimizer=optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(steps):
        model(**make_batch(seed=step)).loss.backward()
        optimizer.step()
        if rounded:
            callback.on_optimizer_step(None, None, None, model=model, optimizer=optimizer)
        optimizer.zero_grad(set_to_none=True)
    return before, model, optimizer


def test_weights_and_states_stay_bf16_valued_and_small_updates_are_lost():
    _, model, optimizer = _adamw_steps(lr=1e-3, rounded=True)
    assert all(_is_bf16_valued(p) for p in model.parameters())
    states = [optimizer.state[p] for p in model.parameters()]
    assert all(_is_bf16_valued(s["exp_avg"]) and _is_bf16_valued(s["exp_avg_sq"]) for s in states)
    assert not _is_bf16_valued(_adamw_steps(lr=1e-3, rounded=False)[1].model.embed_tokens.weight)
    # an update far below half a bf16 step (~0.4% of a weight) leaves a weight where it was, as in pure bf16;
    # in fp32 the same steps move nearly all of them
    before, rounded, _ = _adamw_steps(lr=1e-6, rounded=True)
    _, plain, _ = _adamw_steps(lr=1e-6, rounded=False)
    moved = lambda model: sum(  # noqa: E731
        int((p.detach() != before[n].to(torch.bfloat16).float()).sum()) for n, p in model.named_parameters()
    )
    total = sum(p.numel() for p in plain.parameters())
    assert moved(rounded) < 0.05 * total < 0.5 * total < moved(plain)  # (those that move are near 0)


def test_sft_saves_bf16_valued_weights(builtin_tiny, tmp_path):
    out = tmp_path / "run"
    lopt(["sft", "--round_to_bfloat16", "--output_dir", str(out), *FAST], builtin_tiny["env"])
    weights = load_file(out / "model.safetensors")
    assert weights and all(_is_bf16_valued(t) for t in weights.values() if t.is_floating_point())


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--optimizer_in_backward", "--max_grad_norm", "0"],
            "--round_to_bfloat16 rounds after the ordinary",
        ),
        (["--block_parallel"], "--round_to_bfloat16 and --block_parallel are exclusive"),
    ],
)
def test_refusals(builtin_tiny, tmp_path, extra, expected):
    proc = lopt(["sft", "--round_to_bfloat16", *extra, "--output_dir", str(tmp_path), *FAST], builtin_tiny["env"],
                check=False)  # fmt: skip
    assert proc.returncode == 2 and expected in proc.stderr
