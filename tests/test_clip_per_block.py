"""`--clip_per_block` (LoPT): each block's gradients clipped by their own norm, so an early block's large local
gradient cannot shrink the last block's task step, as one global norm does; refused where it does not apply."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model
from test_cli_sft import FAST, lopt

from lopt import LoPTConfig, get_lopt_model
from lopt.integrations.trainer import _clip_each_block


@pytest.mark.parametrize("k", [2, 4])
def test_each_block_is_clipped_by_its_own_norm(k):
    net = get_lopt_model(tiny_model("llama", num_layers=4), LoPTConfig(num_blocks=k))
    net(**make_batch()).loss.backward()
    blocks = net.block_parameters()
    assert len(blocks) == k
    late = blocks[-1]
    for p in (p for params in blocks[:-1] for p in params):  # the early blocks' local gradients, made huge
        p.grad.mul_(1e4)
    late_before = [p.grad.clone() for p in late]
    late_norm = torch.nn.utils.get_total_norm(late_before)
    max_norm = float(late_norm) / 2  # the late block is above the limit, by 2x
    norms = [torch.nn.utils.get_total_norm([p.grad for p in params]) for params in blocks]
    assert all(norm > max_norm for norm in norms)
    total = _clip_each_block(blocks, max_norm)
    assert total == pytest.approx(
        float(torch.stack(norms).norm()), rel=1e-5
    )  # the log's: all, before clipping
    for params in blocks:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        assert norm == pytest.approx(max_norm, rel=1e-4)
    # the late block's step is halved by its own norm, not shrunk 10^4-fold by the early blocks'
    for p, before in zip(late, late_before):
        torch.testing.assert_close(p.grad, before * (max_norm / late_norm), rtol=1e-4, atol=0)


def test_sft_trains_with_it(builtin_tiny, tmp_path):
    proc = lopt(
        ["sft", "--clip_per_block", "--output_dir", str(tmp_path / "run"), *FAST], builtin_tiny["env"]
    )
    assert "saved a Hugging Face checkpoint" in proc.stderr


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--method", "e2e"], "--clip_per_block only applies to LoPT methods"),
        (["--optimizer_in_backward", "--max_grad_norm", "0"], "--clip_per_block does not combine with"),
    ],
)
def test_refusals(builtin_tiny, tmp_path, extra, expected):
    proc = lopt(["sft", "--clip_per_block", *extra, "--output_dir", str(tmp_path), *FAST], builtin_tiny["env"],
                check=False)  # fmt: skip
    assert proc.returncode == 2 and expected in proc.stderr
