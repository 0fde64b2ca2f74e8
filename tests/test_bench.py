"""`lopt bench`: the saved-for-backward meter counts what autograd really keeps, and a tiny end-to-end run
prints every configuration with LoPT's activation peak below E2E's (a real property, not a timing)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lopt.cli.main import main
from lopt.experiments.bench import CONFIGS, DEFAULT_CONFIGS, BenchSpec, check_targets, run_benchmark
from lopt.experiments.bench_race import budget_race, format_race, race_targets
from lopt.experiments.bench_report import format_table, format_whole_step
from lopt.experiments.meter import SavedTensorMeter, measure_saved_tensor_peak

# one thread: tiny matmuls gain nothing from more, and on a busy machine spinning threads cost seconds
TINY = dict(
    num_layers=4,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    vocab_size=128,
    seq_len=32,
    batch_size=2,
    threads=1,
)
TINY_ARGS = [x for key, value in TINY.items() for x in (f"--{key}", str(value))]


def _leaf(n: int = 1000) -> torch.Tensor:
    return torch.randn(n, requires_grad=True)


def test_meter_counts_a_saved_output_and_subtracts_it_when_freed():
    x = _leaf()  # 1000 fp32 = 4000 bytes; a leaf requiring grad, so x itself is never counted
    with SavedTensorMeter() as meter:
        y = x.exp()  # exp saves its output for backward
        assert meter.live == 4000
        y.sum().backward()  # the backward frees the saved output
        assert meter.live == 0
        z = x.exp()  # a second graph after the first was freed: the peak does not add up
        del z  # dropping a graph without backward frees its saved tensors too
        assert meter.live == 0
    assert meter.peak == 4000
    assert measure_saved_tensor_peak(lambda: x.exp().sum().backward()) == 4000


def test_meter_counts_a_shared_storage_once_while_any_saver_lives():
    x = _leaf()
    with SavedTensorMeter() as meter:
        y = x.exp()  # saves y (its output)
        w = y.sin()  # saves y again (its input): same storage, counted once
        v = y[:10].cos()  # saves a view of y: still y's storage
        assert meter.live == 4000
        del w, v  # y is still saved by exp
        assert meter.live == 4000
        y.sum().backward()
    assert meter.peak == 4000
    assert meter.live == 0
    # without deduplication the same storage counts once per saver: exp, sin and cos each save y
    naive = measure_saved_tensor_peak(lambda: (x.exp().sin() + x.exp().cos()).sum().backward(), dedup=False)
    assert naive == 4 * 4000  # two exp outputs, each saved twice (by exp itself, then by sin or cos)


def test_meter_excludes_parameters_and_their_views():
    layer = nn.Linear(100, 50, bias=False)  # linear saves weight.t(), a view of the parameter
    # a non-leaf activation [8, 100] (view and *2 save nothing), so linear saves it and the weight
    fn = lambda: layer(_leaf(800).view(8, 100) * 2).sum().backward()  # noqa: E731
    assert measure_saved_tensor_peak(fn) == 3200
    assert measure_saved_tensor_peak(fn, include_parameters=True) == 3200 + layer.weight.nbytes


def test_run_benchmark_api_and_targets():
    spec = BenchSpec(**TINY, steps=1, warmup=0, peak_memory="off")
    rows = run_benchmark(spec, configs=["e2e", "lopt-k2"])
    by_name = {row["name"]: row for row in rows}
    assert by_name["e2e"]["act_ratio"] == 1.0
    assert 0 < by_name["lopt-k2"]["act_ratio"] < 1.0
    assert all(row["act_live_after"] == 0 for row in rows)  # nothing stays saved after the backward
    assert len(by_name["lopt-k2"]["step_times"]) == 1
    statuses = {t["config"]: t["status"] for t in check_targets(rows) if t["config"] in by_name}
    assert set(statuses.values()) <= {"PASS", "MISS"}
    assert "LoPT k=2" in format_table(rows, markdown=True)


def test_bench_cli_prints_every_config(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", *TINY_ARGS, "--steps", "1", "--warmup", "0", "--peak_memory", "off"]
                + ["--json", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    for name in DEFAULT_CONFIGS:
        assert CONFIGS[name].label in text
    assert "PASS" in text or "MISS" in text
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(DEFAULT_CONFIGS)
    assert {row["head"] for row in rows.values()} == {"fused"}  # the loss path lopt sft trains through
    # Local backward frees block 1's activations before block 2 runs; the joint backward keeps them.
    assert rows["lopt-k2"]["act_peak_bytes"] < rows["e2e"]["act_peak_bytes"]
    assert rows["lopt-k4"]["act_peak_bytes"] < rows["lopt-k2"]["act_peak_bytes"]
    assert rows["lopt-joint-k2"]["act_peak_bytes"] >= rows["e2e"]["act_peak_bytes"]
    # The anchor keeps a frozen copy of the early weights (half of it in bf16); its reference forward is no-grad.
    assert rows["lopt-k2-anchor"]["reference_bytes"] == 2 * rows["lopt-k2-anchor-bf16"]["reference_bytes"] > 0
    assert rows["lopt-k2"]["reference_bytes"] == 0
    # with the fused head the peak is at the boundary, where the anchor's MSE adds at most one [B, T, d] tensor
    extra = rows["lopt-k2-anchor"]["act_peak_bytes"] - rows["lopt-k2"]["act_peak_bytes"]
    assert 0 <= extra <= TINY["batch_size"] * TINY["seq_len"] * TINY["hidden_size"] * 4


def test_bench_rejects_unknown_config(capsys):
    assert main(["bench", *TINY_ARGS, "--configs", "e2e,nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--num_heads", "3"], ["--steps", "-1"]])
def test_bench_rejects_bad_shapes(bad, capsys):
    assert main(["bench", *TINY_ARGS, *bad]) == 2


def test_peak_process_memory_runs_in_a_fresh_process():
    spec = BenchSpec(**TINY, steps=1, warmup=0)  # peak_memory="auto": one `--one` process each
    (row,) = run_benchmark(spec, configs=["lopt-k2"])
    assert row["peak_mem_kind"] == "rss_fresh_process"
    assert row["peak_mem_bytes"] > 0 and row["rss_before"] > 0
    assert "peak RSS of a fresh process" in format_table([row])


def test_plain_hf_loss_configs_keep_their_own_e2e_reference():
    spec = BenchSpec(**TINY, steps=0)  # activations only, one config at a time
    rows = run_benchmark(spec, configs=["e2e", "lopt-k2", "e2e-hf", "lopt-k2-hf"])
    by_name = {row["name"]: row for row in rows}
    assert by_name["e2e-hf"]["head"] == "hf" and by_name["e2e-hf"]["act_ratio"] == 1.0
    # the plain loss keeps the [B, T, V] log-softmax; the fused head does not
    assert by_name["e2e-hf"]["act_peak_bytes"] > by_name["e2e"]["act_peak_bytes"]
    hf_ratio = by_name["lopt-k2-hf"]["act_peak_bytes"] / by_name["e2e-hf"]["act_peak_bytes"]
    assert by_name["lopt-k2-hf"]["act_ratio"] == pytest.approx(hf_ratio)
    assert "median_step_s" not in by_name["e2e"]  # steps=0 times nothing


def test_model_preset_with_cut_depth(capsys):
    code = main(["bench", "--model", "qwen2.5-0.5b", "--num_layers", "2", "--seq_len", "8", "--batch_size", "1"]
                + ["--steps", "0", "--configs", "e2e,lopt-k2", "--threads", "1", "--quiet"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "qwen2.5-0.5b shape (qwen2), 2 of 24 layers, hidden 896" in text
    assert "full depth" in text  # lopt plan's figure at the model's own 24 layers
    assert "[PASS] plan == measured at 2 layers within 1%" in text


def test_bench_rejects_unknown_model_and_bad_depth(capsys):
    assert main(["bench", "--model", "no-such-model", "--steps", "0"]) == 2
    assert "qwen2.5-0.5b" in capsys.readouterr().err  # the error lists the presets
    assert main(["bench", "--model", "llama-3.2-1b", "--num_layers", "17", "--steps", "0"]) == 2
    assert "between 1 and 16" in capsys.readouterr().err


def test_budget_race_picks_the_largest_fitting_micro_batch_per_setting():
    spec = BenchSpec(**{**TINY, "batch_size": 4}, steps=1, warmup=0, peak_memory="off")
    race = budget_race(spec)  # auto budget: E2E must checkpoint, LoPT k=2 need not
    peaks = {(p["method"], p["gc"], p["micro_batch"]): p["act_peak_bytes"] for p in race["peaks"]}
    budget = race["budget_bytes"]
    assert race["e2e_needs_gc"] and race["lopt_fits_without_gc"]["lopt-k2"]
    assert all(peaks[("e2e", False, m)] > budget for m in (1, 2, 4))
    for row in race["rows"]:
        assert row["act_peak_bytes"] <= budget
        assert row["micro_batch"] * row["accumulation"] == 4
        assert row["exact"] == (row["method"] == "e2e")
        if (
            row["gc_layers"] is not None
        ):  # E2E, the earliest N layers checkpointed: no GC does not fit, all does
            assert row["method"] == "e2e" and 1 <= row["gc_layers"] < TINY["num_layers"]
            assert peaks[("e2e", False, row["micro_batch"])] > budget
            continue
        larger = [m for m in (1, 2, 4) if m > row["micro_batch"]]
        assert all(peaks[(row["method"], row["gc"], m)] > budget for m in larger)
    assert any(
        row["gc_layers"] for row in race["rows"]
    )  # the auto budget leaves room for partial checkpointing
    best = [row for row in race["rows"] if row["best"]]
    assert {row["method"] for row in best} == {"e2e", "lopt-k2", "lopt-k4", "freeze", "lora"}
    assert next(row for row in best if row["method"] == "e2e")["speed_ratio"] == 1.0
    assert {t["status"] for t in race_targets(race)} <= {"PASS", "MISS"}
    assert "x E2E best" in format_race(race)


def test_budget_race_cli_rejects_a_bad_budget(capsys):
    assert main(["bench", *TINY_ARGS, "--activation_budget", "lots"]) == 2
    assert "--activation_budget 'lots'" in capsys.readouterr().err


def test_optimizer_in_backward_configs_measure_the_whole_step():
    """+oib changes no activation and no AdamW state, only how many gradients are alive at once: every one for the
    ordinary step, one parameter's at a time with it (LoPT and E2E alike: the tiny model is untied)."""
    from lopt.experiments.bench import canonical_config

    assert {"e2e+oib", "lopt-k2+oib", "lopt-k4+oib", "e2e+oib+gc", "lopt-k2+oib+gc"} <= set(DEFAULT_CONFIGS)
    assert canonical_config("lopt-k2+gc+oib") == "lopt-k2+oib+gc"
    spec = BenchSpec(**TINY, steps=1, warmup=0, peak_memory="off")
    names = ["e2e", "e2e+oib", "lopt-k2", "lopt-k2+oib", "lopt-k4+oib"]
    rows = {row["name"]: row for row in run_benchmark(spec, configs=names)}
    parts = {name: row["whole_step"] for name, row in rows.items()}
    assert rows["e2e+oib"]["loss"] == rows["e2e"]["loss"]  # (each LoPT runner draws its own aux heads)
    for name in ("e2e", "lopt-k2"):
        oib = f"{name}+oib"
        for key in ("weights", "optimizer", "activations"):
            assert parts[oib][key] == parts[name][key], (oib, key)
        assert parts[name]["gradients"] == parts[name]["weights"]  # the ordinary step holds every gradient
        assert parts[oib]["gradients"] < parts[name]["gradients"]
    # the largest single gradient (embedding or LM head, vocab x hidden fp32)
    for name in ("e2e+oib", "lopt-k2+oib", "lopt-k4+oib"):
        assert parts[name]["gradients"] == TINY["vocab_size"] * TINY["hidden_size"] * 4, name
    assert rows["e2e+oib"]["act_ratio"] == 1.0  # ratios are to the ordinary E2E
    table = format_whole_step(list(rows.values()), markdown=True)
    assert "LoPT k=2, opt. in bwd" in table and "grads MB" in table


def test_whole_step_peak_in_a_fresh_process():
    spec = BenchSpec(**TINY, steps=1, warmup=0)
    (row,) = run_benchmark(spec, configs=["lopt-k2+oib"])
    parts = row["whole_step"]
    assert parts["step_peak"] >= parts["weights"] + parts["optimizer"] > 0
    assert "step peak" in format_whole_step([row], {"lopt-k2+oib": None})
