"""`lopt plan` and the shipped shapes: the plan equals the meter on real tensors (3 shapes, every method), the
state arithmetic, the micro-batch search, the CLI, and every preset loads with its published architecture."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lopt.cli.main import main
from lopt.experiments import plan
from lopt.experiments.bench import CONFIGS, prepare_for_training, training_loss
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
    model = prepare_for_training(AutoModelForCausalLM.from_config(config), CONFIGS[method])
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    with SavedTensorMeter() as meter:
        training_loss(model, ids, CONFIGS[method].head).backward()
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


def test_lopt_counts_its_untied_head_and_aux_heads():
    config = _config("qwen2", 4, tie=True)
    e2e = plan.count_step(config, "e2e", 1, 8)
    lopt = plan.count_step(config, "lopt-k2", 1, 8)
    aux_head = 32 * 2 + (32 * 8 + 8) + (8 * 32 + 32)  # LayerNorm, Linear(d, d/4), Linear(d/4, d)
    assert lopt.params == e2e.params + 256 * 32 + aux_head


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
    # Llama-3.2-1B ties its embeddings; LoPT unties them: one more 128256 x 2048 matrix
    assert rows["lopt-k2"]["params"] - rows["e2e"]["params"] > 128256 * 2048
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
