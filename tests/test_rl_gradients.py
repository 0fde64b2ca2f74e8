"""LoPT under trainers that compute the loss themselves (GRPO, DPO): the model gets no labels.

1. Gradient check: with a GRPO-like and a DPO-like objective computed in the test from `model(input_ids).logits`,
   backward of `loss + take_aux_loss()` (joint) or of `loss` (local) gives, on the last block / final norm / LM head,
   the gradient of the trainer's objective alone, and on the embedding / early blocks / aux heads, the gradient of
   lambda * mean(aux) alone. Both references come from a plain copy of the model with the test's own detach hooks
   at the boundaries (no LoPT code) and one `torch.autograd.grad` per term.
2. No-grad forwards (old log-probs, reference log-probs, generation) do no aux work.
3. One real LoPTGRPOTrainer step and one LoPTDPOTrainer step: early and late parameters both change, the reference
   model carries no LoPT hooks, aux work happens once per training forward, and joint == local after a step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import clone, tiny_model

import lopt.engine.model
from lopt import LoPTConfig, get_lopt_model

torch.set_num_threads(1)
ATOL, RTOL = 1e-6, 1e-5
LAMBDA = 10.0
LATE_PREFIXES = ("model.norm.", "lm_head.")


# --- objectives computed by "the trainer" from logits ---------------------------------------------------------
def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1, in float32: (batch, seq - 1)."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def grpo_objective(logits, input_ids, mask, old_logps, ref_logps, advantages, beta=0.1, eps=0.2):
    """Clipped policy-gradient loss with a k3 KL penalty, averaged per sequence then over the batch."""
    logps = token_logps(logits, input_ids)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    per_token = per_token + beta * kl
    return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()


def dpo_objective(logits, input_ids, mask, ref_logps, beta=0.1):
    """Sigmoid DPO loss: the batch is [chosen; rejected]."""
    seq = (token_logps(logits, input_ids) * mask).sum(-1)
    ref = (ref_logps * mask).sum(-1)
    chosen, rejected = (seq - ref).chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def make_rl_batch(seed: int = 0, batch: int = 4, seq: int = 10, vocab: int = 96):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.zeros(batch, seq - 1)
    mask[:, seq // 2 :] = 1.0  # the "completion" half is scored
    advantages = torch.randn(batch, generator=gen)
    return input_ids, mask, advantages


def objective_fn(kind: str, base, input_ids, mask, advantages):
    """The trainer's loss as a function of the policy logits, with its no-grad inputs fixed (reference and old
    log-probs from a frozen copy of the initial model, perturbed so the ratio and KL terms are not trivial)."""
    with torch.no_grad():
        ref_logps = token_logps(base(input_ids=input_ids).logits, input_ids)
    gen = torch.Generator().manual_seed(7)
    old_logps = ref_logps + 0.05 * torch.randn(ref_logps.shape, generator=gen)
    if kind == "grpo":
        return lambda logits: grpo_objective(logits, input_ids, mask, old_logps, ref_logps, advantages)
    return lambda logits: dpo_objective(logits, input_ids, mask, ref_logps)


# --- the independent reference -----------------------------------------------------------------------------------
def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def reference_gradients(model, heads, block_ranges, objective, input_ids):
    """{param name: grad} and [head grads] of task + LAMBDA * mean(aux) for a plain HF llama, using the test's own
    stop-gradient hooks at the block boundaries. Each parameter is differentiated against the one term that reaches
    it; the other term is checked not to reach it at all."""
    layers = model.model.layers
    block_in, block_out = {}, {}

    def first(module, args, kwargs):
        block_in[0] = _hidden(args, kwargs)

    def boundary(index):
        def hook(module, args, kwargs):
            hidden = _hidden(args, kwargs)
            block_out[index - 1] = hidden
            block_in[index] = hidden.detach()
            return _with_hidden(args, kwargs, block_in[index])

        return hook

    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    for index, (start, _) in enumerate(block_ranges[1:], start=1):
        handles.append(layers[start].register_forward_pre_hook(boundary(index), with_kwargs=True))
    try:
        logits = model(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    task = objective(logits)
    auxes = [
        F.mse_loss(head(block_out[i]).float(), block_in[i].detach().float()) for i, head in enumerate(heads)
    ]
    aux_term = LAMBDA * torch.stack(auxes).mean()

    last_start = block_ranges[-1][0]
    late_prefixes = (*LATE_PREFIXES, *(f"model.layers.{j}." for j in range(last_start, len(layers))))
    named = dict(model.named_parameters())
    late = [n for n in named if n.startswith(late_prefixes)]
    early = [n for n in named if n not in late]
    head_params = [p for head in heads for p in head.parameters()]

    task_late = torch.autograd.grad(task, [named[n] for n in late], retain_graph=True)
    task_early = torch.autograd.grad(task, [named[n] for n in early], retain_graph=True, allow_unused=True)
    assert all(g is None for g in task_early), "the test's detach hooks leak the task loss into early blocks"
    aux_early = torch.autograd.grad(aux_term, [named[n] for n in early] + head_params, retain_graph=True)
    aux_late = torch.autograd.grad(aux_term, [named[n] for n in late], allow_unused=True)
    assert all(g is None for g in aux_late)
    grads = dict(zip(late, task_late)) | dict(zip(early, aux_early[: len(early)]))
    return grads, list(aux_early[len(early) :]), task.detach(), [a.detach() for a in auxes]


# --- 1. gradient check ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks, num_layers", [(2, 4), (3, 6)])
@pytest.mark.parametrize("kind", ["grpo", "dpo"])
@pytest.mark.parametrize("mode", ["local", "joint"])
def test_trainer_style_loss_gradients(mode, kind, num_blocks, num_layers, monkeypatch):
    base = tiny_model("llama", num_layers=num_layers)
    input_ids, mask, advantages = make_rl_batch()
    objective = objective_fn(kind, base, input_ids, mask, advantages)

    model = clone(base)
    torch.manual_seed(0)
    lm = get_lopt_model(model, LoPTConfig(num_blocks=num_blocks, backward=mode, aux_weight=LAMBDA))
    gen = torch.Generator().manual_seed(100)
    with torch.no_grad():  # move the heads off their near-zero init so every path carries gradient
        for param in lm.aux_heads.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    heads = copy.deepcopy(lm.aux_heads)

    aux_calls = []
    real = lopt.engine.model.reconstruction_loss
    monkeypatch.setattr(lopt.engine.model, "reconstruction_loss", lambda *a: aux_calls.append(1) or real(*a))

    # A no-grad forward of the policy in train mode (GRPO's old log-probs, generation): no aux work at all.
    with torch.no_grad():
        model(input_ids=input_ids)
    assert aux_calls == [] and lm.take_aux_loss() is None

    logits = model(input_ids=input_ids).logits  # as a trainer calls it: the HF model itself, no labels
    assert len(aux_calls) == num_blocks - 1
    loss = objective(logits)
    aux = lm.take_aux_loss()
    assert aux.requires_grad == (mode == "joint")
    (loss + aux if mode == "joint" else loss).backward()

    ref_grads, ref_head_grads, ref_task, ref_auxes = reference_gradients(
        clone(base), heads, lm.block_ranges, objective, input_ids
    )
    torch.testing.assert_close(loss.detach(), ref_task, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.stack(lm.last_aux_losses), torch.stack(ref_auxes), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(aux.detach(), LAMBDA * torch.stack(ref_auxes).mean(), atol=ATOL, rtol=RTOL)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(
            param.grad, ref_grads[name], atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}"
        )
    for param, expected in zip(lm.aux_heads.parameters(), ref_head_grads):
        torch.testing.assert_close(param.grad, expected, atol=ATOL, rtol=RTOL)
    # Both terms really contribute: late gradients are the task's, early ones the aux objective's.
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad.abs().sum() > 0


# --- 2/3. real TRL trainer steps ---------------------------------------------------------------------------------
def char_tokenizer():
    """A character-level tokenizer (no training, no download): ids 0..3 are <pad> <s> </s> <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789+-=?. abcdefghijklmnopqrstuvwxyz"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny llama + char tokenizer saved to disk, so TRL can load the reference model from its path."""
    tokenizer = char_tokenizer()
    model = tiny_model("llama", num_layers=4, vocab_size=len(tokenizer))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def char_sum_reward(completions, **kwargs):
    """Varies between completions of one prompt, so GRPO's advantages are not all zero."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path)


class ForwardSpy:
    """Counts forwards of a decoder layer with and without grad, and aux computations."""

    def __init__(self, layer, monkeypatch):
        self.grad, self.no_grad, self.aux = 0, 0, 0
        layer.register_forward_pre_hook(self._seen)
        real = lopt.engine.model.reconstruction_loss

        def counting(*args):
            self.aux += 1
            return real(*args)

        monkeypatch.setattr(lopt.engine.model, "reconstruction_loss", counting)

    def _seen(self, module, args):
        if torch.is_grad_enabled():
            self.grad += 1
        else:
            self.no_grad += 1


def _common_args(tmp_path, name):
    return dict(
        output_dir=str(tmp_path / name),
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )


def _assert_hookless(model):
    for layer in model.model.layers:
        assert not layer._forward_pre_hooks, "the reference model carries LoPT hooks"


def _assert_both_halves_changed(before: dict, after: dict):
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= changed, changed
    assert any(k.startswith("model.layers.0.") for k in changed) and any(
        k.startswith("model.layers.3.") for k in changed
    )


def run_grpo_step(
    path, tmp_path, mode, monkeypatch, name=None, dtype=torch.float32, resume=None, **overrides
):
    import datasets
    from transformers import set_seed
    from trl import GRPOConfig

    from lopt.integrations import LoPTGRPOTrainer

    set_seed(0)
    model, tokenizer = _load(path, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    config = dict(
        per_device_train_batch_size=4,
        num_generations=2,
        steps_per_generation=2,  # != gradient_accumulation_steps: TRL computes old log-probs (no grad)
        max_completion_length=4,
        beta=0.1,  # a reference model, forwarded without grad
        temperature=1.0,
        loss_type="grpo",
    )
    args = GRPOConfig(**{**_common_args(tmp_path, name or mode), **config, **overrides})
    trainer = LoPTGRPOTrainer(
        model=model,
        reward_funcs=char_sum_reward,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        lopt_config=LoPTConfig(num_blocks=2, backward=mode),
    )
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    _assert_hookless(trainer.ref_model)
    assert trainer.model.model.layers[2]._forward_pre_hooks  # the policy has them
    spy = ForwardSpy(trainer.model.model.layers[0], monkeypatch)
    trainer.train(resume_from_checkpoint=resume)
    after = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return before, after, spy, trainer


def run_dpo_step(path, tmp_path, mode, monkeypatch, name=None, dtype=torch.float32, **overrides):
    import datasets
    from transformers import set_seed
    from trl import DPOConfig

    from lopt.integrations import LoPTDPOTrainer

    set_seed(0)
    model, tokenizer = _load(path, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a, b in [(1, 2), (3, 4)]
    ]
    config = {"per_device_train_batch_size": 2, "beta": 0.1, "max_length": 32, **overrides}
    args = DPOConfig(**{**_common_args(tmp_path, name or mode), **config})
    trainer = LoPTDPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        lopt_config=LoPTConfig(num_blocks=2, backward=mode),
    )
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    _assert_hookless(trainer.ref_model)
    ref_spy = {"calls": 0}
    trainer.ref_model.model.layers[0].register_forward_pre_hook(
        lambda *a: ref_spy.__setitem__("calls", ref_spy["calls"] + 1)
    )
    spy = ForwardSpy(trainer.model.model.layers[0], monkeypatch)
    trainer.train()
    assert ref_spy["calls"] == args.gradient_accumulation_steps  # reference log-probs, by the hook-free copy
    after = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return before, after, spy, trainer


@pytest.mark.parametrize("runner", [run_grpo_step, run_dpo_step], ids=["grpo", "dpo"])
def test_trainer_step_local_equals_joint(runner, tiny_checkpoint, tmp_path, monkeypatch):
    results = {}
    for mode in ("local", "joint"):
        before, after, spy, trainer = runner(tiny_checkpoint, tmp_path, mode, monkeypatch)
        # One training forward with grad -> one aux computation (k=2); every other forward ran without grad.
        assert spy.grad == 1 and spy.aux == 1, (spy.grad, spy.aux)
        if runner is run_grpo_step:
            assert spy.no_grad >= 2  # generation + old log-probs
            buffered = trainer._buffered_inputs[0]
            assert buffered["old_per_token_logps"] is not None and buffered["ref_per_token_logps"] is not None
            assert buffered["advantages"].abs().sum() > 0  # the rewards varied: the task gradient is not zero
        log = next(h for h in trainer.state.log_history if "aux_loss_0" in h)
        assert log["aux_loss_0"] > 0 and "task_loss" in log
        _assert_both_halves_changed(before, after)
        results[mode] = after
    for key in results["local"]:
        torch.testing.assert_close(
            results["joint"][key], results["local"][key], atol=1e-6, rtol=1e-5, msg=key
        )


# TRL's GRPO loss is already divided by the accumulation steps (loss_is_scaled_for_ga=True), DPO's is not (the
# Trainer divides it): the mixin must scale the local backward and the joint aux term to match in both cases.
GA_CASES = {
    "grpo": (
        run_grpo_step,
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, steps_per_generation=2),
        dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, steps_per_generation=1),
    ),
    "dpo": (
        run_dpo_step,
        dict(per_device_train_batch_size=1, gradient_accumulation_steps=2),
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=1),
    ),
}


@pytest.mark.parametrize("mode", ["local", "joint"])
@pytest.mark.parametrize("kind", list(GA_CASES))
def test_gradient_accumulation_equals_the_full_batch(kind, mode, tiny_checkpoint, tmp_path, monkeypatch):
    """Same samples (equal-length rows, same generation batch), one optimizer step: 2 micro-batches of 2 (or 1)
    accumulated == one batch of 4 (or 2), for the task and the aux gradients alike."""
    runner, accumulated, full = GA_CASES[kind]
    # float64: in float32 the backward's rounding differs between a batch of 4 and 2 x 2 by up to ~1% of a gradient
    # entry on this tiny model (E2E too: it is not LoPT's), while in float64 the two agree to ~1e-16. SGD: the step is lr * gradient, so equal gradients give equal weights (Adam's
    # first step, ~lr * sign(g), would turn rounding noise on near-zero entries into full-size differences).
    exact = {"optim": "sgd", "dtype": torch.float64}
    accumulated, full = {**accumulated, **exact}, {**full, **exact}
    _, after_ga, spy, _ = runner(
        tiny_checkpoint, tmp_path, mode, monkeypatch, name=f"{mode}-ga", **accumulated
    )
    assert spy.grad == 2 and spy.aux == 2  # two micro-batches, each with its aux work
    _, after_full, _, _ = runner(tiny_checkpoint, tmp_path, mode, monkeypatch, name=f"{mode}-full", **full)
    for key in after_full:
        torch.testing.assert_close(after_ga[key], after_full[key], atol=1e-6, rtol=1e-5, msg=key)


def test_grpo_resume_from_a_checkpoint_is_exact(tiny_checkpoint, tmp_path, monkeypatch):
    """Run A: 2 steps, a checkpoint after each (aux heads inside). Run B resumes from A's checkpoint-1 (optimizer,
    scheduler, aux heads, RNG for sampling): both end with the same weights. (`lopt grpo --resume_from_checkpoint`
    hands the folder to this same `train()`.)"""
    # One generation per step: a checkpoint inside a generation cycle (steps_per_generation > 1) cannot be resumed
    # exactly, since TRL regenerates the rest of the cycle's completions with the resumed model.
    steps = dict(max_steps=2, save_strategy="steps", save_steps=1, steps_per_generation=1)
    _, after_a, _, trainer_a = run_grpo_step(
        tiny_checkpoint, tmp_path, "local", monkeypatch, name="a", **steps
    )
    checkpoint = tmp_path / "a" / "checkpoint-1"
    assert (checkpoint / "lopt_aux_heads.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert not (tmp_path / "a" / ".lopt-staging").exists()
    trainer_b = run_grpo_step(
        tiny_checkpoint, tmp_path, "local", monkeypatch, name="b", resume=str(checkpoint), **steps
    )[3]
    assert trainer_b.state.global_step == 2
    after_b = {k: v.detach() for k, v in trainer_b.model.state_dict().items()}
    for key in after_a:
        torch.testing.assert_close(after_b[key], after_a[key], atol=1e-6, rtol=1e-5, msg=key)
    for head_a, head_b in zip(
        trainer_a.lopt_model.aux_heads.parameters(), trainer_b.lopt_model.aux_heads.parameters()
    ):
        torch.testing.assert_close(head_b, head_a, atol=1e-6, rtol=1e-5)
