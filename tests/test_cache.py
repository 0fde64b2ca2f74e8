"""The built-in cache is never half-written: a build killed mid-way leaves no folder that looks done, and a folder that
is missing its weights is built anew."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lopt.builtin import base as builtin
from lopt.io import is_complete_checkpoint


def _fake_build(preset: str, out_dir: Path, progress: bool) -> None:
    """A stand-in for the minutes-long pretraining: a complete (tiny) checkpoint, metadata last."""
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"weights")
    (out_dir / builtin.METADATA_FILE).write_text(json.dumps({"preset": preset}))


def test_killed_build_leaves_nothing_that_looks_built_and_the_next_run_builds(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    # A real build of the tiny preset in another process, killed (SIGKILL: no clean-up runs) once it has started writing.
    code = (
        "from lopt.builtin.base import builtin_model_path; builtin_model_path(preset='tiny', progress=False)"
    )
    env = {**os.environ, "LOPT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".builtin-tiny-*.tmp-*")):
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = cache / builtin._build_name("tiny")
    assert not final.exists()  # only the temporary folder, which no reader trusts

    monkeypatch.setattr(builtin, "_build", _fake_build)
    path = builtin.builtin_model_path(preset="tiny", cache_dir=cache, progress=False)
    assert path == final and is_complete_checkpoint(path, builtin.METADATA_FILE)
    assert not list(cache.glob(".builtin-tiny-*.tmp-*"))  # the killed build's leftovers are gone


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json", builtin.METADATA_FILE])
def test_a_cached_folder_missing_a_part_is_rebuilt(tmp_path, monkeypatch, missing):
    monkeypatch.setattr(builtin, "_build", _fake_build)
    path = builtin.builtin_model_path(preset="tiny", cache_dir=tmp_path, progress=False)
    (path / missing).unlink()
    (path / "marker-of-the-old-folder").write_text("")
    again = builtin.builtin_model_path(preset="tiny", cache_dir=tmp_path, progress=False)
    assert again == path and is_complete_checkpoint(again, builtin.METADATA_FILE)
    assert not (again / "marker-of-the-old-folder").exists()


def test_is_complete_checkpoint_reads_sharded_indexes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert not is_complete_checkpoint(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert is_complete_checkpoint(tmp_path)
    assert not is_complete_checkpoint(tmp_path, marker="summary.json")
