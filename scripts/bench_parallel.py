"""Tokens/s of block-parallel LoPT against single-process LoPT and E2E, same model, batches and steps; with --fsdp,
activation memory and time of LoPT against E2E, both under FSDP2.

    python scripts/bench_parallel.py                    # the table (three configurations, one after another)
    python scripts/bench_parallel.py --layers 16 --hidden 256 --seq_len 512 --batch_size 8 --steps 20
    python scripts/bench_parallel.py --fsdp --layers 16 --seq_len 512 --batch_size 4 --steps 2

Configurations (CPU):
  block-parallel LoPT k=2   torchrun, 2 processes x 1 thread, one block each (lopt.training.block_stage.BlockStage)
  LoPT k=2 (one process)    2 threads, local backward (lopt.get_lopt_model)
  E2E (one process)         2 threads, plain forward/backward
Every configuration trains the same Llama-shaped model (random weights, seed 0) on the same random batches with
AdamW. Tokens/s counts the steps after --warmup; for block-parallel it is measured on the last rank, whose step
ends last (the pipeline's throughput). Each configuration runs in a fresh process.

--fsdp (CPU, gloo, 2 processes x 1 thread, one launch): E2E, LoPT k=2 and LoPT k=4 (local backward), each with
`fully_shard` on every decoder layer and on the model (lopt.engine.distributed.fully_shard_lopt_model for LoPT), each rank
training on its own batch of --batch_size rows. Per configuration: the peak bytes saved for backward during one
training step (lopt.experiments.meter.SavedTensorMeter; parameters, gathered or not, are not counted), the largest over the
timed steps and over the ranks, and the median step time of rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def build_model(a):
    """The same random Llama-shaped model as `lopt bench` (seed 0), in train mode."""
    from lopt.experiments.bench import BenchSpec, build_base_model

    spec = BenchSpec(
        num_layers=a.layers,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_heads=a.heads,
        vocab_size=a.vocab_size,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        device="cpu",
    )
    return build_base_model(spec).train()


def batches(a, seed_offset: int = 0):
    import torch

    for i in range(a.warmup + a.steps):
        gen = torch.Generator().manual_seed(1000 + seed_offset + i)
        ids = torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tokens_per_s(step_ends: list[float], a) -> float:
    """Throughput over the timed steps: from the end of the last warmup step to the end of the last step."""
    return a.batch_size * a.seq_len * a.steps / (step_ends[-1] - step_ends[a.warmup - 1])


def run_single(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    model = build_model(a)
    if a.mode == "lopt":
        from lopt import LoPTConfig, get_lopt_model, param_groups

        lopt_model = get_lopt_model(model, LoPTConfig(num_blocks=2))
        trained, params = lopt_model, param_groups(lopt_model, lr=1e-4)
    else:
        trained, params = model, model.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ends = []
    for batch in batches(a):
        trained(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return {"tokens_per_s": tokens_per_s(ends, a)}


def run_block(a) -> dict | None:
    import torch
    import torch.distributed as dist

    from lopt import LoPTConfig
    from lopt.engine.distributed import finish
    from lopt.training.block_stage import BlockStage

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    a.warmup = max(a.warmup, 1)
    total = a.warmup + a.steps
    stage = BlockStage(build_model(a), LoPTConfig(num_blocks=2), learning_rate=1e-4, num_steps=total)
    ends = []
    stage.train(batches(a), on_step=lambda step, loss: ends.append(time.perf_counter()))
    result = {"tokens_per_s": tokens_per_s(ends, a)} if stage.last else None
    finish()
    return result


def run_fsdp(a) -> dict | None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lopt import LoPTConfig, get_lopt_model, param_groups
    from lopt.engine.distributed import LoPTGradientSync, clip_grad_norm_, finish, fully_shard_lopt_model
    from lopt.experiments.meter import SavedTensorMeter

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = {}
    for name, k in (("E2E", None), ("LoPT k=2", 2), ("LoPT k=4", 4)):
        model = build_model(a)
        if k is None:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            trained, aux, sync = model, [], None
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            lopt_model = get_lopt_model(model, LoPTConfig(num_blocks=k))
            sync = LoPTGradientSync(lopt_model, sync_early=False)
            fully_shard_lopt_model(lopt_model)
            trained, aux = lopt_model.model, list(lopt_model.aux_heads.parameters())
            optimizer = torch.optim.AdamW(param_groups(lopt_model, lr=1e-4))
        peaks, times = [], []
        for i, batch in enumerate(batches(a, seed_offset=10_000 * rank)):
            start = time.perf_counter()
            with SavedTensorMeter() as meter:
                loss = trained(**batch).loss
                loss.backward()
            if sync is not None:
                sync.sync_gradients()
            clip_grad_norm_(trained.parameters(), aux, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= a.warmup:
                peaks.append(meter.peak)
                times.append(time.perf_counter() - start)
        peak = torch.tensor([max(peaks)], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rows[name] = {"saved_peak": int(peak.item()), "step_s": sorted(times)[len(times) // 2]}
    finish()
    return rows if rank == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, argv: list[str], threads: int) -> dict:
    """Run one configuration in fresh process(es); its result is the last JSON line on stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    script = os.path.abspath(__file__)
    if mode in ("block", "fsdp"):
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={free_port()}", script, *argv, "--mode", mode]
    else:
        cmd = [sys.executable, script, "--mode", mode, "--threads", str(threads), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads of the single-process runs")
    p.add_argument("--fsdp", action="store_true", help="the FSDP2 activation-memory table instead")
    p.add_argument(
        "--mode", choices=["table", "block", "lopt", "e2e", "fsdp"], default="table", help=argparse.SUPPRESS
    )
    a = p.parse_args()
    if a.mode in ("block", "fsdp"):
        result = run_block(a) if a.mode == "block" else run_fsdp(a)
        if result is not None:
            print(json.dumps(result), flush=True)
        os._exit(0)  # no interpreter teardown of the process group (see lopt.engine.distributed.finish)
    if a.mode in ("lopt", "e2e"):
        print(json.dumps(run_single(a)))
        return
    a.warmup = max(a.warmup, 1)
    argv = [arg for arg in sys.argv[1:] if arg != "--fsdp"]
    if a.fsdp:
        print_fsdp_table(a, launch("fsdp", argv, 1))
        return
    rows = [
        ("block-parallel LoPT k=2", "2 processes x 1 thread", launch("block", argv, 1)),
        ("LoPT k=2 (one process)", f"{a.threads} threads", launch("lopt", argv, a.threads)),
        ("E2E (one process)", f"{a.threads} threads", launch("e2e", argv, a.threads)),
    ]
    e2e = rows[-1][2]["tokens_per_s"]
    print(
        f"model: Llama-shaped, {a.layers} layers, hidden {a.hidden}, vocab {a.vocab_size}; batch {a.batch_size} x "
        f"seq {a.seq_len}; {a.steps} timed steps after {a.warmup} warmup; fp32 CPU"
    )
    print("| configuration | CPU | tokens/s | x E2E |")
    print("|---|---|---|---|")
    for name, cpu, result in rows:
        print(f"| {name} | {cpu} | {result['tokens_per_s']:.1f} | {result['tokens_per_s'] / e2e:.2f} |")


def print_fsdp_table(a, rows: dict) -> None:
    print(
        f"model: Llama-shaped, {a.layers} layers, hidden {a.hidden}, vocab {a.vocab_size}; per rank: batch "
        f"{a.batch_size} x seq {a.seq_len}; FSDP2 (fully_shard per decoder layer + root), gloo, 2 processes x 1 "
        f"thread; {a.steps} timed steps after {a.warmup} warmup; fp32 CPU"
    )
    e2e = rows["E2E"]
    print("| configuration (FSDP2) | saved for backward, peak | x E2E | step time (s) | x E2E |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['saved_peak'] / 2**20:.0f} MB | {row['saved_peak'] / e2e['saved_peak']:.2f} | "
            f"{row['step_s']:.2f} | {row['step_s'] / e2e['step_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
