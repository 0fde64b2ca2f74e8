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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
