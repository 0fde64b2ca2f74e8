"""lm-evaluation-harness in `lopt eval` / `lopt compare`, and the built-in knowledge-retention task (tiny preset)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from lopt.builtin.knowledge import knowledge_items
from lopt.errors import UserError
from lopt.evaluation.lm_eval_tasks import KNOWLEDGE_TASK, format_lm_eval_report, summarize_lm_eval

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'lopt[eval]'); CI installs it",
)

# A local task in the lm-eval YAML format, over a JSONL file next to it: "does the model know what follows?"
LOCAL_YAML = """\
task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def lopt(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lopt", *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_knowledge_items_are_probe_fact_clozes_with_one_right_word():
    from lopt.builtin.knowledge import _training_word_counts, fact_role, knowledge_facts
    from lopt.builtin.tasks import builtin_task_rows

    items = knowledge_items()
    assert 500 <= len(items) <= 1000  # every usable probe fact: a standard error under 2 points
    assert items == knowledge_items()  # fixed once and for all
    assert knowledge_items(10) == items[:10]  # a prefix is the same items
    by_key = {f.key: f for f in knowledge_facts()}
    # every sentence an SFT task shows (the modules task's prompts open with one)
    sft_summaries = {
        row["prompt"].split("\n")[0]
        for split in ("train", "validation", "test")
        for row in builtin_task_rows(split, task="modules")
    }
    counts = _training_word_counts()
    for item in items:
        fact = by_key[item["id"]]
        assert (
            fact_role(fact) == "probe" and fact.summary not in sft_summaries
        )  # held out from every SFT task
        answer = item["choices"][item["answer"]]
        # the fact as the corpus presents it, cut just before the sentence's last word of 4+ lowercase letters
        header = f"Module {fact.module}\n\n{fact.kind} {fact.name}:\n"
        assert item["context"].startswith(header)
        shown = item["context"][len(header) :]
        assert fact.summary.startswith(shown)
        rest = fact.summary[len(shown) :].lstrip()
        assert re.match(rf"{answer}\b", rest) and not re.search(r"\b[a-z]{4,}\b", rest[len(answer) :])
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        for choice in item[
            "choices"
        ]:  # distractors about as frequent as the answer: frequency cannot pick it
            assert choice.isalpha() and choice.islower() and len(choice) >= 4
            assert 0.5 <= counts[choice] / counts[answer] <= 2
    # the right answer is not always in the same place
    assert len({item["answer"] for item in items}) == 4


def test_missing_lm_eval_is_a_one_line_error(monkeypatch, capsys):
    from lopt.cli.main import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    assert main(["eval", "--lm_eval_tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "lm-evaluation-harness" in err and "pip install 'lopt[eval]'" in err


@needs_lm_eval
@pytest.mark.parametrize(
    "value, message",
    [
        ("no_such_task_xyz", "'no_such_task_xyz' is not an lm-eval task"),
        ("./missing/tasks.yaml", "is not a folder"),
        (",", "names no task"),
    ],
)
def test_bad_lm_eval_tasks_are_clear_errors(value, message, tmp_path, monkeypatch):
    from lopt.evaluation.lm_eval_tasks import resolve_tasks

    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=message):
        resolve_tasks(value)


@needs_lm_eval
def test_bad_lm_eval_flags_fail_before_loading_a_model(builtin_tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for flags, message in (
        (["--lm_eval_tasks", str(empty)], "defines no lm-eval task"),
        (["--lm_eval_tasks", KNOWLEDGE_TASK, "--lm_eval_limit", "0"], "--lm_eval_limit 0 must be > 0"),
        (["--lm_eval_tasks", KNOWLEDGE_TASK, "--lm_eval_batch_size", "big"], "--lm_eval_batch_size 'big'"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "lopt", "eval", "--model_name_or_path", "/nonexistent/model", *flags],
            env=builtin_tiny["env"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@needs_lm_eval
def test_eval_runs_the_knowledge_task_and_a_local_task_folder(builtin_tiny, tmp_path):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    rows = [
        {"question": "Module os\n\ndef getcwd:", "choices": ["Return a string.", "Zebra."], "answer": 0},
        {
            "question": "Module json\n\nclass JSONDecoder:",
            "choices": ["Simple JSON decoder.", "Eh."],
            "answer": 0,
        },
        {
            "question": "Module re\n\ndef compile:",
            "choices": ["Xq.", "Compile a regular expression."],
            "answer": 1,
        },
    ]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_local.yaml").write_text(LOCAL_YAML.format(data=json.dumps(str(folder / "rows.jsonl"))))
    out = tmp_path / "eval.json"
    args = ["eval", "--max_samples", "2", "--lm_eval_tasks", f"{KNOWLEDGE_TASK},{folder}"]
    args += ["--lm_eval_limit", "12", "--lm_eval_batch_size", "8", "--output_file", str(out), "--no_progress"]
    lopt(args, builtin_tiny["env"])
    scores = json.loads(out.read_text())["lm_eval"]
    assert set(scores) == {KNOWLEDGE_TASK, "tiny_local"}
    assert scores[KNOWLEDGE_TASK]["n"] == 12 and scores["tiny_local"]["n"] == 3
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= scores[KNOWLEDGE_TASK][metric] <= 1.0
        assert scores[KNOWLEDGE_TASK][metric] * 12 == pytest.approx(
            round(scores[KNOWLEDGE_TASK][metric] * 12)
        )
    assert scores["tiny_local"]["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)


@needs_lm_eval
def test_knowledge_task_is_well_above_chance_on_the_tiny_base(builtin_tiny, tmp_path):
    # A probe at chance cannot show forgetting.  The tiny base scores ~41% on all items (chance 25%, standard
    # error ~1.8 points), so 33% leaves four standard errors of room.
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--max_samples",
        "1",
        "--lm_eval_tasks",
        KNOWLEDGE_TASK,
        "--output_file",
        str(out),
        "--no_progress",
    ]
    lopt(args, builtin_tiny["env"])
    score = json.loads(out.read_text())["lm_eval"][KNOWLEDGE_TASK]
    assert score["n"] == len(knowledge_items())
    assert score["acc"] >= 0.33, score


@needs_lm_eval
def test_compare_reports_one_change_column_per_lm_eval_task(builtin_tiny, tmp_path):
    out = tmp_path / "compare"
    args = ["compare", "--quick", "--methods", "e2e,freeze", "--max_steps", "2", "--eval_samples", "4"]
    args += ["--sft_args", "--per_device_train_batch_size 4 --logging_steps 1 --max_samples 16"]
    args += [
        "--lm_eval_tasks",
        KNOWLEDGE_TASK,
        "--lm_eval_limit",
        "8",
        "--output_dir",
        str(out),
        "--no_progress",
    ]
    lopt(args, builtin_tiny["env"])
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["lm_eval_tasks"] == [KNOWLEDGE_TASK]
    before = results["before"]["lm_eval"][KNOWLEDGE_TASK]["acc"]
    for name in ("e2e", "freeze"):
        entry = results["methods"][name]["lm_eval"][KNOWLEDGE_TASK]
        assert entry["metric"] == "acc" and entry["before"] == before and 0.0 <= entry["mean"] <= 1.0
        assert entry["change"] == pytest.approx(entry["mean"] - before)
    report = (out / "report.md").read_text()
    assert f"| {KNOWLEDGE_TASK} acc Δ (base {100 * before:.1f}%) |" in report
    assert f"- {KNOWLEDGE_TASK}: chance is 25%" in report
    assert "| e2e |" in report.split("## lm-eval tasks")[1]


def test_report_shows_changes_from_the_base_model():
    before = {"lm_eval": {"k": {"acc": 0.5, "acc_stderr": 0.05, "n": 100}, "sub": {"acc": 0.2}}}
    runs = {
        "e2e": [{"lm_eval": {"k": {"acc": 0.3}}}, {"lm_eval": {"k": {"acc": 0.4}}}],
        "freeze": [{"lm_eval": {"k": {"acc": 0.45}}}, {"lm_eval": {"k": {"acc": 0.45}}}],
    }
    methods = {
        "e2e": {
            "retention_ppl": 90.0,
            "retention_ppl_before": 60.0,
            "lm_eval": summarize_lm_eval(runs["e2e"], before),
        },
        "freeze": {
            "retention_ppl": 70.0,
            "retention_ppl_before": 60.0,
            "lm_eval": summarize_lm_eval(runs["freeze"], before),
        },
    }
    assert methods["e2e"]["lm_eval"]["k"]["change"] == pytest.approx(-0.15)
    results = {"setup": {"seeds": 2, "lm_eval_tasks": ["k"]}, "before": before, "methods": methods}
    report = "\n".join(format_lm_eval_report(results))
    assert (
        "| method | retention ppl rise | k acc Δ (base 50.0%) |" in report
    )  # requested tasks only, not "sub"
    assert "| e2e | +30.0 | -15.0 (35.0%) ± 7.1 |" in report
    assert "| freeze | +10.0 | -5.0 (45.0%) ± 0.0 |" in report
    assert "retention perplexity says freeze, k says freeze (agree)" in report
    assert format_lm_eval_report({"setup": {"seeds": 1}, "before": {}, "methods": methods}) == []
    assert (
        format_lm_eval_report({"setup": {"seeds": 1}, "methods": methods}) == []
    )  # results without "before"
