"""`lopt plan` and the shipped shapes: the plan equals the meter on real tensors (3 shapes, every method), the
state arithmetic, the step's peak (its moments by hand, a tied model, the optimizer step in the backward, LoPT
against e2e on every preset), the micro-batch search, the CLI, and every preset loads with its published
architecture."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lopt.cli.main import main
from lopt.experiments import plan
from lopt.experiments.bench import config_of, prepare_for_training, training_loss
from lopt.experiments.meter import SavedTensorMeter
from lopt.experiments.shapes import load_shape, shape_names


def _config(model_type: str, num_layers: int, tie: bool = False):
    return AutoConfig.for_model(
        model_type,
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        use_cache=False,
    )


def _measured(config, method: str, batch_size: int, seq_len: int) -> int:
    torch.manual_seed(0)
    model = prepare_for_training(AutoModelForCausalLM.from_config(config), config_of(method))
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    with SavedTensorMeter() as meter:
        training_loss(model, ids, config_of(method).head).backward()
    return meter.peak


# Three shapes; each runs two methods so that all six are covered. 13 layers: k=4 blocks of 4/3/3/3, deep enough
# that the plan takes its two-shallow-steps path (q = 3 > 2) instead of a full-depth fake step.
@pytest.mark.parametrize(
    "model_type, num_layers, tie, batch_size, seq_len, methods",
    [
        ("llama", 13, False, 2, 48, ["e2e", "lopt-k4+gc"]),
        ("qwen2", 7, True, 1, 80, ["e2e+gc", "lopt-k2"]),
        ("llama", 13, False, 3, 24, ["lopt-k4", "lopt-k2+gc"]),
    ],
)
def test_plan_equals_the_meter_on_real_tensors(model_type, num_layers, tie, batch_size, seq_len, methods):
    config = _config(model_type, num_layers, tie)
    for method in methods:
        measured = _measured(config, method, batch_size, seq_len)
        planned = plan.activation_bytes(config, method, batch_size, seq_len, "float32")
        assert abs(planned - measured) <= 0.01 * measured, (method, planned, measured)


def test_state_bytes_per_precision_and_parallelism():
    count = plan.StepCount(act_bytes=0, params=1000, trainable=800, layer_params=100, root_params=200)
    single = plan.state_bytes(count, "bfloat16")
    assert single == {"weights": 2000, "grads": 1600, "optimizer": 9600, "gathered": 0}
    assert plan.state_bytes(count, "float32", "ddp", 4) == {
        "weights": 4000,
        "grads": 3200,
        "optimizer": 6400,
        "gathered": 0,
    }
    fsdp = plan.state_bytes(count, "float32", "fsdp", 4)
    assert (fsdp["weights"], fsdp["grads"], fsdp["optimizer"]) == (1000, 800, 1600)
    assert fsdp["gathered"] == 200 * 4 + 2 * 100 * 4 + 100 * 4


def _aux_head_params(hidden: int) -> int:
    return (
        2 * hidden + (hidden * (hidden // 4) + hidden // 4) + (hidden // 4 * hidden + hidden)
    )  # LN, down, up


@pytest.mark.parametrize("tie", [True, False])
def test_lopt_counts_the_same_params_as_e2e_but_its_aux_heads(tie):
    """A tied embedding and LM head stay one matrix under LoPT: nothing but the aux heads is added."""
    config = _config("qwen2", 4, tie=tie)
    e2e = plan.count_step(config, "e2e", 1, 8)
    for method, heads in (("lopt-k2", 1), ("lopt-k4+oib", 3)):
        lopt = plan.count_step(config, method, 1, 8)
        assert lopt.params == e2e.params + heads * _aux_head_params(32)
        assert lopt.trainable == e2e.trainable + heads * _aux_head_params(32)
        assert lopt.tied == e2e.tied == tie
        # the phases' parameters cover every trainable one once: k blocks for LoPT, one for e2e
        assert len(lopt.phase_params) == len(lopt.phase_act) == heads + 1
        assert sum(lopt.phase_params) == lopt.trainable and e2e.phase_params == (e2e.trainable,)
    assert e2e.head == e2e.embedding == 256 * 32
    assert e2e.pre_layers == (0 if tie else 256 * 32)


def _count(phase_act, phase_params, tied, head=100, embedding=100, layer=10) -> plan.StepCount:
    """A step by hand: `phase_act` activation bytes and `phase_params` parameters per phase."""
    pre = 0 if tied else embedding
    return plan.StepCount(
        act_bytes=max(phase_act),
        params=sum(phase_params),
        trainable=sum(phase_params),
        layer_params=layer,
        root_params=0,
        phase_act=tuple(phase_act),
        phase_params=tuple(phase_params),
        head=head,
        embedding=embedding,
        pre_layers=pre,
        tied=tied,
    )


# (method, tied, gc) -> (worst moment, activation bytes, gradient elements alive) for the counts below (bf16
# gradients: 2 bytes each). e2e: 1000 bytes of activations, 500 parameters (LM head 100, embedding 100, one matrix
# when tied). LoPT k=2: blocks of 600 and 500 bytes; block 0 has 200 parameters (aux head included) and the
# embedding when untied, the late group 300 (LM head included). One layer: 10 parameters, 50 bytes of activations.
MOMENTS = {
    # e2e: the LM head's backward, with every activation alive and the head's gradient written
    ("e2e", False, False): ("backward start", 1000, 100),
    ("e2e+oib", False, False): ("backward start", 1000, 100),
    # under checkpointing the last layer's recompute comes on top, while the head's gradient is still alive...
    ("e2e", False, True): ("last layer's backward", 1050, 100),
    ("e2e", True, True): (
        "last layer's backward",
        1050,
        100,
    ),  # (tied: its head part waits for the embedding's)
    # ...unless it was stepped and freed at once
    ("e2e+oib", False, True): ("backward start", 1000, 100),
    # LoPT: the task backward's start, with block 0's gradients (200 + embedding 100) kept and the head's written
    ("lopt-k2", False, False): ("task backward start", 500, 400),
    ("lopt-k2", False, True): ("task last layer's backward", 550, 400),
    ("lopt-k2+oib", False, True): ("task backward start", 500, 100),  # only the head's, stepped at once
    # tied: block 0's 200, the matrix's embedding part (from block 0's local backward) and its head part, being added
    ("lopt-k2", True, True): ("task backward start", 500, 400),
    ("lopt-k2+oib", True, True): ("task backward start", 500, 200),  # the matrix's two parts only
}


@pytest.mark.parametrize("method, tied, gc", list(MOMENTS))
def test_step_peak_by_hand(method, tied, gc):
    moment, act, grads = MOMENTS[method, tied, gc]
    lopt = method.startswith("lopt")
    trainable = [200 + (0 if tied else 100), 300] if lopt else [500 - (100 if tied else 0)]
    count = _count([600, 500] if lopt else [1000], trainable, tied)
    step = plan.step_peak(count, method + ("+gc" if gc else ""), "bfloat16", layer_act=50)
    assert (step["moment"], step["act"], step["grads"]) == (moment, act, 2 * grads), step
    assert step["peak"] == step["weights"] + step["optimizer"] + act + 2 * grads


def test_tied_matrix_holds_its_gradient_through_the_lopt_step():
    """LoPT + oib on a tied model: block 0's local backward writes the matrix's embedding part, which must wait
    for the task backward: it is alive through every later block, whose own gradients go one layer at a time."""
    count = _count([10, 10, 10], [50, 50, 300], tied=True)
    moments = {m: grads for m, _, grads in plan.step_moments(count, oib=True, layer_act=0, gc=False)}
    assert moments["block 0 backward end"] == 100 and moments["block 1 backward end"] == 100 + 10
    assert moments["block 1 backward start"] == 100 and moments["task backward end"] == 100 + 10
    untied = _count([10, 10, 10], [150, 50, 300], tied=False)
    moments = {m: grads for m, _, grads in plan.step_moments(untied, oib=True, layer_act=0, gc=False)}
    assert moments["block 1 backward start"] == 0 and moments["task backward start"] == 100


def _measured_alive(config, method: str, batch_size: int, seq_len: int, return_model: bool = False):
    """A real step on CPU: the most bytes of saved activations + `.grad` tensors alive at once, sampled whenever a
    tensor is saved for backward and whenever a gradient is written (before a step in the backward frees it)."""
    from lopt.engine.in_backward import optimizer_in_backward

    parsed = plan.parse_method(method)
    torch.manual_seed(0)
    model = prepare_for_training(AutoModelForCausalLM.from_config(config), config_of(parsed.bench))
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    meter, peak = SavedTensorMeter(), [0]

    def sample(*_):
        alive = meter.live + sum(p.grad.nbytes for p in params if p.grad is not None)
        peak[0] = max(peak[0], alive)

    pack = meter._pack

    def pack_and_sample(tensor):
        box = pack(tensor)
        sample()
        return box

    meter._pack = pack_and_sample
    for param in params:
        param.register_post_accumulate_grad_hook(sample)
    if parsed.oib:
        optimizer_in_backward(model, torch.optim.SGD(params, lr=1e-3), track_grad_norm=False)
    with meter:
        training_loss(model, torch.randint(0, config.vocab_size, (batch_size, seq_len)), "fused").backward()
    if not return_model:
        return peak[0]
    return peak[0], model, params


@pytest.mark.parametrize("seq_len, batch_size", [(16, 1), (256, 4)])
def test_step_peak_equals_a_real_step(seq_len, batch_size):
    """The gradients and activations alive at the planned worst moment, against a real step (untied, no
    checkpointing: what the sampling sees; the planned start of a backward also counts the LM head's saved tensors,
    freed by the time its gradient is written, hence the small excess)."""
    config = AutoConfig.for_model(
        "llama",
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        use_cache=False,
    )
    layer_act = plan.layer_act_bytes(config, batch_size, seq_len)
    for method in ("e2e", "e2e+oib", "lopt-k2", "lopt-k2+oib", "lopt-k4+oib"):
        step = plan.step_peak(
            plan.count_step(config, method, batch_size, seq_len), method, "float32", layer_act
        )
        planned, measured = step["grads"] + step["act"], _measured_alive(config, method, batch_size, seq_len)
        assert 0.97 * planned <= measured <= 1.001 * planned, (method, step["moment"], planned, measured)


def _selective_config(num_layers: int = 8):
    return AutoConfig.for_model(
        "llama",
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        use_cache=False,
    )


@pytest.mark.parametrize("method", ["e2e+gc3", "freeze", "freeze+gc", "lora"])
def test_freeze_lora_and_selective_checkpointing_step_within_ten_percent_of_a_real_step(method):
    """The whole step (weights + AdamW states + gradients and activations alive at the worst moment) planned
    against a real CPU step of the same model: weights and AdamW's state after a real optimizer step, and the most
    bytes of saved activations + gradients alive at once, sampled; the alive part alone within 10% too. The sampler
    does not see a checkpointed layer's recomputed tensors, so the planned worst moment must not be a recompute
    (lora+gc's is: not checked here)."""
    config, batch_size, seq_len = _selective_config(), 2, 64
    step = plan.step_peak(
        plan.count_step(config, method, batch_size, seq_len),
        method,
        "float32",
        plan.layer_act_bytes(config, batch_size, seq_len, method=plan.layer_method(method)),
    )
    assert "last" not in step["moment"], step["moment"]  # a recompute: invisible to the sampler
    alive, model, params = _measured_alive(config, method, batch_size, seq_len, return_model=True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    optimizer.step()
    weights = sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())
    states = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert step["weights"] == weights and step["optimizer"] == states, (method, step, weights, states)
    planned_alive = step["grads"] + step["act"]
    assert 0.9 * planned_alive <= alive <= 1.1 * planned_alive, (method, step["moment"], planned_alive, alive)
    measured = weights + states + alive
    assert 0.9 * step["peak"] <= measured <= 1.1 * step["peak"], (method, step["peak"], measured)


def test_selective_checkpointing_activations_equal_the_meter():
    """+gcN's activations, planned from the steps with and without checkpointing, against the meter (13 layers:
    the shallow-steps path)."""
    config = _config("llama", 13)
    for method in ("e2e+gc5", "lora+gc12"):
        measured = _measured(config, method, 2, 24)
        planned = plan.activation_bytes(config, method, 2, 24, "float32")
        assert abs(planned - measured) <= 0.01 * measured, (method, planned, measured)
    with pytest.raises(ValueError, match="planned for e2e and lora only"):
        plan.parse_method("freeze+gc3")
    with pytest.raises(ValueError, match="checkpoint at most 13"):
        plan.activation_bytes(config, "e2e+gc14", 1, 8)


SHAPES = [(16, 1), (256, 4)]  # gradients dominate the step's worst moment, then activations


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("seq_len, batch_size", SHAPES)
def test_optimizer_in_backward_never_costs_more(tie, seq_len, batch_size):
    """On a small model (tied or not) at both shapes: each +oib step peak <= its ordinary step's, and LoPT with it
    <= e2e (same checkpointing): it keeps at most one block's gradients, e2e's ordinary step all of them."""
    result = plan.make_plan(_config("llama", 9, tie), seq_len, batch_size, dtype="float32")
    total = {row["method"]: row["total"]["single"] for row in result["rows"]}
    assert set(total) == set(plan.PLAN_METHODS)
    for method in total:
        if "+oib" in method:
            assert total[method] <= total[method.replace("+oib", "")], method
    for gc in ("", "+gc"):
        for k in ("k2", "k4"):
            assert total[f"lopt-{k}+oib{gc}"] <= total[f"e2e{gc}"], (k, gc)


@functools.cache
def _preset_plan(name: str) -> dict:
    """The issue's shape: micro-batch 8 x seq 2048, bf16, at full depth."""
    methods = ["e2e", "e2e+oib", "lopt-k2", "lopt-k2+oib", "lopt-k4", "lopt-k4+oib"]
    result = plan.make_plan(load_shape(name), seq_len=2048, batch_size=8, methods=methods)
    return {row["method"]: row for row in result["rows"]}


@pytest.mark.parametrize("name", shape_names())
def test_lopt_step_never_above_e2e_on_every_preset(name):
    """Every preset, tied or not (micro-batch 8 x seq 2048): LoPT's step peak <= e2e's, with and without the
    optimizer step in the backward, and `params` equal but for the aux heads."""
    rows = _preset_plan(name)
    e2e = rows["e2e"]["total"]["single"]
    for method in ("lopt-k2", "lopt-k4", "lopt-k2+oib", "lopt-k4+oib"):
        assert rows[method]["total"]["single"] <= e2e, method
    hidden = load_shape(name).hidden_size
    assert rows["lopt-k4"]["params"] == rows["e2e"]["params"] + 3 * _aux_head_params(hidden)


def test_memory_goals_at_qwen_half_b():
    """Qwen2.5-0.5B (tied), micro-batch 8 x seq 2048, bf16: LoPT k=2 with the optimizer step in the backward <= 0.65x
    e2e's step peak and <= 0.80x e2e+oib's; k=4 lower still."""
    rows = _preset_plan("qwen2.5-0.5b")
    assert rows["lopt-k2"]["tied"] and rows["lopt-k2"]["params"] - rows["e2e"]["params"] == _aux_head_params(
        896
    )
    k2, k4 = rows["lopt-k2+oib"]["total"]["single"], rows["lopt-k4+oib"]["total"]["single"]
    assert k2 <= 0.65 * rows["e2e"]["total"]["single"]
    assert k2 <= 0.80 * rows["e2e+oib"]["total"]["single"]
    assert k4 < k2


def test_largest_micro_batch_fits_and_one_more_does_not():
    config = _config("llama", 4)
    act = lambda b: plan.activation_bytes(config, "e2e", b, 16)  # noqa: E731
    budget = act(5) + 1
    best = plan._largest_micro_batch(act, budget)
    assert best == 5 and act(best) <= budget < act(best + 1)
    assert plan._largest_micro_batch(act, act(1) - 1) == 0


@pytest.mark.parametrize(
    "text, expected", [("80GB", 80 * 2**30), ("24000MB", 24000 * 2**20), ("1.5GiB", 3 * 2**29)]
)
def test_parse_memory(text, expected):
    assert plan.parse_memory(text) == expected


def test_plan_cli(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", "--model", "llama-3.2-1b", "--seq_len", "16", "--methods", "e2e,lopt-k2"]
                + ["--num_gpus", "2", "--gpu_memory", "24GB", "--json", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "DDP x2" in text and "FSDP x2" in text and "max micro-batch" in text
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["lopt-k2"]["act_bytes"] < rows["e2e"]["act_bytes"]
    # Llama-3.2-1B ties its embeddings, and LoPT keeps them so: one aux head more, nothing else
    assert rows["lopt-k2"]["params"] - rows["e2e"]["params"] == _aux_head_params(2048)
    assert rows["e2e"]["max_micro_batch"]["fsdp"] >= rows["e2e"]["max_micro_batch"]["ddp"] >= 1


def test_plan_cli_errors(capsys):
    assert main(["plan", "--model", "nope"]) == 2
    assert "qwen2.5-7b" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen2.5-0.5b", "--gpu_memory", "lots"]) == 2
    assert "--gpu_memory 'lots'" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen2.5-0.5b", "--methods", "e2e,magic"]) == 2
    assert "magic" in capsys.readouterr().err


# published architecture numbers: layers, hidden, intermediate, heads, kv heads, vocab, tied
PUBLISHED = {
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936, True),
    "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 151936, True),
    "qwen2.5-7b": (28, 3584, 18944, 28, 4, 152064, False),
    "qwen2.5-32b": (64, 5120, 27648, 40, 8, 152064, False),
    "qwen2.5-72b": (80, 8192, 29568, 64, 8, 152064, False),
    "llama-3.2-1b": (16, 2048, 8192, 32, 8, 128256, True),
    "llama-3.2-3b": (28, 3072, 8192, 24, 8, 128256, True),
    "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128256, False),
    "llama-3.1-70b": (80, 8192, 28672, 64, 8, 128256, False),
}


def test_every_shipped_shape_loads_with_its_published_numbers():
    assert shape_names() == sorted(PUBLISHED)
    for name, expected in PUBLISHED.items():
        c = load_shape(name)
        got = (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads)
        got += (c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings)
        assert got == expected, name
    assert load_shape("qwen2.5-7b", num_layers=3).num_hidden_layers == 3


def test_a_config_json_path_loads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3}))
    assert load_shape(str(path)).hidden_size == 64
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_shape(str(path))
