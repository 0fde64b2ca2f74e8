"""Atomic writes: a kill never leaves a half-written checkpoint, config, report or cache folder; and lopt's cache.

Multi-process runs (torchrun, block-parallel): a cache folder is built by whichever process takes its file lock,
whatever its rank, as one whole (`build_cache_folder`): the others wait on the lock and then read it. Nothing here
asks a library which process is "main": `save_checkpoint_files` writes on any rank and checks what it wrote. Run
outputs (checkpoints, reports) are written by rank 0 alone; that choice is the trainer's, and the writer checks them.
"""

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
        normal_permissions(tmp)
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
        normal_permissions(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process put it in place first
            if not (final / marker).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_cache_folder(final: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """A cache folder built once, whichever process gets here first: under a file lock, `build` fills a temp
    sibling, which is renamed into place only if `complete` holds for it (the writer checks what readers check), so
    no process ever sees half of it. Processes that wait on the lock read the first one's folder. A folder that is
    not complete (cut short, files deleted) and temp folders left by a killed build are replaced."""
    from filelock import FileLock

    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f"{final.name}.lock")):
        if complete(final):  # another process built it meanwhile
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            if not complete(tmp):
                raise RuntimeError(
                    f"building {final} wrote an incomplete folder ({', '.join(sorted(os.listdir(tmp))) or 'empty'}): "
                    "nothing was put in place; please report this with the command that ran"
                )
            normal_permissions(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_checkpoint_files(model, directory: str | os.PathLike, **kwargs) -> None:
    """`model.save_pretrained(directory)` on any rank, checked. transformers writes nothing, silently, on a rank other
    than 0 once torch.distributed is initialised; a cache built by rank 1, or a folder renamed into place on that
    assumption, would lack its weights. This writes whatever the rank, and raises if the folder is not a complete
    checkpoint afterwards (so a future change in that rule fails loudly here)."""
    gated = hasattr(model, "should_save_on_this_rank")  # transformers' rank gate
    if gated:  # an instance attribute, removed afterwards: the model itself is not changed
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(directory, **kwargs)
    finally:
        if gated:
            del model.should_save_on_this_rank
    if not is_complete_checkpoint(directory):
        raise RuntimeError(
            f"save_pretrained wrote no complete checkpoint to {os.fspath(directory)} (config.json and safetensors "
            "weights expected)"
        )


def normal_permissions(path: str | os.PathLike) -> None:
    """Give a folder written through temp files the permissions of any file the user writes (the umask's): mkdtemp
    and the safetensors writer make theirs private to the owner."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)
    for folder, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


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
