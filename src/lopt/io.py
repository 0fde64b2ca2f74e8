"""Atomic writes: a kill never leaves a half-written checkpoint, config or report."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable


def atomic_directory_write(directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write into a temp sibling, then move into place: a kill never leaves a half-written checkpoint."""
    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        write(tmp)
        if not os.path.exists(directory):
            os.replace(tmp, directory)
            return
        for name in os.listdir(tmp):  # existing folder (e.g. an output_dir with logs): replace file by file
            target = os.path.join(directory, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete_checkpoint(directory: str | os.PathLike, marker: str | None = None) -> bool:
    """A Hugging Face checkpoint folder with its config and all its safetensors weights (and `marker`, a file written
    last, when given). Caches check this rather than trust that a folder which exists is whole."""
    directory = os.fspath(directory)
    if marker is not None and not os.path.isfile(os.path.join(directory, marker)):
        return False
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return False
    if os.path.isfile(os.path.join(directory, "model.safetensors")):
        return True
    index = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return False
    try:
        with open(index) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all(os.path.isfile(os.path.join(directory, shard)) for shard in shards)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
