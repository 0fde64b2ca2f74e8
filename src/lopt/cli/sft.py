"""`lopt sft`: supervised post-training with LoPT or a baseline, through TRL's SFTTrainer.

Without --model_name_or_path it uses the built-in pretrained model; without data flags, the built-in task.

Multi-process: `torchrun --nproc_per_node N -m lopt sft ...` (or `accelerate launch`) trains data-parallel (DDP; the
trainer mixin syncs what DDP cannot, see lopt.distributed); only rank 0 writes the outputs. `--block_parallel` puts
one LoPT block on each process instead (lopt.block_parallel).
"""

from __future__ import annotations

import argparse
import sys

from lopt.cli import common


def add_parser(parser: argparse.ArgumentParser) -> None:
    common.add_model_args(parser)
    common.add_method_args(parser)
    g = parser.add_argument_group("data (default: the built-in task)")
    g.add_argument(
        "--train_file", default=None, help="JSONL, JSON or Parquet rows (see README for row formats)."
    )
    g.add_argument(
        "--task",
        default=None,
        help="A built-in task (lopt.builtin.BUILTIN_TASKS) for the built-in model. Default: successor.",
    )
    g.add_argument("--dataset_name", default=None, help="A datasets hub id or local dataset folder.")
    g.add_argument("--dataset_config", default=None)
    g.add_argument("--split", default="train")
    g.add_argument("--max_samples", type=int, default=None)
    g.add_argument("--max_seq_length", type=int, default=None, help="Default 128 built-in / 1024.")
    g.add_argument(
        "--eval_samples",
        type=int,
        default=200,
        help="Built-in task only: held-out rows scored after training.",
    )
    common.add_training_args(parser)
    g = parser.add_argument_group("multi-process")
    g.add_argument(
        "--block_parallel",
        action="store_true",
        help="One LoPT block per process (launch with torchrun --nproc_per_node K, K = --num_blocks): blocks train "
        "at once, only activations travel forward. Without it, torchrun/accelerate launch train data-parallel (DDP).",
    )


def run(args: argparse.Namespace) -> int:
    if args.block_parallel:
        from lopt.block_parallel import run_block_parallel

        return run_block_parallel(args)

    from transformers import set_seed
    from trl import SFTConfig

    from lopt.data import tokenize_rows
    from lopt.distributed import finish
    from lopt.errors import UserError
    from lopt.integrations import LoPTSFTTrainer

    common.fill_defaults(args, "sft")
    builtin_data = args.train_file is None and args.dataset_name is None
    if builtin_data and args.model_name_or_path is not None:
        raise UserError(
            "the built-in task is made for the built-in model: give --train_file or --dataset_name."
        )
    resume = common.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    set_seed(args.seed)
    progress = not args.no_progress

    # Data rows first: a bad file fails fast, before a model is loaded.
    rows = common.load_sft_rows(args, builtin_data)
    model, tokenizer, model_path = common.load_model_and_tokenizer(
        args.model_name_or_path, args.trust_remote_code, progress=progress
    )
    train_dataset = tokenize_rows(rows, tokenizer, args.max_seq_length)
    prepared = common.prepare_from_args(model, args)
    training_args = SFTConfig(
        **common.training_kwargs(args),
        max_length=args.max_seq_length,
    )
    trainer = LoPTSFTTrainer(
        model=prepared.model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **common.lopt_trainer_kwargs(prepared, args),
    )
    main_process = trainer.args.should_save  # rank 0 under DDP; the only process that writes or evaluates
    if main_process:
        print(_describe(args, prepared, model_path, len(train_dataset)), file=sys.stderr)
    result = trainer.train(resume_from_checkpoint=resume)
    if not main_process:
        finish()  # wait for rank 0's outputs (and exit cleanly: see lopt.distributed.finish)
        return 0
    common.save_final_model(trainer, prepared, tokenizer, args.output_dir, args)

    summary = {
        "method": prepared.method,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
    }
    if builtin_data and args.eval_samples > 0:
        summary["heldout_exact_match"] = common.builtin_task_accuracy(
            trainer.model, tokenizer, args.eval_samples, task=args.task
        )
    code = common.finish("sft", args.output_dir, summary)
    finish()
    return code


def _describe(args, prepared, model_path: str, num_rows: int) -> str:
    return (
        f"lopt sft: {common.describe_method(args, prepared)}, model={model_path}, rows={num_rows}, "
        f"lr={args.learning_rate}, batch={args.per_device_train_batch_size}x{args.gradient_accumulation_steps}, "
        f"max_steps={args.max_steps}, output_dir={args.output_dir}"
    )
