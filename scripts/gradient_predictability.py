"""How well can the "synth" objective's predictor learn the task gradient at the boundary of a base model?

The model is held fixed (its own boundary gradient on a built-in task's training rows is the target); only the
gradient predictor trains, with AdamW at each learning rate given, on the training split, and its cosine with the
true gradient is measured on held-out validation batches every few steps. This bounds what `--aux_objective synth`
can hope for: during LoPT training the target also moves.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/gradient_predictability.py --model_name_or_path smollm2-135m \
        --task totals --learning_rates 1e-4,1e-3,3e-3 --steps 100 --out runs/predictability.json
"""

from __future__ import annotations

import argparse
import time

import torch

from lopt import LoPTConfig, get_lopt_model
from lopt.builtin.tasks import builtin_task_rows
from lopt.data.loading import load_model_and_tokenizer
from lopt.data.rows import make_collator, tokenize_rows
from lopt.io import atomic_write_json


def batches(rows, tokenizer, batch_size: int, max_length: int):
    dataset = tokenize_rows(rows, tokenizer, max_length)
    collate = make_collator(tokenizer)
    items = [dataset[i] for i in range(len(dataset))]
    return [collate(items[i : i + batch_size]) for i in range(0, len(items) - batch_size + 1, batch_size)]


def held_out_cosine(lopt_model, eval_batches) -> float:
    """Mean over batches of the cosine between predicted and true boundary gradient (no predictor update)."""
    predictor = lopt_model.aux_heads[0]
    values = []
    for batch in eval_batches:
        lopt_model.synthetic_gradient_stats.take()
        lopt_model(**batch).loss.backward()
        values.append(lopt_model.synthetic_gradient_stats.take()["synth_cosine_0"])
        predictor.zero_grad(set_to_none=True)
    return sum(values) / len(values)


def run(args, lr: float, train_batches, eval_batches) -> dict:
    model, _, _ = load_model_and_tokenizer(args.model_name_or_path, progress=False)
    model.requires_grad_(False)  # the base is the fixed target: only the predictor learns ...
    model.train()
    torch.manual_seed(0)
    lopt_model = get_lopt_model(model, LoPTConfig(aux_objective="synth"))
    predictor = lopt_model.aux_heads[0]
    groups = [{"params": list(predictor.parameters()), "lr": lr}]
    if args.late_lr:  # ... or the last block trains too (the early half held), as in a run's aux warm-up
        late = [p for module in lopt_model.late_modules() for p in module.parameters()]
        for param in late:
            param.requires_grad_(True)
        groups.append({"params": late, "lr": args.late_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        batch = train_batches[(step - 1) % len(train_batches)]
        lopt_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_cosine = lopt_model.synthetic_gradient_stats.take()["synth_cosine_0"]
        if args.print_train:
            print(f"lr {lr:g} step {step}: training-batch cosine {train_cosine:.4f}", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            cosine = held_out_cosine(lopt_model, eval_batches)
            curve.append([step, round(cosine, 4)])
            print(f"lr {lr:g} step {step}: held-out cosine {cosine:.4f}", flush=True)
    return {"lr": lr, "curve": curve, "seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default="smollm2-135m")
    parser.add_argument("--task", default="totals")
    parser.add_argument("--learning_rates", default="1e-4,1e-3,3e-3")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--eval_batches", type=int, default=4)
    parser.add_argument("--late_lr", type=float, default=0.0, help="also train the last block at this rate")
    parser.add_argument("--print_train", action="store_true", help="print each training batch's cosine")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    _, tokenizer, _ = load_model_and_tokenizer(args.model_name_or_path, progress=False)
    train_rows = builtin_task_rows("train", task=args.task)
    eval_rows = builtin_task_rows("validation", n=args.batch_size * args.eval_batches, task=args.task)
    train_batches = batches(train_rows, tokenizer, args.batch_size, args.max_length)
    eval_batches = batches(eval_rows, tokenizer, args.batch_size, args.max_length)
    results = []
    for lr in (float(x) for x in args.learning_rates.split(",")):
        results.append(run(args, lr, train_batches, eval_batches))
        atomic_write_json(args.out, {"command": vars(args), "results": results})


if __name__ == "__main__":
    main()
