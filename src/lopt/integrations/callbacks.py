"""Trainer callbacks: a JSONL metrics log with throughput and peak memory; bf16 rounding of weights and AdamW states."""

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


class RoundToBfloat16Callback(TrainerCallback):
    """Keeps every floating weight of the model and every AdamW state tensor at a bfloat16 value, rounding them when
    training starts and after every optimizer step, while the forward and backward still run in the weights'
    float32: the update rounding of pure-bf16 training (weights and AdamW in bf16, no fp32 master: the authors'
    setting) without bf16 matmuls, which CPUs without bf16 units run tens of times slower.

    What it reproduces: an update smaller than half a bf16 step of its weight is lost, as in pure bf16. What it
    does not: bf16 rounding inside the forward and backward (activations, gradients, the AdamW arithmetic itself).
    """

    @staticmethod
    @torch.no_grad()
    def _round(tensors) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() > 0:
                tensor.copy_(tensor.to(torch.bfloat16))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._round(model.parameters())  # as if loaded in bf16
        if optimizer is not None:  # a resumed run's states
            self._round(v for per_param in optimizer.state.values() for v in per_param.values())

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._round(p for group in optimizer.param_groups for p in group["params"])
        self._round(v for per_param in optimizer.state.values() for v in per_param.values())
