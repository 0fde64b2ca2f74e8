"""Trainer callbacks: a JSONL metrics log with throughput and peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch
from transformers import TrainerCallback


def peak_memory_bytes() -> int:
    """Peak accelerator memory if there is one, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


class MetricsLogCallback(TrainerCallback):
    """Appends one JSON object per training log to `path`: step, losses, learning rates, tokens/s, step time and
    peak memory.

    Tokens are counted from `state.num_input_tokens_seen` (enable `include_num_input_tokens_seen`).
    """

    def __init__(self, path: str):
        self.path = path
        self._last_time = None
        self._last_tokens = 0
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and state.is_world_process_zero and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log; a resumed run appends to it
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen or 0
        self._last_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen or 0
        elapsed = max(now - (self._last_time or now), 1e-9)
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
            "tokens_per_s": round((tokens - self._last_tokens) / elapsed, 2),
            # Wall time per optimizer step since the previous log (includes data loading and logging).
            "step_time_s": round(elapsed / max(state.global_step - self._last_step, 1), 5),
            "peak_memory_bytes": peak_memory_bytes(),
        }
        self._last_time, self._last_tokens, self._last_step = now, tokens, state.global_step
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:  # one line per write: a kill leaves at most a missing line
            f.write(json.dumps(record) + "\n")
