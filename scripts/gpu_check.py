"""One prepared check for a CUDA machine: every step in its own process, one markdown table at the end.

    bash scripts/gpu_check.sh              # on a CUDA machine (aimed at < 10 minutes on one recent GPU)
    bash scripts/gpu_check.sh --dry-run    # the same steps at a tiny size on CPU: checks the script, measures nothing

Rows:
  bench E2E / LoPT k=2 / LoPT k=4   a Qwen2.5-0.5B-shaped model (24 layers, hidden 896, intermediate 4864, 14 heads,
        2 KV heads, vocab 151,936, random weights), bf16, seq 2048, batch 1, loss through TRL's fused LM head
        (trl.trainer.utils.add_fused_lm_head), AdamW: one training step after a warm-up step, each configuration in a
        fresh process. Columns: peak bytes saved for backward (lopt.experiments.meter.SavedTensorMeter), the allocator's peak
        during that step above what was allocated before it (torch.cuda.max_memory_allocated - memory_allocated:
        activations + gradients + optimizer temporaries), the allocator's absolute peak, and the step time.
  build built-in model   the built-in pretrained model (built once, cached; later steps reuse it)
  sft 30 steps           `lopt sft --bf16 --max_steps 30` (built-in model and task, LoPT k=2)
  grpo 5 steps           `lopt grpo --bf16 --max_steps 5`
  with 2+ GPUs (nccl):   `torchrun --nproc_per_node 2 -m lopt sft` data-parallel (DDP), with --fsdp, and with
                         --block_parallel, 30 steps each
A step that fails or runs past its time limit becomes a FAILED row with its last error line; the table still prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
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


# --- one bench configuration (runs in its own process) ----------------------------------------------------------
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
        tie_word_embeddings=True,  # as Qwen2.5-0.5B; LoPT unties them (the LM head gets its own copy)
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


# --- the steps ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict, timeout: int) -> tuple[bool, str, float]:
    """(ok, last error line or stdout, seconds)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        return False, (errors or lines or [f"exit {proc.returncode}"])[-1][:200], seconds
    return True, proc.stdout, seconds


def mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.0f} MB"


def training_row(name: str, cmd: list[str], out: str, env: dict, timeout: int) -> list[str]:
    ok, text, seconds = run(cmd, env, timeout)
    if not ok:
        return [name, "FAILED", text, "", "", f"{seconds:.0f} s"]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    metrics = []
    if os.path.isfile(os.path.join(out, "metrics.jsonl")):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    peak = max((m["peak_memory_bytes"] for m in metrics if m.get("peak_memory_bytes")), default=None)
    speeds = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    detail = f"steps {summary.get('steps')}, train_loss {summary.get('train_loss', float('nan')):.3f}"
    if "heldout_exact_match" in summary:
        detail += f", held-out exact match {summary['heldout_exact_match']:.3f}"
    speed = f"{sorted(speeds)[len(speeds) // 2]:,.0f} tokens/s" if speeds else ""
    memory = f"peak {mb(peak)} (rank 0)" if peak else ""
    return [name, "OK", detail, memory, speed, f"{seconds:.0f} s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on CPU: check the script, measure nothing"
    )
    p.add_argument("--keep", action="store_true", help="keep the run folders (printed at the end)")
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
    device = "cpu" if a.dry_run else "cuda"
    spec = TINY if a.dry_run else QWEN_05B
    work = tempfile.mkdtemp(prefix="lopt-gpu-check-")
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "LOPT_CACHE_DIR": os.environ.get("LOPT_CACHE_DIR", ""),
    }
    if not env["LOPT_CACHE_DIR"]:
        env.pop("LOPT_CACHE_DIR")
    if a.dry_run:
        env.update(LOPT_BUILTIN_PRESET="tiny", OMP_NUM_THREADS="1")
    steps = 2 if a.dry_run else 30
    rl_steps = 1 if a.dry_run else 5
    precision = [] if a.dry_run else ["--bf16"]
    rows: list[list[str]] = []
    started = time.perf_counter()

    for name in BENCH_CONFIGS:
        cmd = [sys.executable, __file__, "--bench-one", name, "--spec", json.dumps(spec), "--device", device]
        ok, text, seconds = run(cmd, env, timeout=300)
        if not ok:
            rows.append([f"bench {name}", "FAILED", text, "", "", f"{seconds:.0f} s"])
            continue
        r = json.loads(text.strip().splitlines()[-1])
        rows.append(
            [
                f"bench {name}",
                "OK",
                f"saved for backward {mb(r['saved_peak'])}",
                f"step peak {mb(r.get('cuda_step_peak'))}, max allocated {mb(r.get('cuda_peak'))}",
                f"{r['step_s'] * 1000:,.0f} ms/step",
                f"{seconds:.0f} s",
            ]
        )

    build = [
        sys.executable,
        "-c",
        "from lopt.builtin.base import builtin_model_path; print(builtin_model_path())",
    ]
    ok, text, seconds = run(build, env, timeout=600)
    rows.append(
        ["build built-in model", "OK" if ok else "FAILED", "" if ok else text, "", "", f"{seconds:.0f} s"]
    )

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
    out = os.path.join(work, "sft")
    cmd = [sys.executable, "-m", "lopt", "sft", "--max_steps", str(steps), *common, "--output_dir", out]
    rows.append(training_row(f"sft {steps} steps", cmd, out, env, timeout=300))
    out = os.path.join(work, "grpo")
    cmd = [sys.executable, "-m", "lopt", "grpo", "--max_steps", str(rl_steps), *common, "--output_dir", out]
    if a.dry_run:
        cmd += [
            "--per_device_train_batch_size",
            "4",
            "--num_generations",
            "2",
            "--max_completion_length",
            "6",
        ]
    rows.append(training_row(f"grpo {rl_steps} steps", cmd, out, env, timeout=300))

    if gpus >= 2 or a.dry_run:
        for label, extra in (("DDP", []), ("--fsdp", ["--fsdp"]), ("--block_parallel", ["--block_parallel"])):
            out = os.path.join(work, f"sft-2proc-{label.strip('-')}")
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
            cmd = [
                *torchrun,
                "-m",
                "lopt",
                "sft",
                *extra,
                "--max_steps",
                str(steps),
                *common,
                "--output_dir",
                out,
            ]
            rows.append(training_row(f"sft 2 processes, {label}", cmd, out, env, timeout=300))

    name = "CPU (dry run: tiny sizes, numbers mean nothing)" if a.dry_run else torch.cuda.get_device_name(0)
    shape = ", ".join(f"{k} {v}" for k, v in spec.items())
    print(f"gpu_check on {name}{f' x {gpus}' if not a.dry_run else ''}, torch {torch.__version__}")
    print(f"bench shape: {shape}, batch 1, fused LM head; total {time.perf_counter() - started:.0f} s")
    print("| step | status | result | memory | speed | wall |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    if a.keep:
        print(f"run folders: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(row[1] == "OK" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
