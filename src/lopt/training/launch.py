"""Multi-process launches: one clear line when a rank fails, and a launcher that ends with it.

Under torchrun, a rank that stops with a user error (one line, exit 2) leaves the other ranks waiting in a collective
that then fails with a gloo/NCCL traceback ("Connection closed by peer"), and torchrun's own report names the failed
rank without its message. So:
- the failing rank writes its line into torchrun's error file (`record_rank_error`): torchrun's report shows it as
  the root cause;
- a rank whose peer went away says so in one line and waits to be stopped by the launcher (`wait_after_lost_peer`), so
  the launcher sees the failing rank first and names it, not this one;
- `launch_local` starts the ranks itself (what `torchrun --standalone` does, on a free port of its choosing) and ends
  with the failing rank's line as its last line and that rank's exit code. `lopt sft --block_parallel` uses it when it
  is started without torchrun.

torch is imported lazily: `lopt --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

# The mark a lopt rank puts in torchrun's error file, so the launcher can tell a lopt error from a crash.
_ERROR_MARK = "lopt_error"
# How long a rank whose peer went away waits for the launcher to stop it before it exits on its own.
LOST_PEER_WAIT_SECONDS = 30.0


class LaunchRequired(Exception):
    """Raised by a command that needs `nproc` processes but was started as one: the CLI relaunches it."""

    def __init__(self, nproc: int):
        super().__init__(f"needs {nproc} processes")
        self.nproc = nproc


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def record_rank_error(line: str) -> None:
    """Write a rank's one-line error where torchrun reads a failed child's message (no-op outside torchrun)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": line,
            # torchrun prints py_callstack as the failure's traceback: the one line is all there is to say.
            "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))},
            _ERROR_MARK: True,
        }
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the line is on stderr anyway


def is_lost_peer(err: BaseException) -> bool:
    """A collective that failed because another rank went away (not a bug of this rank)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def wait_after_lost_peer() -> None:
    """Give the launcher time to notice the rank that failed first and stop this one (SIGTERM)."""
    deadline = time.monotonic() + LOST_PEER_WAIT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.2)


def launch_local(nproc: int, args: list[str]) -> int:
    """Run `python <args>` as `nproc` ranks on this machine and wait. Returns 0, or the exit code of the rank that
    failed first after printing its one-line error (or what the launcher knows of it) as the last line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # One thread per rank by default, as torchrun does: k ranks of all threads each would thrash the cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"lopt-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, chosen atomically by the rendezvous store
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as err:
        rank, failure = first_lopt_failure(err.failures) or err.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        if not (isinstance(message, str) and message.startswith("lopt ")):
            message = f"lopt: error: rank {rank} failed (exit code {failure.exitcode}): {message}"
        print(" ".join(str(message).split()), file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def first_lopt_failure(failures: dict) -> tuple[int, object] | None:
    """The earliest failure that a lopt rank reported with its own one-line error, if any."""
    marked = [
        (failure.timestamp, rank, failure)
        for rank, failure in failures.items()
        if isinstance(failure.message, dict) and failure.message.get(_ERROR_MARK)
    ]
    if not marked:
        return None
    _, rank, failure = min(marked, key=lambda item: (item[0], item[1]))
    return rank, failure
