"""`lopt grpo`: on-policy GRPO with LoPT (or a baseline) through TRL's GRPOTrainer, with verifiable rewards.

Flags: LoPTArguments, TRL's ModelConfig, DataArguments, GRPOTaskArguments and TRL's GRPOConfig (every field is a flag;
`--config x.yaml` as in `trl grpo`). Without --model_name_or_path it starts from the built-in SFT checkpoint (the
built-in model after `lopt sft` on the built-in task, made on first use); without data flags it trains on that task
(the reward is exact match with the task's answer). From a checkpoint `lopt sft` wrote, the task (and the base) come
from its lopt_args.json unless --task is given. `--task gsm8k` / `--task numinamath` load the LoPT authors' hub
datasets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from trl import GRPOConfig, ModelConfig

from lopt.cli.parser import LoPTParser
from lopt.data.rl_rows import prompt_answer_dataset
from lopt.evaluation.reward_curve import plot_reward_curve, reward_summary
from lopt.training import checks, outputs, recipes, rl, start, task_rows
from lopt.training.arguments import DataArguments, GRPOTaskArguments, LoPTArguments
from lopt.training.rewards import reward_function

DESCRIPTION = "On-policy GRPO with LoPT (or a baseline) and verifiable rewards."


def make_parser() -> LoPTParser:
    return LoPTParser(
        [LoPTArguments, ModelConfig, DataArguments, GRPOTaskArguments, GRPOConfig],
        prog="lopt grpo",
        description=f"{DESCRIPTION}\n\n{__doc__.split(chr(10), 2)[2].strip()}",
        epilog="Batches count completions: one generation batch (--per_device_train_batch_size x "
        "--steps_per_generation) holds prompts x --num_generations completions, so it must be a multiple of "
        "--num_generations. Built-in task recipe (fields not set): learning_rate 2e-4 (--lr_k1 = learning_rate/20), "
        "per_device_train_batch_size 32, num_generations 8, max_completion_length 8, max_steps 150; tasks extract "
        "and totals (a real base's, from a checkpoint `lopt sft` trained on it): learning_rate 1e-5 (--lr_k1 = "
        "0.3 x learning_rate), per_device_train_batch_size 8, num_generations 4, max_completion_length the "
        "longest reference answer of the training rows in tokens + 1, plus 25%, max_steps 50, and LoPT with "
        "--aux_objective anchor --clip_per_block (unless --aux_objective or --lambda_aux is given); all tasks: "
        "temperature 0.7, top_p 0.95, loss_type grpo.",
    )


def recipe(values: dict[str, Any], set_fields: frozenset[str]) -> dict[str, Any]:
    """The fields lopt sets when the user did not: every command's (recipes.base_recipe), then the recipe file of the
    run's task (a starting checkpoint's recorded task when --task is not given) and its LoPT objective."""
    recorded = rl.recorded_task(values["model_name_or_path"])
    return {
        **recipes.base_recipe("grpo", values, set_fields),
        **recipes.command_recipe("grpo", values, set_fields, recorded)[1],
    }


def main(argv: Sequence[str]) -> int:
    parser = make_parser()
    parsed, set_fields = parser.parse(argv, recipe)
    return run(*parsed, set_fields=set_fields, effective=parser.effective)


def run(
    lopt_args: LoPTArguments,
    model_args: ModelConfig,
    data_args: DataArguments,
    task_args: GRPOTaskArguments,
    training_args: GRPOConfig,
    set_fields: frozenset[str] = frozenset(),
    effective: dict[str, Any] | None = None,
) -> int:
    """`effective`: the flags the user and the recipe set (LoPTParser.effective), written beside the checkpoint as
    recipe.yaml (outputs.run_config)."""
    from lopt.builtin.tasks import BUILTIN_TASKS

    # Checks in the order a user fixes them, before any model is built or loaded: model path (the parser), data and
    # every row, then the other flags (the LoPT ones against the model's depth, read from its config).
    recorded = rl.recorded_task(model_args.model_name_or_path)
    task = checks.check_data(
        "grpo", model_args, data_args, (*BUILTIN_TASKS, *task_rows.TASK_DATASETS), recorded
    )
    data_args.check()
    rows = task_rows.grpo_rows(data_args, task, training_args.trust_remote_code)
    checks.check_flags("grpo", lopt_args, model_args, training_args, set_fields, task_args)
    reward = reward_function(task_args.reward, task)
    builtin = task in BUILTIN_TASKS
    values = outputs.run_arguments(
        lopt_args, model_args, data_args, task_args, training_args, set_fields=set_fields
    )
    chosen, _ = recipes.command_recipe("grpo", values, set_fields, recorded)
    early_lr = recipes.early_learning_rate(lopt_args, training_args.learning_rate, chosen.early_lr_ratio)
    resume = start.resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    progress = not training_args.disable_tqdm
    start_model = start.starting_model("grpo", model_args, task, progress)

    from transformers import set_seed

    from lopt.integrations import LoPTGRPOTrainer

    set_seed(training_args.seed)
    model, tokenizer, model_path = start.load_model(model_args, training_args, start_model, progress=progress)
    instruction = task_rows.TASK_INSTRUCTIONS.get(task)
    train_dataset = prompt_answer_dataset(rows, tokenizer, task_args.max_prompt_length, instruction)
    leaves_it = "max_completion_length" not in {
        *set_fields,
        *chosen.values,
    }  # to the answers: a real base's tasks
    if builtin and leaves_it:
        training_args.max_completion_length = rl.completion_budget(train_dataset["answer"], tokenizer)
        if effective is not None:
            effective = {**effective, "max_completion_length": training_args.max_completion_length}
    prepared = start.prepare_model(model, lopt_args, model_args)
    trainer = LoPTGRPOTrainer(
        model=prepared.model,
        reward_funcs=reward,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **start.lopt_trainer_kwargs(prepared, early_lr, training_args.output_dir, lopt_args),
    )
    a = training_args
    print(f"lopt grpo: {recipes.describe_recipe(chosen, values, set_fields)}", file=sys.stderr)
    print(
        f"lopt grpo: {start.describe_method(prepared, a.learning_rate, early_lr)}, model={model_path}, "
        f"task={task or 'custom'}, reward={reward.__name__}, rows={len(train_dataset)}, lr={a.learning_rate}, "
        f"batch={a.per_device_train_batch_size}x{a.gradient_accumulation_steps} completions ({a.num_generations} "
        f"per prompt, up to {a.max_completion_length} tokens), max_steps={a.max_steps}, output_dir={a.output_dir}",
        file=sys.stderr,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    run_args = outputs.run_arguments(
        lopt_args, model_args, data_args, task_args, training_args, set_fields=set_fields
    )
    config = outputs.run_config("grpo", effective, chosen.name) if effective is not None else None
    outputs.save_final_model(trainer, prepared, tokenizer, training_args.output_dir, run_args, config)

    summary = {
        "method": prepared.method,
        "task": task or "custom",
        "start_model": model_path,
        "reward_function": reward.__name__,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        **reward_summary(os.path.join(training_args.output_dir, "metrics.jsonl")),
    }
    if builtin and data_args.eval_samples > 0:
        from lopt.evaluation.evaluate import builtin_task_score

        summary["heldout_exact_match"] = builtin_task_score(
            trainer.model, tokenizer, data_args.eval_samples, task, progress=not training_args.disable_tqdm
        )
        base = rl.knowledge_base(model_args.model_name_or_path, model_path)
        summary.update(outputs.knowledge_kept(trainer.model, tokenizer, base))
    if task_args.plot:
        summary["reward_curve"] = plot_reward_curve(training_args.output_dir)
    return outputs.finish("grpo", training_args.output_dir, summary)
