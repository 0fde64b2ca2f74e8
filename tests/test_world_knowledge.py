"""The world-knowledge probe of real bases (lopt.evaluation.world_knowledge): items, strict scoring, knowledge kept, the lm-eval
task, the cached base answers, the perplexity texts and `lopt compare`'s real-base defaults. No download, no real
model: the tiny built-in model (it has a ChatML chat template) stands in where a model is needed."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch

import lopt.evaluation.world_knowledge as wk
from lopt.evaluation.world_knowledge import (
    KEPT_TYPES,
    QUESTION_TYPES,
    WORLD_KNOWLEDGE_TASK,
    is_correct,
    kept_by_type,
    knowledge_kept,
    normalize,
    world_knowledge_items,
)
from lopt.experiments.compare import world_knowledge

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'lopt[eval]'); CI installs it",
)


@pytest.fixture(scope="module")
def tiny(builtin_tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(builtin_tiny["path"]), AutoTokenizer.from_pretrained(
        builtin_tiny["path"]
    )


# --- items -----------------------------------------------------------------------------------------------------------
def test_items_are_fixed_well_formed_and_from_countryinfo():
    items = world_knowledge_items()
    assert items == world_knowledge_items()  # fixed once and for all
    assert {item["type"] for item in items} == set(KEPT_TYPES)
    every = world_knowledge_items(tuple(QUESTION_TYPES))
    assert len({item["id"] for item in every}) == len(every)
    assert [item["type"] for item in every] == sorted(
        (item["type"] for item in every), key=list(QUESTION_TYPES).index
    )  # grouped by type, in the order asked
    for name in QUESTION_TYPES:
        assert sum(item["type"] == name for item in every) >= 150  # most of the ~250 countries
    by_id = {item["id"]: item for item in every}
    # facts as countryinfo 1.0.1 states them
    assert by_id["capital:FRA"]["answer"] == "Paris"
    assert by_id["capital:FRA"]["question"] == "What is the capital of France?"
    assert by_id["capital:FRA"]["prefix"] == "The capital of France is"
    assert by_id["capital_country:JPN"]["answer"] == "Japan"
    assert by_id["demonym:DEU"]["answer"] == "German"
    brazil = by_id["continent:BRA"]
    assert brazil["answers"][0] == "Americas" and "south america" in brazil["answers"]
    assert brazil["choices"] == ["Africa", "Americas", "Asia", "Europe", "Oceania"]
    for item in every:
        assert item["answer"] and item["answers"][0] == item["answer"]
        assert "{" not in item["question"] + item["prefix"]
        assert item["question"].endswith("?") and not item["prefix"].endswith(" ")
        assert item["choices"] == list(QUESTION_TYPES[item["type"]].choices)
    # an answer a question shows (the capital of Singapore is Singapore; Panama City) is never asked
    assert "capital:SGP" not in by_id and "capital_country:PAN" not in by_id and "continent:ZAF" not in by_id
    # one answer per item: a capital two records share (Kingston) is not asked the other way round
    assert (
        "capital_country:JAM" not in by_id and "capital_country:NFK" not in by_id and "capital:JAM" in by_id
    )


def test_unknown_question_type_is_an_error():
    with pytest.raises(ValueError, match="unknown question types"):
        world_knowledge_items(("capital", "anthem"))


# --- scoring ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "generation, answers, right",
    [
        (" Paris.", ["Paris"], True),
        (" Paris, the largest city of France.", ["Paris"], True),
        (" PARIS", ["Paris"], True),
        (" Bogota.", ["Bogotá"], True),  # accents
        (" Sana'a.", ["Sana'a"], True),
        (" the Netherlands.", ["Netherlands"], True),  # a leading article
        (" Parisian.", ["Paris"], False),  # whole words only
        (" the city of Paris.", ["Paris"], False),  # the answer must come first
        (" Lyon, not Paris.", ["Paris"], False),
        (" Paris", ["Saint John's"], False),
        ("\nParis", ["Paris"], False),  # nothing before the line break: lm-eval stops there too
        (" Paris\nLyon", ["Lyon"], False),
        ("", ["Paris"], False),
        (" South America.", ["Americas", "south america"], True),  # an accepted alias
    ],
)
def test_scoring_is_strict(generation, answers, right):
    assert is_correct(generation, answers) is right


def test_a_line_naming_several_listed_choices_is_wrong():
    choices = ["Africa", "Americas", "Asia", "Europe", "Oceania"]
    assert is_correct(" Africa.", ["Africa"], choices)
    assert is_correct(" Africa, specifically in the continent of Africa.", ["Africa"], choices)
    assert not is_correct(" Africa, the Americas, Asia, Europe or Oceania.", ["Africa"], choices)
    assert not is_correct(" Europe and Asia.", ["Europe"], choices)


def test_normalize():
    assert normalize("  The  Bogotá, D.C. ") == "bogota d c"
    assert normalize("An Afghan") == "afghan"
    assert normalize("Théâtre") == "theatre"


def test_knowledge_kept_counts_only_what_the_base_knew():
    assert knowledge_kept([True, True, False, True], [True, False, True, True]) == pytest.approx(2 / 3)
    assert knowledge_kept([True, False], [True, False]) == 1.0
    assert knowledge_kept([True, True], [False, False]) == 0.0
    with pytest.raises(ValueError, match="same items"):
        knowledge_kept([True], [True, False])
    with pytest.raises(ValueError, match="no item right"):
        knowledge_kept([False, False], [True, True])
    items = [{"type": "a"}, {"type": "a"}, {"type": "b"}, {"type": "c"}]
    assert kept_by_type(items, [True, True, True, False], [True, False, False, True]) == {"a": 0.5, "b": 0.0}
    assert wk.accuracy_by_type(items, [True, False, True, False]) == {"a": 0.5, "b": 1.0, "c": 0.0}


def test_knowledge_kept_after_training_counts_the_facts_kept(monkeypatch):
    """`lopt sft`'s end-of-run score: how many of the facts the base knew the trained model still answers, with the
    count of facts the base knew (the end-of-run line shows both)."""
    from lopt.evaluation.evaluate import Score

    items = [{"id": i} for i in range(5)]
    monkeypatch.setattr(wk, "world_knowledge_items", lambda: items)
    monkeypatch.setattr(wk, "base_world_knowledge", lambda *a, **k: [True, True, False, True, False])
    asked = []

    def answers(model, tokenizer, known, **kwargs):
        asked.append([item["id"] for item in known])
        return [True, False, True]

    monkeypatch.setattr(wk, "world_knowledge_answers", answers)
    kept = wk.knowledge_kept_after_training(object(), None, "base")
    assert kept == Score(2, 3) and kept.share == pytest.approx(2 / 3) and asked == [[0, 1, 3]]
    monkeypatch.setattr(wk, "base_world_knowledge", lambda *a, **k: [False] * 5)
    assert wk.knowledge_kept_after_training(object(), None, "base") is None


# --- the direct scorer -----------------------------------------------------------------------------------------------
def test_prompt_is_the_chat_template_with_the_answer_begun(tiny):
    _, tokenizer = tiny
    item = world_knowledge_items()[0]
    text = wk.prompt_text(tokenizer, item)
    assert text.endswith(f"<|im_start|>assistant\n{item['prefix']}")
    assert f"<|im_start|>user\n{item['question']}<|im_end|>" in text


def test_generations_are_first_lines_in_item_order_whatever_the_batch(tiny):
    model, tokenizer = tiny
    items = world_knowledge_items()[::60]
    one = wk.world_knowledge_generations(model, tokenizer, items, batch_size=64)
    small = wk.world_knowledge_generations(model, tokenizer, items, batch_size=3)
    assert len(one) == len(items) and all("\n" not in g for g in one)
    assert one == small  # left padding and the length sort change nothing
    answers = wk.world_knowledge_answers(model, tokenizer, items, batch_size=5)
    assert answers == [is_correct(g, i["answers"], i["choices"]) for g, i in zip(one, items)]


def test_scoring_shows_progress_batch_by_batch_unless_asked_not_to(tiny, capsys):
    """`lopt sft`'s scoring after training (held-out rows, the facts) shows a bar of the rows generated, advanced
    batch by batch; with --no_progress (progress=False) it prints nothing."""
    from lopt.evaluation.evaluate import builtin_task_score

    model, tokenizer = tiny
    items = world_knowledge_items()[::60]
    quiet = wk.world_knowledge_generations(model, tokenizer, items, batch_size=2)
    assert capsys.readouterr().err == ""
    shown = wk.world_knowledge_generations(model, tokenizer, items, batch_size=2, progress=True, desc="facts")
    err = capsys.readouterr().err
    assert shown == quiet and "facts" in err and f"{len(items)}/{len(items)}" in err
    assert wk.world_knowledge_answers(model, tokenizer, items, progress=True, desc="kept") is not None
    assert "kept: 100%" in capsys.readouterr().err
    score = builtin_task_score(model, tokenizer, 3, "successor", progress=True)
    err = capsys.readouterr().err
    assert score.n == 3 and "scoring: test rows" in err and "3/3" in err
    builtin_task_score(model, tokenizer, 3, "successor")
    assert capsys.readouterr().err == ""


def test_a_tokenizer_without_chat_template_is_a_clear_error(tiny):
    from lopt.errors import UserError

    _, tokenizer = tiny
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(UserError, match="no chat template"):
            wk.prompt_text(tokenizer, world_knowledge_items()[0])
    finally:
        tokenizer.chat_template = saved


def test_base_answers_are_cached_per_checkpoint(tmp_path, monkeypatch):
    calls = []

    def answers(model, tokenizer, items, **_):
        calls.append(len(items))
        return [i % 2 == 0 for i in range(len(items))]

    monkeypatch.setattr(wk, "world_knowledge_answers", answers)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"0" * 10)
    items = world_knowledge_items()[:7]
    cache = tmp_path / "cache"
    model = torch.nn.Linear(1, 1)  # on the CPU, where compare scores when there is no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    first = wk.base_world_knowledge(model, "tokenizer", base, items, cache_dir=cache)
    assert first == [True, False, True, False, True, False, True] and calls == [7]
    assert (
        wk.base_world_knowledge(None, None, base, items, cache_dir=cache) == first
    )  # read back: no model needed
    assert calls == [7]
    wk.base_world_knowledge(model, "tokenizer", base, items[:3], cache_dir=cache)  # other items: scored again
    assert calls == [7, 3]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU's answers are its own
    with pytest.raises(ValueError, match="no cached world-knowledge answers"):
        wk.base_world_knowledge(None, None, base, items, cache_dir=cache)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (base / "model.safetensors").write_bytes(b"1" * 11)  # another checkpoint in the same folder
    with pytest.raises(ValueError, match="no cached world-knowledge answers"):
        wk.base_world_knowledge(None, None, base, items, cache_dir=cache)


def test_compare_scores_a_trained_model_only_on_what_the_base_knew(monkeypatch):
    known = [True, False, True, True, False, True]
    items = world_knowledge_items()[:6]
    scored = []

    def answers(model, tokenizer, asked):
        scored.append([i["id"] for i in asked])
        return [True, False, False, True]

    world = world_knowledge.CompareWorldKnowledge(enabled=False)  # nothing built; set up by hand below
    world.enabled, world.items, world._base_correct = True, items, known
    monkeypatch.setattr(world_knowledge, "world_knowledge_answers", answers)
    monkeypatch.setattr(world, "_code_perplexity", lambda model, tokenizer: {"code_ppl": 3.0})
    record = world("model", "tokenizer")
    assert scored == [[i["id"] for i, ok in zip(items, known) if ok]]
    assert record["knowledge_kept"] == 0.5 and record["code_ppl"] == 3.0
    assert world_knowledge.CompareWorldKnowledge(enabled=False)("model", "tokenizer") == {}
    assert world_knowledge.CompareWorldKnowledge(enabled=False).key is None


# --- perplexity texts ------------------------------------------------------------------------------------------------
def test_prose_and_code_texts_are_fixed_samples():
    prose, code = wk.prose_texts(), wk.code_texts()
    assert prose == wk.prose_texts() and code == wk.code_texts()
    for texts, budget in ((prose, wk.PROSE_CHARS), (code, wk.CODE_CHARS)):
        size = sum(map(len, texts))
        assert budget <= size <= budget + 3 * wk._CHUNK_CHARS and len(texts) >= 80  # many pieces, both halves
    assert all(c.startswith(("def ", "class ")) for c in code)  # code, not the modules' docstrings
    assert max(map(len, code)) <= wk._CHUNK_CHARS + 500
    assert sum("def " in t or "import " in t for t in prose) < len(prose) / 2  # mostly prose


# --- the lm-eval task ------------------------------------------------------------------------------------------------
def test_task_folder_is_written_once(tmp_path):
    folder = wk.world_knowledge_task_dir(tmp_path)
    assert folder == wk.world_knowledge_task_dir(tmp_path)
    rows = []
    for kind in KEPT_TYPES:
        lines = (folder / f"{wk.type_task(kind)}.jsonl").read_text().splitlines()
        rows += [json.loads(line) for line in lines]
        yaml = (folder / f"{wk.type_task(kind)}.yaml").read_text()
        assert f"task: {wk.type_task(kind)}\n" in yaml and "output_type: generate_until" in yaml
        assert "gen_prefix: prefix" in yaml and f"max_gen_toks: {wk.MAX_NEW_TOKENS}" in yaml
    assert rows == world_knowledge_items()
    group = (folder / f"{WORLD_KNOWLEDGE_TASK}.yaml").read_text()
    assert f"group: {WORLD_KNOWLEDGE_TASK}\n" in group and "weight_by_size: true" in group
    assert wk.lm_eval_process_results(rows[0], [f" {rows[0]['answer']}."]) == {"acc": 1.0}
    assert wk.lm_eval_process_results(rows[0], [" no idea"]) == {"acc": 0.0}


@needs_lm_eval
def test_lm_eval_asks_the_same_prompts_and_scores_like_the_direct_scorer(tiny, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lopt.evaluation.lm_eval_tasks import CHAT_TASKS, resolve_tasks

    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path))
    model, tokenizer = tiny
    tasks = resolve_tasks(WORLD_KNOWLEDGE_TASK)
    assert tasks.names == [WORLD_KNOWLEDGE_TASK] and WORLD_KNOWLEDGE_TASK in CHAT_TASKS
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[WORLD_KNOWLEDGE_TASK],
        task_manager=tasks.manager,
        limit=4,
        apply_chat_template=True,  # as run_lm_eval does for CHAT_TASKS
        log_samples=True,
    )
    for kind in KEPT_TYPES:
        samples = out["samples"][wk.type_task(kind)]
        items = [i for i in world_knowledge_items() if i["type"] == kind][:4]
        assert [s["doc"]["id"] for s in samples] == [i["id"] for i in items]
        assert [s["arguments"][0][0] for s in samples] == [wk.prompt_text(tokenizer, i) for i in items]
        ours = wk.world_knowledge_generations(model, tokenizer, items)
        assert [s["filtered_resps"][0] for s in samples] == ours
        assert out["results"][wk.type_task(kind)]["acc,none"] == pytest.approx(
            sum(wk.world_knowledge_answers(model, tokenizer, items)) / 4
        )


@needs_lm_eval
def test_eval_prints_the_accuracy_overall_and_per_type(builtin_tiny, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "eval.json"
    args = ["eval", "--max_samples", "2", "--lm_eval_tasks", WORLD_KNOWLEDGE_TASK, "--lm_eval_limit", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "lopt", *args, "--output_file", str(out), "--no_progress"],
        env=builtin_tiny["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(out.read_text())["lm_eval"]
    assert set(scores) == {WORLD_KNOWLEDGE_TASK, *map(wk.type_task, KEPT_TYPES)}
    for kind in KEPT_TYPES:
        assert scores[wk.type_task(kind)]["n"] == 3 and scores[wk.type_task(kind)]["acc"] in (
            0,
            1 / 3,
            2 / 3,
            1,
        )
    overall = sum(scores[wk.type_task(kind)]["acc"] for kind in KEPT_TYPES) / len(KEPT_TYPES)
    assert scores[WORLD_KNOWLEDGE_TASK]["acc"] == pytest.approx(overall)  # equal sizes: the plain mean


# --- lopt compare ----------------------------------------------------------------------------------------------------
def test_compare_defaults_on_a_real_base():
    from lopt.builtin.tasks import task_max_new_tokens, task_scorer
    from lopt.experiments.compare.runs import _sft_command, evaluation_sets
    from lopt.experiments.compare.spec import CompareSpec, _task, _world_knowledge_on

    # the short name is enough: nothing is converted or loaded to build the spec and its evaluation sets
    spec = CompareSpec(model_name_or_path="smollm2-135m", methods=["e2e"], seeds=1, eval_samples=5)
    assert _task(spec) == "extract" and _world_knowledge_on(spec)
    command = _sft_command(spec, "e2e", 1e-4, 10, 0)
    assert command[command.index("--model_name_or_path") + 1] == "smollm2-135m"
    assert command[command.index("--task") + 1] == "extract" and "--train_file" not in command
    sets = evaluation_sets(spec)
    rows, match, max_new_tokens = sets["test"]
    assert (
        len(rows) == 5
        and match is task_scorer("extract")
        and max_new_tokens == task_max_new_tokens("extract")
    )
    prose = wk.prose_texts()
    assert sets["validation_retention"] == prose[0::2] and sets["test_retention"] == prose[1::2]
    off = CompareSpec(model_name_or_path="smollm2-135m", methods=["e2e"], seeds=1, world_knowledge=False)
    assert not _world_knowledge_on(off)


def test_compare_keeps_the_toy_and_user_defaults(tmp_path):
    from lopt.builtin.base import retention_texts
    from lopt.builtin.tasks import builtin_task_rows, exact_match
    from lopt.errors import UserError
    from lopt.experiments.compare.runs import evaluation_sets
    from lopt.experiments.compare.spec import CompareSpec, _task, _world_knowledge_on

    toy = CompareSpec(methods=["e2e"], seeds=1, eval_samples=4)
    assert _task(toy) == "successor" and not _world_knowledge_on(toy)
    sets = evaluation_sets(toy)
    assert sets["test"] == (builtin_task_rows("test", n=4), exact_match, 32)
    assert sets["test_retention"] == retention_texts()[1::2]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    user = CompareSpec(model_name_or_path=str(tmp_path), train_file=str(rows), methods=["e2e"], seeds=1)
    assert _task(user) is None and not _world_knowledge_on(user)
    with pytest.raises(UserError, match="needs --train_file"):
        CompareSpec(model_name_or_path=str(tmp_path), methods=["e2e"], seeds=1)
    with pytest.raises(UserError, match="made for the built-in model"):
        CompareSpec(model_name_or_path="smollm2-135m", task="successor", methods=["e2e"], seeds=1)


def test_the_evaluation_key_names_the_probe_only_when_it_runs():
    from lopt.experiments.compare.runs import _evaluation_key
    from lopt.experiments.compare.spec import CompareSpec
    from lopt.experiments.compare.sweep import _Scorer

    spec = CompareSpec(methods=["e2e"], seeds=1, eval_samples=4, lm_eval_tasks="none")
    plain = _Scorer.make(spec, "unused", tokenizer=object())
    assert plain.evaluation_key == _evaluation_key(
        {**plain.sets, "lm_eval": [None, None]}
    )  # as before the probe
    spec.world_knowledge = True
    probed = _Scorer.make(spec, "unused", tokenizer=object())
    assert probed.world.enabled and probed.evaluation_key != plain.evaluation_key


def _results(seeds: int = 2) -> tuple[dict, dict]:
    before = {
        "retention_ppl": 10.0,
        "code_ppl": 4.0,
        "validation_code_ppl": 4.0,
        "world_knowledge": {
            "items": 8,
            "known": 4,
            "accuracy": 0.5,
            "by_type": {"capital": 0.75, "demonym": 0.25},
            "items_by_type": {"capital": 4, "demonym": 4},
        },
    }
    runs = {
        ("e2e", 1e-4, 10): [
            {
                "seed": 0,
                "knowledge_kept": 0.5,
                "knowledge_kept_by_type": {"capital": 2 / 3, "demonym": 0.0},
                "code_ppl": 5.0,
            },
            {
                "seed": 1,
                "knowledge_kept": 0.75,
                "knowledge_kept_by_type": {"capital": 1.0, "demonym": 0.0},
                "code_ppl": 6.0,
            },
        ][:seeds],
        ("freeze", 1e-4, 10): [
            {
                "knowledge_kept": 1.0,
                "knowledge_kept_by_type": {"capital": 1.0, "demonym": 1.0},
                "code_ppl": 4.0,
            }
        ],
    }
    points = [
        {
            "method": "e2e",
            "learning_rate": 1e-4,
            "max_steps": 10,
            "task_accuracy": 0.9,
            "retention_ppl": 12.0,
            "per_seed": [{"seed": seed} for seed in range(seeds)],
        },
        {
            "method": "freeze",
            "learning_rate": 1e-4,
            "max_steps": 10,
            "task_accuracy": 0.6,
            "retention_ppl": 10.5,
        },
    ]
    for p in points:
        p["retention_ppl_before"] = before["retention_ppl"]
    results = {
        "setup": {"seeds": seeds},
        "before": before,
        "points": points,
        "methods": {"e2e": points[0], "freeze": points[1]},
    }
    return results, runs


def test_report_and_plot_show_accuracy_against_knowledge_kept(tmp_path):
    results, runs = _results()
    world_knowledge.add_world_knowledge(results, runs)
    e2e = results["methods"]["e2e"]
    assert e2e["knowledge_kept"] == pytest.approx(0.625) and e2e["code_ppl"] == pytest.approx(5.5)
    assert e2e["knowledge_kept_by_type"] == pytest.approx({"capital": 5 / 6, "demonym": 0.0})
    assert e2e["code_ppl_before"] == 4.0 and "knowledge_kept_std" in e2e
    assert [(s["knowledge_kept"], s["code_ppl"]) for s in e2e["per_seed"]] == [(0.5, 5.0), (0.75, 6.0)]
    lines = world_knowledge.format_world_knowledge_report(results)
    text = "\n".join(lines)
    assert (
        "The base answers 4 of 8 country questions right (50.0%: capital 75.0% of 4, demonym 25.0% of 4"
        in text
    )
    assert "| method | lr | steps | task acc | knowledge kept | kept: capital | kept: demonym |" in text
    assert re.search(
        r"\| e2e \| 0.0001 \| 10 \| 90.0% \| 62.5% ± 17.7 \| 83.3% \| 0.0% \| \+20% \| \+38% \|", text
    )
    assert "| freeze | 0.0001 | 10 | 60.0% | 100.0% | 100.0% | 100.0% | +5% | +0% |" in text
    assert [p["method"] for p in world_knowledge.knowledge_front(results["points"])] == ["freeze", "e2e"]
    saved = []

    def save(fig, name):
        fig.savefig(tmp_path / name)
        saved.append(name)

    world_knowledge.plot_knowledge_fronts(
        results, {"e2e": "C0", "freeze": "C1"}, {"e2e": "o", "freeze": "s"}, save
    )
    assert saved == ["knowledge_fronts.png"] and os.path.getsize(tmp_path / "knowledge_fronts.png") > 1000


def test_no_probe_no_report_no_plot():
    results, runs = _results()
    del results["before"]["world_knowledge"]
    runs = {k: [{"code_ppl": 1.0}] for k in runs}
    world_knowledge.add_world_knowledge(results, runs)
    assert "knowledge_kept" not in results["methods"]["e2e"] and "code_ppl" not in results["methods"]["e2e"]
    assert world_knowledge.format_world_knowledge_report(results) == []
    world_knowledge.plot_knowledge_fronts(
        results, {}, {}, lambda fig, name: pytest.fail("no plot without the probe")
    )


def test_compare_with_the_probe_records_reports_and_plots_knowledge_kept(builtin_tiny, tmp_path, monkeypatch):
    """The whole compare path on the tiny built-in model with --world_knowledge on, in this process so that a fake
    scorer can stand for a base that knows something (the tiny model knows no country)."""
    from lopt.experiments.compare.spec import CompareSpec
    from lopt.experiments.compare.sweep import run_compare

    for name in ("LOPT_BUILTIN_PRESET", "LOPT_CACHE_DIR", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, builtin_tiny["env"][name])
    scored = []

    def answers(model, tokenizer, items, batch_size=128, **_):
        # the base: every item, each known other one; a trained model: the known ones
        scored.append(len(items))
        return [i % 2 == 0 for i in range(len(items))]

    # compare's module calls both through its own imports; base_world_knowledge calls the scorer in its module
    for module in (wk, world_knowledge):
        monkeypatch.setattr(module, "world_knowledge_answers", answers)
    cached = wk.base_world_knowledge  # the fake answers are cached here, never in the shared cache
    monkeypatch.setattr(
        world_knowledge, "base_world_knowledge", lambda *a: cached(*a, cache_dir=tmp_path / "cache")
    )
    spec = CompareSpec(
        methods=["e2e"],
        seeds=1,
        max_steps=[2],
        eval_samples=4,
        world_knowledge=True,
        lm_eval_tasks="none",
        sft_args=["--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_samples", "16"],
        output_dir=str(tmp_path / "compare"),
        progress=False,
    )
    results = run_compare(spec)
    items = world_knowledge_items()
    known = (len(items) + 1) // 2
    assert scored == [len(items), known]
    base = results["before"]["world_knowledge"]
    assert base["items"] == len(items) and base["known"] == known and set(base["by_type"]) == set(KEPT_TYPES)
    assert results["before"]["code_ppl"] > 1 and results["before"]["validation_code_ppl"] > 1
    e2e = results["methods"]["e2e"]
    assert e2e["knowledge_kept"] == pytest.approx(((known + 1) // 2) / known)
    assert e2e["code_ppl"] > 1 and e2e["code_ppl_before"] == results["before"]["code_ppl"]
    report = (tmp_path / "compare" / "report.md").read_text()
    assert (
        "## World knowledge kept (real base)" in report
        and "| e2e | " in report.split("## World knowledge")[1]
    )
    assert (tmp_path / "compare" / "knowledge_fronts.png").is_file()
    record = json.loads(next((tmp_path / "compare" / "runs").glob("*/compare_run.json")).read_text())
    assert record["knowledge_kept"] == e2e["knowledge_kept"] and "code_ppl" in record
