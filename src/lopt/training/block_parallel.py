"""Block-parallel LoPT: one block per process, activations flow forward only.

With k blocks and k processes (`torchrun --nproc_per_node k -m lopt sft --block_parallel --num_blocks k`), rank r
holds block r's decoder layers; rank 0 also holds the embedding (and any other weight outside the layers, the
final norm and the LM head), the last rank the final norm and the LM head. For every micro-batch:

    rank 0        embed -> block 0 -> isend(h_1.detach()) -> backward(lambda/(k-1) * aux_0)
    rank r        recv h_r -> block r -> isend(h_{r+1}.detach()) -> backward(lambda/(k-1) * aux_r)
    rank k-1      recv h_{k-1} -> block k-1 -> final norm -> LM head -> backward(task loss)

and every rank steps its own AdamW after each accumulated batch. No gradient ever crosses a boundary, so no rank
waits for a later one: once rank 0 has sent micro-batch m it starts m+1, and after k-1 micro-batches every rank
computes at once. Each rank derives the same batches itself (same data, seed and order); only hidden states travel.

Because LoPT detaches every boundary, this computes exactly what single-process LoPT (local backward) computes
(tested), with one difference: gradient clipping (--max_grad_norm) uses each block's own gradient norm.

One rank's stage (its block, the pass-throughs that stand in for the other layers, the sends and the final
assembly) is lopt.training.block_stage.BlockStage; this module checks the launch, runs it and saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from lopt.engine.config import LoPTConfig
from lopt.engine.distributed import finish
from lopt.io import atomic_write_json
from lopt.training.arguments import DataArguments, LoPTArguments
from lopt.training.block_stage import BlockStage
from lopt.training.launch import LaunchRequired


# ------------------------------------------------------------------------------------------------------------------
# `lopt sft --block_parallel`
# ------------------------------------------------------------------------------------------------------------------
def check_launch(lopt_args: LoPTArguments, training_args) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a ValueError (one line, exit 2) if the flags or
    the launch do not fit block-parallel training; `LaunchRequired` when started as one process (the CLI then starts
    one process per block itself)."""
    k = lopt_args.num_blocks
    if lopt_args.method not in ("lopt", "ll"):
        raise ValueError(
            f"--block_parallel trains LoPT blocks (--method lopt), not --method {lopt_args.method}."
        )
    unsupported = {
        "--resume_from_checkpoint": training_args.resume_from_checkpoint,
        "--save_strategy steps/epoch": training_args.save_strategy != "no",
        "--eval_strategy steps/epoch": training_args.eval_strategy != "no",
        "--fp16 (use --bf16)": training_args.fp16,
        f"--aux_objective {lopt_args.aux_objective} (only recon)": lopt_args.aux_objective != "recon",
        "--boundaries": lopt_args.boundaries,
        "--aux_warmup_steps": lopt_args.aux_warmup_steps,
    }
    for flag, value in unsupported.items():
        if value:
            raise ValueError(f"--block_parallel does not support {flag} yet (see docs/DISTRIBUTED.md).")
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise LaunchRequired(k)  # one process per block: the CLI starts them (launch_local)
    world = int(os.environ["WORLD_SIZE"])
    if world != k:
        raise ValueError(
            f"--block_parallel needs one process per block: --num_blocks {k} but {world} processes "
            f"(use torchrun --nproc_per_node {k}, or --num_blocks {world})."
        )
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0))


def _cycle(loader) -> Iterator[dict]:
    """Micro-batches epoch after epoch (the loader reshuffles from its own generator: the same on every rank)."""
    while True:
        yield from loader


def run_block_parallel(
    rows: list[dict],
    lopt_args: LoPTArguments,
    model_args,
    data_args: DataArguments,
    training_args,
    early_lr: float | None,
    task: str | None,
) -> int:
    """`lopt sft --block_parallel` on one rank: same data, flags and outputs as `lopt sft` (its checks done)."""
    rank, world, local_rank = check_launch(lopt_args, training_args)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():  # building TrainingArguments under torchrun may have started it
        dist.init_process_group(backend)
    code = _run(rows, lopt_args, model_args, data_args, training_args, early_lr, task, rank, world, device)
    finish()  # every rank waits for rank 0's checkpoint and evaluation
    dist.destroy_process_group()
    return code


def _run(rows, lopt_args, model_args, data_args, args, early_lr, task, rank: int, world: int, device) -> int:
    """`args`: the run's SFTConfig."""
    from torch.utils.data import DataLoader
    from transformers import set_seed

    from lopt.data.loading import load_model_and_tokenizer
    from lopt.data.rows import make_collator, tokenize_rows
    from lopt.evaluation.evaluate import builtin_task_score, summary_line, summary_record
    from lopt.integrations.callbacks import peak_memory_bytes

    set_seed(args.seed)
    quiet = bool(args.disable_tqdm)
    model, tokenizer, model_path = load_model_and_tokenizer(
        model_args.model_name_or_path,
        args.trust_remote_code,
        progress=not quiet and rank == 0,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        # transformers >= 5.2x kernelizes the model on every train()/eval() switch when `kernels` is installed, and
        # refuses a model whose first parameter sits on the meta device, as the blocks owned by other ranks do here.
        use_kernels=False,
    )
    dataset = tokenize_rows(rows, tokenizer, args.max_length)
    loader = DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),  # the same order on every rank
        collate_fn=make_collator(tokenizer),
    )
    steps = args.max_steps
    if steps is None or steps <= 0:
        steps = max(1, math.ceil(args.num_train_epochs * len(loader) / args.gradient_accumulation_steps))
    if args.activation_checkpointing:  # before BlockStage swaps layers out: the kept ones keep the setting
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if lopt_args.checkpoint_layers is not None:
            from lopt.engine.checkpointing import enable_selective_checkpointing

            enable_selective_checkpointing(model, lopt_args.checkpoint_layers)
    config = lopt_args.lopt_config()
    warmup = args.warmup_steps if args.warmup_steps >= 1 else math.ceil(args.warmup_steps * steps)
    stage = BlockStage(
        model,
        config,
        learning_rate=args.learning_rate,
        early_learning_rate=early_lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        num_steps=steps,
        warmup_steps=int(warmup),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
        device=device,
        bf16=args.bf16,
    )
    start, end = stage.block_ranges[rank]
    logging_steps = max(1, int(args.logging_steps))
    if rank == 0:
        print(
            f"lopt sft: block-parallel LoPT, k={world} processes, blocks={stage.block_ranges}, lambda="
            f"{lopt_args.lambda_aux}, lr={args.learning_rate}, lr_k1={early_lr or args.learning_rate}, model="
            f"{model_path}, rows={len(dataset)}, batch={args.per_device_train_batch_size}x"
            f"{args.gradient_accumulation_steps}, steps={steps}, output_dir={args.output_dir}",
            file=sys.stderr,
        )

    def report(step: int, loss: float) -> None:  # the last rank holds the task loss
        if stage.last and not quiet and (step % logging_steps == 0 or step == steps):
            print(
                f"lopt sft [block {rank}, layers {start}-{end - 1}]: step {step}/{steps} task_loss {loss:.4f}",
                file=sys.stderr,
            )

    result = stage.train(_cycle(loader), on_step=report)
    per_rank_losses = stage.gather_on_rank0(result["losses"])
    per_rank_stats = stage.gather_on_rank0([result["seconds"], float(peak_memory_bytes())])
    trained = stage.assemble_on_rank0()
    if rank != 0:
        return 0

    seconds = max(s[0] for s in per_rank_stats)
    tokens_per_s = result["tokens"] / seconds
    _write_metrics(
        args.output_dir, per_rank_losses, per_rank_stats, tokens_per_s, logging_steps, lopt_args.lambda_aux
    )
    run_args = {
        **dataclasses.asdict(lopt_args),
        **dataclasses.asdict(data_args),
        **dataclasses.asdict(model_args),
    }
    _save(trained, tokenizer, config, args, early_lr, run_args)
    summary = {
        "method": "lopt",
        "block_parallel": world,
        "train_loss": sum(per_rank_losses[-1]) / len(per_rank_losses[-1]),
        "steps": steps,
        "tokens_per_s": round(tokens_per_s, 2),
    }
    if task is not None and data_args.eval_samples > 0:
        from transformers import AutoModelForCausalLM

        # the checkpoint as users load it
        saved = AutoModelForCausalLM.from_pretrained(args.output_dir).to(device)
        summary["heldout_exact_match"] = builtin_task_score(
            saved, tokenizer, data_args.eval_samples, task, progress=not quiet
        )
    atomic_write_json(os.path.join(args.output_dir, "summary.json"), summary_record(summary))
    print(
        f"lopt sft: saved a Hugging Face checkpoint to {args.output_dir} (every metric in its summary.json)",
        file=sys.stderr,
    )
    print(f"lopt sft: {summary_line(summary)}", file=sys.stderr)
    return 0


def _write_metrics(
    output_dir, per_rank_losses, per_rank_stats, tokens_per_s: float, every: int, aux_weight: float
) -> None:
    """metrics.jsonl like `lopt sft`: per logged step the task loss (last rank) and each boundary's aux loss."""
    from lopt.io import atomic_write_text

    lines = []
    steps = len(per_rank_losses[0])
    for step in range(1, steps + 1):
        if step % every and step != steps:
            continue
        record = {"step": step, "task_loss": per_rank_losses[-1][step - 1]}
        aux = [losses[step - 1] for losses in per_rank_losses[:-1]]
        record.update({f"aux_loss_{i}": value for i, value in enumerate(aux)})
        # the LoPT objective, as in sft
        record["loss"] = record["task_loss"] + aux_weight * sum(aux) / len(aux)
        record["tokens_per_s"] = round(tokens_per_s, 2)
        record["peak_memory_bytes_per_rank"] = [int(s[1]) for s in per_rank_stats]
        lines.append(json.dumps(record))
    atomic_write_text(os.path.join(output_dir, "metrics.jsonl"), "\n".join(lines) + "\n")


def _save(model: nn.Module, tokenizer, config: LoPTConfig, args, early_lr, run_args: dict) -> None:
    """The same layout as `lopt sft`: HF checkpoint, tokenizer, lopt_config.json, training and CLI arguments."""
    from lopt.io import atomic_directory_write, save_checkpoint_files

    training = {
        "block_parallel": config.num_blocks,
        "lr_k1": early_lr,
        **{
            k: getattr(args, k)
            for k in (
                "learning_rate",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "max_steps",
                "warmup_steps",
                "weight_decay",
                "max_grad_norm",
                "bf16",
                "seed",
            )
        },
    }

    def write(tmp: str) -> None:
        save_checkpoint_files(model, tmp, safe_serialization=True)  # rank 0 alone gets here
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_args.json"), "w") as f:
            json.dump(training, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "lopt_args.json"), "w") as f:
            json.dump({**run_args, **training}, f, indent=2, sort_keys=True, default=str)

    atomic_directory_write(args.output_dir, write)
