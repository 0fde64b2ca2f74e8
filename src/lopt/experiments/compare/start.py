"""The common start of a GRPO compare (`lopt compare --trainer grpo`): one SFT checkpoint of the task that every GRPO
run trains from, so the methods differ in the RL phase alone.

Compare makes it once with `lopt sft --method e2e` on its task and model (plus --sft_args) in OUTPUT_DIR/start, or
takes --start_checkpoint. OUTPUT_DIR/compare_start.json names it (path, the command that made it, a digest of its
weights); a later call in the same folder reuses it, and refuses to go on from another start, since every run there
trained from this one.
"""

from __future__ import annotations

import hashlib
import os
import shlex

from lopt.errors import UserError
from lopt.experiments.compare.runs import _checkpoint_complete, _read_json, _train
from lopt.experiments.compare.spec import CompareSpec, _task
from lopt.io import atomic_write_json

START_DIR = "start"  # in --output_dir: the SFT start compare made
START_RECORD = "compare_start.json"  # in --output_dir: which start its GRPO runs trained from


def start_command(spec: CompareSpec) -> list[str]:
    """The `lopt sft` arguments of the start (all but --output_dir): e2e on compare's task and model."""
    cmd = ["sft", "--method", "e2e", "--task", _task(spec), "--eval_samples", "0", "--no_progress"]
    if spec.model_name_or_path is not None:
        cmd += ["--model_name_or_path", spec.model_name_or_path]
    return cmd + spec.sft_args


def _digest(folder: str) -> str:
    """sha256 over the checkpoint's weight files: a remade or replaced start has another digest."""
    names = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
    if not names:
        raise UserError(
            f"--start_checkpoint {folder!r} holds no model weights (*.safetensors): give a checkpoint folder."
        )
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def describe_start(start: dict) -> str:
    """One line naming a start: the command that made it, or the checkpoint given."""
    if start.get("command") is None:
        return f"the checkpoint {start['path']} (given)"
    return f"{start['path']} made by `{shell_command(start)}`"


def shell_command(start: dict) -> str:
    return "python -m lopt " + shlex.join([*start["command"], "--output_dir", start["path"]])


def prepare_start(spec: CompareSpec, base_path: str) -> dict:
    """The start of every GRPO run: made (or reused) here, or --start_checkpoint. Returns {"path", "command" (None
    for a given checkpoint), "digest", "trained_from"}: "trained_from" names it in every run's record, so a run is
    reused only when it trained from these very weights."""
    record_path = os.path.join(spec.output_dir, START_RECORD)
    previous = _read_json(record_path)
    if spec.start_checkpoint is not None:
        path, command = spec.start_checkpoint, None
    else:
        path, command = os.path.join(spec.output_dir, START_DIR), start_command(spec)
    planned = {"path": path, "command": command}
    if previous is not None and {k: previous.get(k) for k in planned} != planned:
        _refuse(spec, previous, planned)
    if command is not None and not _checkpoint_complete(path, command, str(base_path)):
        if spec.progress:
            print(f"lopt compare: making the SFT start: {shell_command(planned)}", flush=True)
        _train(command, str(base_path), path, "the SFT start")
    digest = _digest(path)
    if previous is not None and previous.get("digest") != digest:
        _refuse(spec, previous, planned, "its weights changed since the runs there trained from it")
    start = {**planned, "digest": digest, "trained_from": f"{path} (sha256 {digest[:16]})"}
    atomic_write_json(record_path, start)
    return start


def read_start(spec: CompareSpec) -> dict:
    """--report_only: the start the runs in --output_dir trained from."""
    start = _read_json(os.path.join(spec.output_dir, START_RECORD))
    if start is None:
        raise UserError(
            f"--report_only --trainer grpo needs {START_RECORD} in {spec.output_dir!r}, written when a GRPO compare "
            "starts: run it there once without --report_only."
        )
    return start


def _refuse(spec: CompareSpec, previous: dict, planned: dict, why: str | None = None) -> None:
    record = os.path.join(spec.output_dir, START_RECORD)
    what = why or f"this call's start is {describe_start(planned)}"
    raise UserError(
        f"{spec.output_dir!r} holds GRPO runs from the start {describe_start(previous)}, and {what}: use another "
        f"--output_dir, or delete {record} (and {os.path.join(spec.output_dir, START_DIR)}) to remake the start "
        "there, and every GRPO run then trains again."
    )
