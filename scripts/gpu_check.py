"""One prepared check for a CUDA machine: every step in its own process with its own time limit, one report at the end.

    bash scripts/gpu_check.sh                  # on a CUDA machine: about 8 minutes of device time on one H200
    bash scripts/gpu_check.sh --out DIR        # where the report and the logs go (default: $OUT if set, else
                                               # runs/gpu-check)
    bash scripts/gpu_check.sh --dry-run        # the same steps at a tiny size on CPU: checks the script, measures nothing

What it leaves in the output folder (three files, so that a machine which returns only a few files returns them all):
  gpu_check.md     the report: the steps table and the whole-step table (also printed at the end)
  gpu_check.json   every row and measurement, machine-readable
  logs.tar.gz      each step's command, stdout and stderr, and the bench / plan JSON; while the run is going they sit
                   in DIR/logs/ (packed at the end), so a run killed from outside still leaves them

Steps, most important first; each has a time limit, and the whole run a budget (--budget-s, default 480 s): a step
that would start with too little of it left is SKIPPED, one that fails or runs past its limit is FAILED with its last
error line, and the report is still written.
  whole step      `lopt bench --model qwen2.5-0.5b --seq_len 2048 --batch_size 8 --dtype bfloat16` (random weights, tied
                  embedding as Qwen2.5-0.5B, TRL's fused LM head, AdamW) for e2e, LoPT k=2, LoPT k=4, each also with
                  the optimizer step in the backward (+oib) and with activation checkpointing (+gc): 12 configurations
                  in one process (about 3 GB resident each). Per configuration: weights, gradients' peak, AdamW
                  states, activations (saved for backward), and the step peak (weights + AdamW states + the
                  allocator's peak during a step above what was allocated before it). Micro-batch 8; if that runs
                  out of GPU memory, once more at 4 (the report says which ran).
                  Beside each: `lopt plan`'s floor for it (run on the CPU meanwhile, same shape). lopt plan counts bf16
                  as fp32 master weights + fp32 AdamW (16 B/param), lopt bench trains bf16 weights with bf16 AdamW
                  states (8 B/param), so the comparable figure ("plan at bench's states") is the measured weights and
                  AdamW states plus the plan's gradients and activations at its worst moment; the plan's own total
                  is shown too.
  build built-in model   the built-in base (built once, cached in $LOPT_CACHE_DIR or ~/.cache/lopt; pretrained on
                  the GPU here unless $LOPT_BUILTIN_DEVICE says otherwise; a carried cache skips it)
  sft             `lopt sft --bf16 --max_steps 30` (built-in model and task, LoPT k=2, tied embedding)
  sft oib         `lopt sft --bf16 --max_steps 10 --optimizer_in_backward`
  grpo            `lopt grpo --bf16 --max_steps 5`, from the sft step's checkpoint (from the built-in SFT checkpoint,
                  made first, if the sft step failed)
  dpo             `lopt dpo --bf16 --max_steps 5`, likewise
  bench batch 1   the earlier activation check (docs/GPU.md): E2E / LoPT k=2 / LoPT k=4, seq 2048, batch 1, one
                  fresh process each: bytes saved for backward (lopt.experiments.meter.SavedTensorMeter), the
                  allocator's peak during one step above what was allocated before it (activations + gradients +
                  optimizer temporaries), its absolute peak, and the step time
  with 2+ GPUs (nccl):   `torchrun --nproc_per_node 2 -m lopt sft` data-parallel (DDP), with --fsdp, and with
                  --block_parallel, 30 steps each
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

QWEN_05B = dict(
    num_layers=24,
    hidden_size=896,
    intermediate_size=4864,
    num_heads=14,
    num_kv_heads=2,
    vocab_size=151_936,
    seq_len=2048,
    dtype="bfloat16",
)
TINY = dict(  # --dry-run
    num_layers=4,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=1000,
    seq_len=64,
    dtype="float32",
)
BENCH_CONFIGS = {"E2E": None, "LoPT k=2": 2, "LoPT k=4": 4}
# the whole step: every configuration of the table, in lopt bench's and lopt plan's names
WHOLE_STEP_CONFIGS = [
    f"{base}{oib}{gc}" for gc in ("", "+gc") for base in ("e2e", "lopt-k2", "lopt-k4") for oib in ("", "+oib")
]
WHOLE_STEP_BATCH = 8
WHOLE_STEP_FALLBACK_BATCH = 4
MB = 2**20


# --- one bench configuration at batch 1 (runs in its own process) ------------------------------------------------
def bench_one(name: str, spec: dict, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from trl.trainer.utils import add_fused_lm_head

    from lopt import LoPTConfig, get_lopt_model, param_groups
    from lopt.experiments.meter import SavedTensorMeter

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=max(spec["seq_len"], 4096),
        tie_word_embeddings=True,  # as Qwen2.5-0.5B; LoPT keeps the tie (one matrix) unless asked to untie
        use_cache=False,
    )
    dtype = getattr(torch, spec["dtype"])
    model = (
        AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device).train()
    )
    add_fused_lm_head(model)
    k = BENCH_CONFIGS[name]
    if k is None:
        trained, params = model, list(model.parameters())
    else:
        trained = get_lopt_model(model, LoPTConfig(num_blocks=k))
        params = param_groups(trained, lr=1e-5)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(
        0, spec["vocab_size"], (1, spec["seq_len"]), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(device)
    cuda = device.startswith("cuda")

    def step() -> None:
        loss = trained(input_ids=ids, labels=ids, fused_lm_head=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states exist from here on
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    with SavedTensorMeter() as meter:
        step()
    if cuda:
        torch.cuda.synchronize()
    result = {"saved_peak": meter.peak, "step_s": time.perf_counter() - start}
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
        result["cuda_step_peak"] = result["cuda_peak"] - before
    return result


# --- running steps ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Budget:
    """The whole run's time budget: each step gets min(its own limit, what is left)."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def limit(self, own: float) -> float | None:
        """The step's time limit, or None when too little is left to start it."""
        left = self.left()
        return None if left < 20 else min(own, left)


RUNNING: set[subprocess.Popen] = set()  # the steps running now, killed if the check itself is stopped


def _stop(signum, _frame) -> None:
    """SIGTERM / SIGINT: kill the running steps' process groups, then exit (the report so far is on disk)."""
    for proc in list(RUNNING):
        _kill_group(proc)
    sys.exit(128 + signum)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's ranks and any child with it
    except (ProcessLookupError, PermissionError):
        proc.kill()


def last_error(stderr: str, code: int | None) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [f"exit {code}"])[-1].strip()[:200]


class Steps:
    """Runs commands with a time limit each, saves each one's command, stdout and stderr in `logs`."""

    def __init__(self, logs: str, env: dict, budget: Budget):
        self.logs, self.env, self.budget = logs, env, budget
        os.makedirs(logs, exist_ok=True)

    def log_path(self, tag: str) -> str:
        return os.path.join(self.logs, f"{tag}.log")

    def start(self, tag: str, cmd: list[str]) -> tuple[subprocess.Popen, float]:
        out = open(self.log_path(tag) + ".stdout", "w")
        err = open(self.log_path(tag), "w")
        err.write(f"$ {shlex.join(cmd)}\n")
        err.flush()
        # its own process group (not a new session): a time limit kills the step and its children (torchrun's
        # ranks) together, and nothing outlives the check
        proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=err, text=True, preexec_fn=os.setpgrp)
        proc._logs = (out, err)  # closed in wait()
        RUNNING.add(proc)
        return proc, time.perf_counter()

    def wait(
        self, tag: str, proc: subprocess.Popen, started: float, timeout: float
    ) -> tuple[str, str, float]:
        """(status, stdout or last error line, seconds): status OK, FAILED or TIMEOUT."""
        try:
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            timed_out = True
        RUNNING.discard(proc)
        seconds = time.perf_counter() - started
        for f in proc._logs:
            f.close()
        with open(self.log_path(tag) + ".stdout") as f:
            stdout = f.read()
        with open(self.log_path(tag)) as f:
            stderr = f.read()
        with open(self.log_path(tag), "a") as f:  # one log per step: stderr, then stdout
            f.write(
                f"\n--- stdout ---\n{stdout}\n--- exit {proc.returncode}, {seconds:.0f} s"
                f"{', timed out' if timed_out else ''} ---\n"
            )
        os.remove(self.log_path(tag) + ".stdout")
        if timed_out:
            return "FAILED", f"timed out after {timeout:.0f} s", seconds
        if proc.returncode != 0:
            return "FAILED", last_error(stderr, proc.returncode), seconds
        return "OK", stdout, seconds

    def run(self, tag: str, cmd: list[str], own_limit: float) -> tuple[str, str, float]:
        timeout = self.budget.limit(own_limit)
        if timeout is None:
            return "SKIPPED", f"the run's budget was spent ({self.budget.left():.0f} s left)", 0.0
        proc, started = self.start(tag, cmd)
        return self.wait(tag, proc, started, timeout)


def mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:,.0f} MB"


def training_row(name: str, steps: Steps, tag: str, cmd: list[str], out: str, limit: float) -> list[str]:
    status, text, seconds = steps.run(tag, cmd, limit)
    if status != "OK":
        return [name, status, text, "", "", f"{seconds:.0f} s"]
    try:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError) as err:
        return [name, "FAILED", f"exit 0 but no summary.json: {err}"[:200], "", "", f"{seconds:.0f} s"]
    metrics = []
    if os.path.isfile(os.path.join(out, "metrics.jsonl")):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    peak = max((m["peak_memory_bytes"] for m in metrics if m.get("peak_memory_bytes")), default=None)
    speeds = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    loss = summary.get("train_loss")
    detail = (
        f"steps {summary.get('steps')}, train_loss {loss:.3f}"
        if isinstance(loss, (int, float))
        else (f"steps {summary.get('steps')}")
    )
    for key in ("heldout_exact_match", "reward_mean", "mean_reward"):
        if isinstance(summary.get(key), (int, float)):
            detail += f", {key} {summary[key]:.3f}"
    speed = f"{sorted(speeds)[len(speeds) // 2]:,.0f} tokens/s" if speeds else ""
    memory = f"peak {mb(peak)} (rank 0)" if peak else ""
    return [name, "OK", detail, memory, speed, f"{seconds:.0f} s"]


# --- the whole step: lopt bench beside lopt plan -----------------------------------------------------------------
def whole_step_table(bench: dict, plan: dict | None) -> tuple[list[dict], str]:
    """One row per configuration: lopt bench's parts and step peak, lopt plan's floor at bench's states and its own
    total, and the ratios; and the markdown table."""
    planned = {row["method"]: row for row in (plan or {}).get("rows", [])}
    rows = []
    for row in bench["rows"]:
        parts = row.get("whole_step") or {}
        out = {
            "config": row["name"],
            "label": row["label"] + (" + GC" if row["gc"] else ""),
            **{
                key: parts.get(key)
                for key in ("weights", "gradients", "optimizer", "activations", "step_peak")
            },
            "allocator_step_peak": row.get("peak_mem_bytes"),
            "median_step_s": row.get("median_step_s"),
        }
        p = planned.get(row["name"])
        if p is not None and parts.get("step_peak") is not None:
            step = p["step"]["single"]
            out["plan_grads"], out["plan_act"], out["plan_moment"] = (
                step["grads"],
                step["act"],
                step["moment"],
            )
            out["plan_at_bench_states"] = parts["weights"] + parts["optimizer"] + step["grads"] + step["act"]
            out["plan_total"] = step["peak"]
            out["peak_over_plan"] = parts["step_peak"] / out["plan_at_bench_states"]
        rows.append(out)
    by_name = {r["config"]: r for r in rows}
    for r in rows:
        gc = "+gc" if r["config"].endswith("+gc") else ""
        for key, ref in (("x_e2e", f"e2e{gc}"), ("x_e2e_oib", f"e2e+oib{gc}")):
            base = by_name.get(ref)
            ok = base and base.get("step_peak") and r.get("step_peak") is not None
            r[key] = r["step_peak"] / base["step_peak"] if ok else None
        base = by_name.get(f"e2e{gc}")
        ok = base and base.get("plan_total") and r.get("plan_total")
        r["plan_x_e2e"] = r["plan_total"] / base["plan_total"] if ok else None

    def ratio(value):
        return "-" if value is None else f"{value:.2f}"

    header = [
        "config",
        "weights MB",
        "grads MB",
        "AdamW MB",
        "act. MB",
        "step peak MB",
        "x E2E",
        "x E2E oib",
        "plan at bench's states MB",
        "peak / plan",
        "plan (16 B/param) GB",
        "plan x E2E",
        "plan's worst moment",
        "step s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["label"],
            *(
                f"{r[k] / MB:,.0f}" if r.get(k) is not None else "-"
                for k in ("weights", "gradients", "optimizer", "activations", "step_peak")
            ),
            ratio(r["x_e2e"]),
            ratio(r["x_e2e_oib"]),
            f"{r['plan_at_bench_states'] / MB:,.0f}" if r.get("plan_at_bench_states") else "-",
            ratio(r.get("peak_over_plan")),
            f"{r['plan_total'] / 2**30:.2f}" if r.get("plan_total") else "-",
            ratio(r.get("plan_x_e2e")),
            r.get("plan_moment", "-"),
            f"{r['median_step_s']:.3f}" if r.get("median_step_s") else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def whole_step(steps: Steps, work: str, model: str, spec: dict, device: str, dry_run: bool) -> dict:
    """lopt bench (GPU) and lopt plan (CPU) at the same shape, side by side; at micro-batch 8, else 4 on OOM."""
    result: dict = {"rows": [], "table": "", "batch_size": None, "status": "SKIPPED", "detail": ""}
    for batch in (WHOLE_STEP_BATCH, WHOLE_STEP_FALLBACK_BATCH):
        if dry_run:
            batch = 2
        bench_json = os.path.join(steps.logs, f"whole-step-bench-b{batch}.json")
        plan_json = os.path.join(steps.logs, f"whole-step-plan-b{batch}.json")
        # the same shape for the planner and the measurement
        shape = [
            "--model",
            model,
            "--seq_len",
            str(spec["seq_len"]),
            "--batch_size",
            str(batch),
            "--dtype",
            spec["dtype"],
        ]
        plan_cmd = [
            sys.executable,
            "-m",
            "lopt",
            "plan",
            *shape,
            "--methods",
            *WHOLE_STEP_CONFIGS,
            "--markdown",
            "--json",
            plan_json,
        ]
        bench_cmd = [
            sys.executable,
            "-m",
            "lopt",
            "bench",
            *shape,
            "--device",
            device,
            "--steps",
            "1",
            "--warmup",
            "1",
            "--configs",
            *WHOLE_STEP_CONFIGS,
            "--markdown",
            "--json",
            bench_json,
        ]
        if dry_run:
            bench_cmd += ["--threads", "1"]
        # the plan runs on the CPU while the bench runs on the GPU
        plan_limit = steps.budget.limit(240)
        plan_proc = steps.start(f"whole-step-plan-b{batch}", plan_cmd) if plan_limit else None
        status, text, seconds = steps.run(f"whole-step-bench-b{batch}", bench_cmd, 240)
        plan = None
        if plan_proc is not None:
            p_status, p_text, _ = steps.wait(f"whole-step-plan-b{batch}", *plan_proc, plan_limit)
            if p_status == "OK" and os.path.isfile(plan_json):
                with open(plan_json) as f:
                    plan = json.load(f)
            else:
                result["plan_error"] = p_text
        result.update(status=status, batch_size=batch, seconds=seconds)
        if status == "OK":
            with open(bench_json) as f:
                bench = json.load(f)
            result["rows"], result["table"] = whole_step_table(bench, plan)
            peaks = [r["peak_over_plan"] for r in result["rows"] if r.get("peak_over_plan")]
            result["detail"] = f"micro-batch {batch} x seq {spec['seq_len']}, {len(result['rows'])} configs"
            if peaks:
                result["detail"] += f", step peak / plan {min(peaks):.2f}-{max(peaks):.2f}"
            if plan is None:
                result["detail"] += f"; no plan ({result.get('plan_error', 'not run')})"
            return result
        result["detail"] = text
        if dry_run or "out of memory" not in text.lower() or batch == WHOLE_STEP_FALLBACK_BATCH:
            return result
    return result


def tiny_config(path: str) -> str:
    """A Qwen2 config.json at --dry-run's tiny size (tied, as Qwen2.5-0.5B), for lopt bench and lopt plan."""
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": TINY["hidden_size"],
        "intermediate_size": TINY["intermediate_size"],
        "num_hidden_layers": TINY["num_layers"],
        "num_attention_heads": TINY["num_heads"],
        "num_key_value_heads": TINY["num_kv_heads"],
        "vocab_size": TINY["vocab_size"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_cache": False,
    }
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path


# --- the report ---------------------------------------------------------------------------------------------------
def report(header: list[str], rows: list[list[str]], whole: dict | None) -> str:
    lines = [*header, "", "| step | status | result | memory | speed | wall |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    if whole and whole.get("table"):
        lines += [
            "",
            f"Whole step, Qwen2.5-0.5B shape, micro-batch {whole['batch_size']}, lopt bench (measured) beside lopt "
            "plan (floor):",
            "",
            whole["table"],
            "",
            "- step peak = weights + AdamW states + the allocator's peak during a step above what was allocated "
            "before it; x E2E / x E2E oib: against E2E / E2E with the optimizer in the backward, same GC setting.",
            "- plan at bench's states = the measured weights and AdamW states (bf16 weights, bf16 AdamW m, v) + lopt "
            "plan's gradients and activations at its worst moment; peak / plan: the step peak over it. plan (16 "
            "B/param): lopt plan's own total (fp32 master weights and AdamW states).",
        ]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, header: list[str], rows: list[list[str]], whole: dict | None) -> str:
    text = report(header, rows, whole)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump({"header": header, "rows": rows, "whole_step": whole}, f, indent=1, default=str)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on CPU: check the script, measure nothing"
    )
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or os.path.join("runs", "gpu-check"),
        help="folder for gpu_check.md, gpu_check.json and logs.tar.gz (default: $OUT if set, else runs/gpu-check)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="the whole run's time budget in seconds (default: 480; 1800 with --dry-run, slow on a CPU)",
    )
    p.add_argument("--keep", action="store_true", help="keep the training run folders (printed at the end)")
    p.add_argument("--bench-one", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.bench_one:
        print(json.dumps(bench_one(a.bench_one, json.loads(a.spec), a.device)))
        return 0

    import torch

    gpus = torch.cuda.device_count()
    if not a.dry_run and gpus == 0:
        print("gpu_check: no CUDA device here; run it on a CUDA machine, or use --dry-run.", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    started = time.perf_counter()
    if a.budget_s is None:
        a.budget_s = 1800.0 if a.dry_run else 480.0
    budget = Budget(a.budget_s)
    device = "cpu" if a.dry_run else "cuda"
    spec = TINY if a.dry_run else QWEN_05B
    os.makedirs(a.out, exist_ok=True)
    logs = os.path.join(a.out, "logs")
    work = tempfile.mkdtemp(prefix="lopt-gpu-check-")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if a.dry_run:
        env.update(LOPT_BUILTIN_PRESET="tiny", OMP_NUM_THREADS="1")
    else:
        env.setdefault("LOPT_BUILTIN_DEVICE", "cuda")  # pretrain the built-in base on the GPU: faster here
    steps = Steps(logs, env, budget)
    name = "CPU (dry run: tiny sizes, numbers mean nothing)" if a.dry_run else torch.cuda.get_device_name(0)
    header = [
        f"gpu_check on {name}{f' x {gpus}' if not a.dry_run else ''}, torch {torch.__version__}, "
        f"budget {a.budget_s:.0f} s",
        "bench shape: " + ", ".join(f"{k} {v}" for k, v in spec.items()) + ", fused LM head",
    ]
    rows: list[list[str]] = []
    whole: dict | None = None

    def save() -> None:  # after every step: a run killed from outside still leaves its report so far
        write_report(a.out, header, rows, whole)

    # 1) the whole step at micro-batch 8 (the targets), beside lopt plan
    model = tiny_config(os.path.join(work, "config.json")) if a.dry_run else "qwen2.5-0.5b"
    whole = whole_step(steps, work, model, spec, device, a.dry_run)
    rows.append(
        [
            "whole step (lopt bench + lopt plan)",
            whole["status"],
            whole["detail"],
            "",
            "",
            f"{whole.get('seconds', 0):.0f} s",
        ]
    )
    save()

    # 2) the built-in model, then training through the CLI in bf16
    build = [
        sys.executable,
        "-c",
        "from lopt.builtin.base import builtin_model_path; print(builtin_model_path())",
    ]
    status, text, seconds = steps.run("build-builtin", build, 300)
    rows.append(["build built-in model", status, "" if status == "OK" else text, "", "", f"{seconds:.0f} s"])
    save()

    sft_steps, oib_steps, rl_steps = (2, 2, 1) if a.dry_run else (30, 10, 5)
    precision = [] if a.dry_run else ["--bf16"]
    common = [
        "--max_samples",
        "512",
        "--eval_samples",
        "50",
        "--logging_steps",
        "5",
        "--no_progress",
        *precision,
    ]
    if a.dry_run:
        common = ["--max_samples", "32", "--eval_samples", "4", "--logging_steps", "1", "--no_progress"]
    lopt = [sys.executable, "-m", "lopt"]

    sft_out = os.path.join(work, "sft")
    cmd = [*lopt, "sft", "--max_steps", str(sft_steps), *common, "--output_dir", sft_out]
    rows.append(
        training_row(f"sft {sft_steps} steps{' bf16' if precision else ''}", steps, "sft", cmd, sft_out, 180)
    )
    save()
    sft_ok = rows[-1][1] == "OK"

    out = os.path.join(work, "sft-oib")
    cmd = [
        *lopt,
        "sft",
        "--max_steps",
        str(oib_steps),
        "--optimizer_in_backward",
        "--gradient_accumulation_steps",
        "1",
        *common,
        "--output_dir",
        out,
    ]
    rows.append(
        training_row(f"sft {oib_steps} steps, --optimizer_in_backward", steps, "sft-oib", cmd, out, 150)
    )
    save()

    start_model = (
        ["--model_name_or_path", sft_out] if sft_ok else []
    )  # else the built-in SFT checkpoint, made first
    out = os.path.join(work, "grpo")
    cmd = [*lopt, "grpo", *start_model, "--max_steps", str(rl_steps), *common, "--output_dir", out]
    if a.dry_run:
        cmd += [
            "--per_device_train_batch_size",
            "4",
            "--num_generations",
            "2",
            "--max_completion_length",
            "6",
        ]
    rows.append(
        training_row(f"grpo {rl_steps} steps{' bf16' if precision else ''}", steps, "grpo", cmd, out, 180)
    )
    save()

    out = os.path.join(work, "dpo")
    cmd = [*lopt, "dpo", *start_model, "--max_steps", str(rl_steps), *common, "--output_dir", out]
    if a.dry_run:
        cmd += ["--per_device_train_batch_size", "2"]
    rows.append(
        training_row(f"dpo {rl_steps} steps{' bf16' if precision else ''}", steps, "dpo", cmd, out, 150)
    )
    save()

    # 3) the earlier activation check at batch 1 (docs/GPU.md), one fresh process per configuration
    for config in BENCH_CONFIGS:
        cmd = [
            sys.executable,
            __file__,
            "--bench-one",
            config,
            "--spec",
            json.dumps(spec),
            "--device",
            device,
        ]
        tag = "bench-b1-" + config.replace(" ", "").replace("=", "")
        status, text, seconds = steps.run(tag, cmd, 120)
        if status != "OK":
            rows.append([f"bench batch 1, {config}", status, text, "", "", f"{seconds:.0f} s"])
            save()
            continue
        r = json.loads(text.strip().splitlines()[-1])
        rows.append(
            [
                f"bench batch 1, {config}",
                "OK",
                f"saved for backward {mb(r['saved_peak'])}",
                f"step peak {mb(r.get('cuda_step_peak'))}, max allocated {mb(r.get('cuda_peak'))}",
                f"{r['step_s'] * 1000:,.0f} ms/step",
                f"{seconds:.0f} s",
            ]
        )
        save()

    # 4) several GPUs
    if gpus >= 2 or a.dry_run:
        for label, extra in (("DDP", []), ("--fsdp", ["--fsdp"]), ("--block_parallel", ["--block_parallel"])):
            tag = f"sft-2proc-{label.strip('-')}"
            out = os.path.join(work, tag)
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
            cmd = [
                *torchrun,
                "-m",
                "lopt",
                "sft",
                *extra,
                "--max_steps",
                str(sft_steps),
                *common,
                "--output_dir",
                out,
            ]
            rows.append(training_row(f"sft 2 processes, {label}", steps, tag, cmd, out, 180))
            save()

    header.append(f"total {time.perf_counter() - started:.0f} s")
    text = write_report(a.out, header, rows, whole)
    print(text)
    # the logs in one file (a machine that returns few files returns it)
    with tarfile.open(os.path.join(a.out, "logs.tar.gz"), "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.rmtree(logs, ignore_errors=True)
    print(f"report: {os.path.join(a.out, 'gpu_check.md')}; logs: {os.path.join(a.out, 'logs.tar.gz')}")
    if a.keep:
        print(f"run folders: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(row[1] == "OK" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
