"""Atomic writes: a kill never leaves a half-written checkpoint, config, report or cache folder; and lopt's cache."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """lopt's cache (built and real bases, lm-eval task folders, cached answers): `cache_dir`, else
    $LOPT_CACHE_DIR, else ~/.cache/lopt."""
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get("LOPT_CACHE_DIR"):
        return Path(env)
    return Path.home() / ".cache" / "lopt"


def publish_directory(final: Path, write: Callable[[Path], None], marker: str) -> Path:
    """A cache folder written once: `write` fills a temp sibling, which is renamed into place, so a reader never
    sees half of it. `marker` is a file of the folder that says it is there; when another process put the folder
    in place first, its copy is kept."""
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to its owner
        try:
            os.replace(tmp, final)
        except OSError:  # another process put it in place first
            if not (final / marker).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


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
