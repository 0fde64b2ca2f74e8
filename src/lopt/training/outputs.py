"""What a training command writes at the end: the checkpoint with the run's arguments and the flags it used
(`recipe.yaml`), the summary, and the summary's "knowledge kept" for a run on a real base's task."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from lopt.io import atomic_directory_write, atomic_write_json, save_checkpoint_files


def run_arguments(*parsed, set_fields: frozenset[str] = frozenset()) -> dict:
    """Every parsed value, flat (as flags are named), and which ones the user set: the run's lopt_args.json."""
    values: dict[str, Any] = {}
    for instance in parsed:
        values.update(instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance))
    values["set_fields"] = sorted(set_fields)
    return values


RUN_CONFIG = "recipe.yaml"


def run_config(command: str, effective: dict[str, Any], recipe_name: str) -> str:
    """The flags a run used (`effective`: LoPTParser.effective, the ones the user set, flag or YAML, and the ones
    lopt's recipe set, as parsed), as a `--config` YAML that re-runs it; every other flag is at its default."""
    import yaml

    plain = json.loads(json.dumps(effective, default=str))
    header = (
        f"# lopt {command}: the flags this run used, those given and those of its recipe ({recipe_name}); every other "
        f"flag had its default.\n# Re-run it with `lopt {command} --config {RUN_CONFIG}`.\n"
    )
    return header + yaml.safe_dump(plain, sort_keys=True)


def save_final_model(
    trainer, prepared, tokenizer, output_dir: str, run_args: dict, config: str | None = None
) -> None:
    """Write a standard HF checkpoint (LoRA merged, adapter in adapter/), tokenizer, the run's arguments and its
    `config` (`run_config`, as RUN_CONFIG). Called on the writing rank only (rank 0: `trainer.args.should_save`); the
    write is checked, never trusted."""
    model = trainer.model
    lopt_config = prepared.lopt_config

    def write(tmp: str) -> None:
        if prepared.method == "lora":
            model.save_pretrained(os.path.join(tmp, "adapter"))
            merged = model.merge_and_unload()
            save_checkpoint_files(merged, tmp, safe_serialization=True)
        else:
            save_checkpoint_files(model, tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if lopt_config is not None:
            lopt_config.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_args.json"), "w") as f:
            f.write(trainer.args.to_json_string())
        with open(os.path.join(tmp, "lopt_args.json"), "w") as f:
            json.dump(run_args, f, indent=2, sort_keys=True, default=str)
        if config is not None:
            with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
                f.write(config)

    atomic_directory_write(output_dir, write)


def finish(command: str, output_dir: str, summary: dict) -> int:
    """Write summary.json (a Score as its share) and state it in one line: the last thing every training command
    does."""
    from lopt.evaluation.evaluate import summary_line, summary_record

    atomic_write_json(os.path.join(output_dir, "summary.json"), summary_record(summary))
    print(
        f"lopt {command}: saved a Hugging Face checkpoint to {output_dir} (every metric in its summary.json)",
        file=sys.stderr,
    )
    print(f"lopt {command}: {summary_line(summary)}", file=sys.stderr)
    return 0


def knowledge_kept(model, tokenizer, base_path, progress: bool = False) -> dict:
    """When `base_path` is a base whose probe is world knowledge (a real base, e.g. smollm2-135m, not a checkpoint of
    one): {"knowledge_kept": the country facts the base answers right that the trained model still answers right, a
    Score}, what the README's verdict measures; {} for any other model."""
    from lopt.builtin.bases import base_of

    base = base_of(str(base_path))
    if base.probe != "world" or base.checkpoint:
        return {}
    from lopt.evaluation.world_knowledge import knowledge_kept_after_training

    kept = knowledge_kept_after_training(model, tokenizer, base_path, progress=progress)
    return {"knowledge_kept": kept if kept is not None else "none (the base answers no item right)"}
