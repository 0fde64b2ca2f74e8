"""The optimizer step in the backward (lopt.engine.in_backward, `--optimizer_in_backward`): with clipping off the
parameters equal the ordinary step's exactly (library API and Trainer, e2e and LoPT k=2 / k=4, tied embedding as one
shared late parameter), early gradients are freed inside the forward, clipping is per parameter,
checkpoints resume exactly, the CLI trains and saves, and what cannot hold is refused in one line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_batch, tiny_model
from test_cli_sft import FAST, assert_hf_checkpoint, lopt, read_metrics

from lopt import LoPTConfig, get_lopt_model, optimizer_in_backward, param_groups

METHODS = {"e2e": None, "lopt-k2": 2, "lopt-k4": 4}


# --- the library API ----------------------------------------------------------------------------------------------
def _setup(k: int | None, shared_embedding: bool = False, optimizer=torch.optim.AdamW, **optimizer_kwargs):
    """A tiny model (untied, or with one embedding matrix shared by the input and the LM head), its optimizer (LoPT's
    two groups, the early one at 0.3x) and a schedule that moves both rates."""
    model = tiny_model("llama", num_layers=4, tie=shared_embedding)
    if k is None:
        net, groups = model, [{"params": list(model.parameters()), "lr": 1e-2}]
    else:
        net = get_lopt_model(model, LoPTConfig(num_blocks=k))
        parts = net._parts
        if shared_embedding and parts.lm_head.weight is not parts.embedding.weight:
            parts.lm_head.weight = parts.embedding.weight  # one shared parameter, trained in the late group
        groups = param_groups(net, lr=1e-2, early_lr=3e-3)
    kwargs = {"weight_decay": 0.1} if optimizer is torch.optim.AdamW else {}
    opt = optimizer(groups, **{**kwargs, **optimizer_kwargs})
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - 0.2 * step)
    return net, opt, schedule


def _train(k: int | None, in_backward: bool, steps: int, shared_embedding: bool = False) -> list[dict]:
    """Parameters after each of `steps` steps (ordinary step, or stepped inside the backward)."""
    net, opt, schedule = _setup(k, shared_embedding)
    stepper = optimizer_in_backward(net, opt) if in_backward else None
    snapshots = []
    for step in range(steps):
        net(**make_batch(seed=step)).loss.backward()
        if stepper is None:
            opt.step()
        else:
            stepper.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        snapshots.append({name: p.detach().clone() for name, p in net.named_parameters()})
    return snapshots


@pytest.mark.parametrize("shared_embedding", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_parameters_equal_the_ordinary_step(method, shared_embedding):
    """After 1 and after 3 steps, bit for bit: the same AdamW update per parameter, only earlier."""
    k = METHODS[method]
    ordinary = _train(k, in_backward=False, steps=3, shared_embedding=shared_embedding)
    in_backward = _train(k, in_backward=True, steps=3, shared_embedding=shared_embedding)
    for step in (0, 2):
        assert ordinary[step].keys() == in_backward[step].keys()
        for name, expected in ordinary[step].items():
            assert torch.equal(in_backward[step][name], expected), f"step {step + 1}: {name}"
    first, last = ordinary[0], ordinary[2]
    assert all(not torch.equal(first[n], last[n]) for n in first)  # every parameter trained


@pytest.mark.parametrize("shared_embedding", [False, True])
@pytest.mark.parametrize("k", [2, 4])
def test_early_blocks_are_stepped_and_freed_inside_the_forward(k, shared_embedding):
    net, opt, _ = _setup(k, shared_embedding)
    stepper = optimizer_in_backward(net, opt)
    late = {id(p) for m in net.late_modules() for p in m.parameters()}
    before = {id(p): p.detach().clone() for p in net.parameters()}
    seen = []

    def check(block):  # registered after the stepper's hook: runs right after the block's step
        for module in net.early_block_modules(block):
            for p in module.parameters():
                assert p.grad is None, "an early block's gradient outlived its step"
                assert not torch.equal(p, before[id(p)]), "the early block was not stepped"
        seen.append(block)

    net.register_local_backward_hook(check)
    out = net(**make_batch())
    assert seen == list(range(k - 1))
    # inside the forward, before any task backward: every early parameter stepped, gradient freed; the task
    # loss's parameters (a shared embedding included) untouched
    for p in net.parameters():
        if id(p) in late:
            assert torch.equal(p, before[id(p)])
        else:
            assert p.grad is None and not torch.equal(p, before[id(p)])
    out.loss.backward()
    # the task backward stepped and freed the late parameters too, all but a shared matrix (block 0 and the task
    # loss both write to it): step() does that one
    shared = net.embedding.weight
    for p in net.parameters():
        if id(p) in late:
            assert (p.grad is not None) == (shared_embedding and p is shared)
            assert torch.equal(p, before[id(p)]) == (shared_embedding and p is shared)
    assert stepper.step() > 0  # the step's gradient norm
    assert all(p.grad is None for p in net.parameters())
    assert all(not torch.equal(p, before[id(p)]) for p in net.parameters())


def test_e2e_gradients_are_freed_in_the_backward():
    net, opt, _ = _setup(None)
    stepper = optimizer_in_backward(net, opt)
    before = [p.detach().clone() for p in net.parameters()]
    net(**make_batch()).loss.backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert stepper.step() > 0
    stepper.remove()  # the ordinary step again
    net(**make_batch()).loss.backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_clipping_is_per_parameter(method):
    """SGD at lr 1: a parameter's update is its clipped gradient, so none moves further than max_grad_norm, and those
    whose gradient is above it move exactly that far. The global clip of the ordinary step would scale every
    parameter by one factor instead."""
    k, max_norm = METHODS[method], 1e-3
    net, opt, _ = _setup(k, optimizer=torch.optim.SGD, lr=1.0)
    for group in opt.param_groups:
        group["lr"] = 1.0
    before = {id(p): p.detach().clone() for p in net.parameters()}
    stepper = optimizer_in_backward(net, opt, max_grad_norm=max_norm)
    net(**make_batch()).loss.backward()
    norm = stepper.step()
    assert norm > 100 * max_norm  # the gradients were far above the limit
    moved = [(p.detach() - before[id(p)]).norm() for p in net.parameters()]
    assert all(0 < m <= max_norm * (1 + 1e-4) for m in moved)
    # several moved the whole limit: under one global factor, all of them together would move at most that far
    assert sum(m > max_norm * (1 - 1e-4) for m in moved) >= 2


def test_refusals():
    net = get_lopt_model(tiny_model("llama"), LoPTConfig(backward="joint"))
    opt = torch.optim.AdamW(param_groups(net, lr=1e-3))
    with pytest.raises(ValueError, match="local backward"):
        optimizer_in_backward(net, opt)
    with pytest.raises(ValueError, match="max_grad_norm"):
        optimizer_in_backward(tiny_model("llama"), opt, max_grad_norm=-1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        optimizer_in_backward(tiny_model("llama"), object())


# --- the Trainer ----------------------------------------------------------------------------------------------------
def _trainer(tmp_path, k: int | None, in_backward: bool, **args):
    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from lopt.integrations import LoPTTrainer

    ids = torch.randint(3, 64, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{"input_ids": r, "attention_mask": [1] * 8, "labels": r} for r in ids]
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.0,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return LoPTTrainer(
        model=tiny_model("llama"),
        args=TrainingArguments(**{**defaults, **args}),
        train_dataset=Dataset.from_list(rows),
        data_collator=default_data_collator,
        lopt_config=_lopt_config(k),
        early_learning_rate=None if k is None else 3e-3,
        optimizer_in_backward=in_backward,
    )


def _lopt_config(k: int | str | None) -> LoPTConfig | None:
    if k is None:
        return None
    return LoPTConfig(backward="joint") if k == "joint" else LoPTConfig(num_blocks=k)


def _train_with_trainer(tmp_path, k: int | None, in_backward: bool, **args):
    """Parameters (model and aux heads) after steps 1 and 3, and the logged rows."""
    from transformers import TrainerCallback

    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (1, 3):
                named = list(trainer.model.named_parameters())
                if trainer.lopt_model is not None:
                    named += [(f"aux.{n}", p) for n, p in trainer.lopt_model.aux_heads.named_parameters()]
                snapshots[state.global_step] = {n: p.detach().clone() for n, p in named}

    trainer = _trainer(tmp_path, k, in_backward, **args)
    trainer.add_callback(Snapshot())
    trainer.train()
    return snapshots, [row for row in trainer.state.log_history if "loss" in row]


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_parameters_equal_the_ordinary_step(tmp_path, method):
    """Through transformers' Trainer (linear schedule, weight decay, LoPT's early rate at 0.3x): the same parameters
    after 1 and 3 steps, the same rates logged, and a gradient norm that is the ordinary one."""
    k = METHODS[method]
    ordinary, ordinary_logs = _train_with_trainer(tmp_path / "a", k, in_backward=False)
    stepped, logs = _train_with_trainer(tmp_path / "b", k, in_backward=True)
    for step in (1, 3):
        for name, expected in ordinary[step].items():
            assert torch.equal(stepped[step][name], expected), f"step {step}: {name}"
    for row, expected in zip(logs, ordinary_logs, strict=True):
        assert row["learning_rate"] == expected["learning_rate"]
        assert row.get("lr_early") == expected.get("lr_early")
        assert row["loss"] == expected["loss"]
        # the ordinary trainer's norm leaves out the aux heads, which the step in the backward counts
        assert row["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-3)


def test_trainer_checkpoint_resumes_exactly(tmp_path):
    """The optimizer's state_dict is the ordinary one: a run resumed from checkpoint-2 ends where the whole run does."""
    whole = _trainer(tmp_path / "a", 2, True, max_steps=4, save_strategy="steps", save_steps=2)
    whole.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file()
    resumed = _trainer(tmp_path / "b", 2, True, max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(whole.lopt_model.aux_heads.parameters(), resumed.lopt_model.aux_heads.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "k, args, match",
    [
        (2, {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps must be 1"),
        ("joint", {}, "local backward"),
        (None, {"optim": "lomo"}, "lomo"),
    ],
)
def test_trainer_refusals(tmp_path, k, args, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, k, True, **args)


# --- the CLI --------------------------------------------------------------------------------------------------------
def test_cli_sft_trains_and_saves(builtin_tiny, tmp_path):
    out = tmp_path / "run"
    args = ["sft", *FAST, "--optimizer_in_backward", "--num_blocks", "4", "--max_grad_norm", "0"]
    lopt([*args, "--output_dir", str(out)], builtin_tiny["env"])
    assert_hf_checkpoint(out)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["grad_norm"] > 0
    assert metrics[0]["lr_early"] == pytest.approx(0.3 * metrics[0]["lr_late"])
    assert json.loads((out / "lopt_args.json").read_text())["optimizer_in_backward"] is True
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_cli_dpo_e2e_trains_and_saves(builtin_tiny, tmp_path):
    rows = [{"prompt": "What is 2 plus 3?", "chosen": "5", "rejected": "6"}] * 4
    data = tmp_path / "dpo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    args = ["dpo", "--model_name_or_path", builtin_tiny["path"], "--train_file", str(data), "--method", "e2e"]
    args += ["--max_steps", "2", "--per_device_train_batch_size", "2"]
    args += ["--logging_steps", "1", "--no_progress"]
    lopt([*args, "--optimizer_in_backward", "--output_dir", str(out)], builtin_tiny["env"])
    assert_hf_checkpoint(out)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


@pytest.mark.parametrize(
    "command, args, expected",
    [
        ("sft", ["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps must be 1"),
        ("sft", ["--method", "lopt_joint"], "not lopt_joint"),
        ("sft", ["--method", "lora"], "not lora"),
        ("sft", ["--block_parallel"], "--block_parallel are exclusive"),
        ("sft", ["--fp16"], "--fp16"),
        ("grpo", ["--gradient_accumulation_steps", "4"], "--gradient_accumulation_steps must be 1"),
        ("dpo", ["--method", "lopt_joint"], "not lopt_joint"),
    ],
)
def test_cli_refusals_are_one_line(builtin_tiny, tmp_path, capsys, monkeypatch, command, args, expected):
    from lopt.cli.main import main

    for key in ("LOPT_BUILTIN_PRESET", "LOPT_CACHE_DIR", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, builtin_tiny["env"][key])
    code = main([command, "--optimizer_in_backward", *args, "--output_dir", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith(f"lopt {command}: error:")]
    assert len(errors) == 1 and expected in errors[0], stderr[-3000:]
    assert not os.path.exists(tmp_path / "out")
