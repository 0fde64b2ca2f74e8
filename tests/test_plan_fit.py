"""`lopt plan --gpu_memory`'s listing (lopt.experiments.plan_fit): what fits, fastest first by planned FLOPs, the
fewest checkpointed layers that fit, the GPUs each method needs where nothing fits, and bad sizes."""

from __future__ import annotations

import pytest
from test_plan import _config as _plan_config

from lopt.cli.main import main
from lopt.experiments import plan, plan_fit

METHODS = [
    "e2e",
    "e2e+oib",
    "lopt-k2",
    "lopt-k4",
    "e2e+gc",
    "lopt-k2+gc",
    "freeze",
    "freeze+gc",
    "lora",
    "lora+gc",
]


def _config(num_layers: int = 9):
    return _plan_config("llama", num_layers)


SEQ, BATCH = 256, 4  # activations dominate: checkpointing decides what fits


def _plan(config, gpu_memory=None, num_gpus=1):
    return plan.make_plan(config, SEQ, BATCH, "float32", METHODS, num_gpus=num_gpus, gpu_memory=gpu_memory)


def test_listing_is_fastest_first_fits_the_budget_and_misses_nothing():
    config = _config()
    total = {row["method"]: row["total"]["single"] for row in _plan(config)["rows"]}
    budget = (total["e2e"] + total["e2e+gc"]) // 2  # e2e fits only with (some) checkpointing
    result = _plan(config, budget)
    fit = plan_fit.fit_listing(config, result)
    ratios = [row["time_ratio"] for row in fit["rows"]]
    assert ratios == sorted(ratios) and fit["rows"]
    assert all(row["peak"] <= budget for row in fit["rows"])
    fitting = {row["method"] for row in result["rows"] if row["total"]["single"] <= budget}
    listed = {row["method"] for row in fit["rows"]}
    assert fitting <= listed and "e2e" not in listed and "e2e+gc" in listed
    assert fit["gpus_needed"] == []
    # e2e: the fewest earliest layers checkpointed that fit, slower than no checkpointing, faster than all
    (selective,) = [m for m in listed if m.startswith("e2e+gc") and m != "e2e+gc"]
    n = int(selective.removeprefix("e2e+gc"))
    layer_act = next(r for r in result["rows"] if r["method"] == "e2e+gc")["layer_act_bytes"]
    if n > 1:
        fewer = plan.count_step(config, f"e2e+gc{n - 1}", BATCH, SEQ, "float32")
        assert plan.step_peak(fewer, f"e2e+gc{n - 1}", "float32", layer_act)["peak"] > budget
    by_method = {row["method"]: row["time_ratio"] for row in fit["rows"]}
    assert 1.0 < by_method[selective] < by_method["e2e+gc"]
    text = plan_fit.format_fit(fit, result)
    assert "fastest first" in text and "not measured on a GPU" in text and "docs/EVIDENCE.md" in text


def test_planned_time_ratios_follow_the_flop_count():
    """E2E is 1; checkpointing every layer adds one forward of the layers (below 4/3: the head is not
    recomputed); LoPT adds only its aux heads; freeze skips the first half's backward; +oib changes nothing."""
    config = _config(8)
    e2e = plan.count_step(config, "e2e", 1, SEQ)

    def ratio(method):
        count = plan.count_step(config, plan.parse_method(method).bench, 1, SEQ)
        flops = plan_fit.step_flops(config, method, SEQ, e2e, count)
        return flops / plan_fit.step_flops(config, "e2e", SEQ, e2e, e2e)

    layer = 2 * e2e.layer_params + 2 * SEQ * 32
    head = 2 * 256 * 32
    assert plan_fit.step_flops(config, "e2e", SEQ, e2e, e2e) == 3 * (8 * layer + head)
    assert ratio("e2e+gc") == pytest.approx(1 + 8 * layer / (3 * (8 * layer + head)))
    assert ratio("e2e+gc2") == pytest.approx(1 + 2 * layer / (3 * (8 * layer + head)))
    assert ratio("e2e+oib") == ratio("e2e") == 1.0
    assert 1.0 < ratio("lopt-k2") < ratio("lopt-k4") < 1.05
    assert ratio("freeze") == pytest.approx((8 * layer + 2 * 4 * layer + 3 * head) / (3 * (8 * layer + head)))
    assert ratio("freeze") < ratio("freeze+gc") < ratio("e2e+gc")
    # LoRA: the frozen weights pass the input's gradient only (1x), the adapters and attention train (2x), the
    # frozen LM head passes its input's gradient
    lora = plan.count_step(config, "lora", 1, SEQ)
    adapters, matmuls, attention = 2 * lora.layer_trainable, 2 * e2e.layer_params, 2 * SEQ * 32
    flops = 8 * (layer + adapters) + head + 8 * (matmuls + 2 * adapters + 2 * attention) + head
    assert ratio("lora") == pytest.approx(flops / (3 * (8 * layer + head)))
    assert ratio("lora+gc") == pytest.approx((flops + 8 * (layer + adapters)) / (3 * (8 * layer + head)))


def test_a_model_too_big_for_one_gpu_gets_a_gpu_count_per_method():
    config = _config()
    single = {row["method"]: row for row in _plan(config)["rows"]}
    # below every method's one-GPU peak, above e2e+gc's weights and AdamW states over 8 GPUs
    budget = min(row["total"]["single"] for row in single.values()) - 1
    result = _plan(config, budget)
    fit = plan_fit.fit_listing(config, result)
    assert fit["rows"] == []
    needed = {row["method"]: row["gpus"] for row in fit["gpus_needed"]}
    assert set(needed) == set(METHODS) and needed["e2e+oib"] is None
    assert any(gpus is not None for gpus in needed.values())
    for row in result["rows"]:
        gpus = needed[row["method"]]
        if row["method"].endswith("+oib"):
            continue
        count = plan.count_step(config, plan.parse_method(row["method"]).bench, BATCH, SEQ, "float32")

        def peak(n, row=row, count=count):
            return plan.step_peak(count, row["method"], "float32", row["layer_act_bytes"], "fsdp", n)["peak"]

        if gpus is None:
            assert peak(plan_fit.MAX_GPUS) > budget, row["method"]
        else:
            assert peak(gpus) <= budget and (gpus == 2 or peak(gpus - 1) > budget), row["method"]
    text = plan_fit.format_fit(fit, result)
    assert "Nothing fits" in text and "GPUs under FSDP" in text and "1 GPU only (+oib)" in text


def test_cli_gpu_counts_for_a_preset_that_fits_nowhere(capsys):
    code = main(["plan", "--model", "llama-3.2-1b", "--seq_len", "16", "--gpu_memory", "8GB", "--quiet",
                 "--methods", "e2e,lopt-k2,e2e+oib"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "Nothing fits 8 GB per GPU on 1 GPU" in text
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert int(lines["E2E"].split()[1]) >= 3  # 1.2B parameters x 16 bytes: more than two 8 GB GPUs
    assert "1 GPU only" in lines["E2E, opt. in bwd"]


@pytest.mark.parametrize("value", ["80XB", "-1", "0GB", "80", "lots"])
def test_bad_gpu_memory_fails_in_one_line_naming_the_value_and_the_fix(value, capsys):
    assert main(["plan", "--model", "qwen2.5-0.5b", f"--gpu_memory={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--gpu_memory {value!r}" in err and "e.g. 80GB" in err, err
