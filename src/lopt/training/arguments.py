"""The LoPT and data arguments of the training commands, as typed dataclasses (every field is a flag of `lopt sft`,
`lopt grpo` and `lopt dpo`, next to TRL's `ModelConfig` and the trainer's own config), and the precision every command
defaults to. The recipes (lopt's defaults per base, command and task) are files: lopt.builtin.bases.

Adding a LoPT option is one field here: a field whose name is also a `LoPTConfig` field reaches the config as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from lopt.engine.config import ANCHOR_DTYPES, AUX_OBJECTIVES, LoPTConfig
from lopt.errors import UserError
from lopt.training.methods import METHODS
from lopt.training.rewards import REWARDS

LOPT_METHODS = ("lopt", "ll", "lopt_joint")


def bf16_by_default() -> bool:
    """Whether a training command uses bf16 autocast when the user sets neither --bf16 nor --fp16: on a GPU only.

    The GPU evidence trained in bf16; every CPU result (docs/EVIDENCE.md, the README) is fp32, and bf16 autocast on a
    CPU changes them (a run of the README's main job under it kept 80.8% of the facts, against 87.0% in fp32). So on a
    CPU bf16 is the user's choice (--bf16 true), never a guess from its bf16 units: results must not depend on which
    CPU ran them (on one without bf16 units a bf16 matmul is also tens of times slower than fp32)."""
    import torch

    return torch.cuda.is_available()


@dataclass
class LoPTArguments:
    """The method and its knobs (flag names follow the LoPT authors' scripts)."""

    method: str = field(
        default="lopt",
        metadata={"help": "lopt (ll is an alias), lopt_joint, e2e, freeze or lora.", "choices": METHODS},
    )
    num_blocks: int = field(default=2, metadata={"help": "LoPT blocks k (2 = cut at the midpoint)."})
    boundaries: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated first layers of blocks 2..k, e.g. '2,5' (instead of even blocks). With "
            "--num_blocks, the two must agree. For --method freeze, one layer: the first one trained (default the "
            "midpoint)."
        },
    )
    lambda_aux: float = field(default=10.0, metadata={"help": "Weight of the local aux loss (lambda)."})
    lr_k1: float | None = field(
        default=None,
        metadata={
            "help": "LR of the early group (embedding, early blocks, aux heads). Default: 0.3 x --learning_rate for "
            "sft (docs/EVIDENCE.md, 'Choosing the defaults'), learning_rate/20 for the built-in grpo/dpo recipes, else "
            "--learning_rate. Pass --lr_k1 equal to --learning_rate for the paper's setting."
        },
    )
    aux_objective: str = field(
        default="recon",
        metadata={
            "help": "Local objective of the early blocks: recon (the paper's), anchor (stay near the pretrained "
            "model's hidden state at the boundary), task (the batch's next-token loss read through the model's own "
            "final norm and LM head; sft only), synth (the task gradient at the boundary, predicted by a small head "
            "that learns it from the last block's backward), or a sum such as recon+task, task+anchor or "
            "synth+anchor.",
            "choices": AUX_OBJECTIVES,
        },
    )
    anchor_weight: float = field(default=1.0, metadata={"help": "Weight of the anchor term in recon+anchor."})
    task_weight: float = field(
        default=1.0, metadata={"help": "Weight of the task term in a sum such as recon+task or task+anchor."}
    )
    synth_weight: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the predicted gradient (synth, synth+anchor); not multiplied by --lambda_aux. At 1.0 a "
            "perfect predictor would give the early blocks end-to-end's gradient."
        },
    )
    synth_lr: float | None = field(
        default=1e-3,
        metadata={
            "help": "Learning rate of the gradient predictors (synth, synth+anchor), their own optimizer group; "
            "see LoPTConfig.synth_lr."
        },
    )
    aux_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "For the first N optimizer steps only the aux heads learn from the local objective (the early "
            "blocks' local gradient is dropped), so early blocks do not follow a random head."
        },
    )
    anchor_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the frozen pretrained copy the anchor needs (default: the model's; bfloat16 halves it).",
            "choices": ANCHOR_DTYPES,
        },
    )
    aux_head_ratio: int = field(
        default=4, metadata={"help": "Bottleneck of the aux heads: hidden -> hidden/ratio -> hidden."}
    )
    untie_embeddings: bool = field(
        default=False,
        metadata={
            "help": "For a model with tied embedding and LM head (e.g. SmolLM2, Qwen2.5-0.5B): give the head its own "
            "copy, as the authors' code does (the paper's setting; one more vocab x hidden matrix to train, and the "
            "checkpoint is saved untied). Default: the shared matrix stays one parameter, trained with the late "
            "group, and the checkpoint keeps the base's shape. --block_parallel always unties (the embedding is on "
            "the first process, the head on the last)."
        },
    )
    block_parallel: bool = field(
        default=False,
        metadata={
            "help": "sft only: one LoPT block per process (torchrun --nproc_per_node K, K = --num_blocks): blocks "
            "train at once, only activations travel forward. Without it, torchrun/accelerate launch train "
            "data-parallel (DDP)."
        },
    )
    clip_per_block: bool = field(
        default=False,
        metadata={
            "help": "LoPT: clip each block's gradients by their own norm (--max_grad_norm each), so that a large "
            "local gradient cannot shrink the last block's task step. Default: one global norm over every block, as "
            "the authors' code does. (--block_parallel clips per block anyway: each process steps its own block.)"
        },
    )
    round_to_bfloat16: bool = field(
        default=False,
        metadata={
            "help": "Keep weights and AdamW states at bf16 values (rounded at the start and after every step) while "
            "computing in fp32: the update rounding of pure-bf16 training (--dtype bfloat16, the authors' setting), "
            "on CPUs where bf16 matmuls are slow. A research switch: updates below half a bf16 step are lost."
        },
    )
    optimizer_in_backward: bool = field(
        default=False,
        metadata={
            "help": "Step the optimizer inside the backward and free each gradient at once: every parameter as its "
            "gradient is final (LoPT's early blocks inside their local backward, a tied embedding when the task "
            "backward ends). Same updates as the ordinary step with --max_grad_norm 0; with clipping, each "
            "parameter is clipped by its own norm. One process, no gradient accumulation, no fp16 "
            "(docs/TRAINING.md)."
        },
    )

    checkpoint_layers: str | None = field(
        default=None,
        metadata={
            "help": "Activation checkpointing on some decoder layers only (any method; non-reentrant): a count (15: "
            "the earliest 15), a fraction (0.5: the earliest half) or layer indices (0,1,2; one layer: '3,'). Each "
            "layer checkpointed keeps only its input and recomputes its forward in the backward; the others keep "
            "their activations. Turns checkpointing on (--gradient_checkpointing covers every layer)."
        },
    )

    @property
    def is_lopt(self) -> bool:
        return self.method in LOPT_METHODS

    def boundary_list(self) -> list[int] | None:
        if self.boundaries is None:
            return None
        try:
            return [int(b) for b in str(self.boundaries).split(",") if b.strip()]
        except ValueError:
            raise UserError(
                f"--boundaries {self.boundaries!r} must be comma-separated layer indices, e.g. '2,5'."
            ) from None

    def check(self, set_fields: frozenset[str] = frozenset()) -> None:
        """One-line errors for LoPT flags that do not fit together (LoPTConfig checks each value on its own). The
        rules shared with the trainer mixin, and those that need the trainer's flags, are in lopt.training.checks."""
        if not self.is_lopt:
            if self.lr_k1 is not None:
                raise UserError(f"--lr_k1 only applies to LoPT methods, not --method {self.method}.")
            if self.boundaries is not None and (self.method != "freeze" or len(self.boundary_list()) != 1):
                raise UserError(
                    f"--boundaries applies to LoPT methods and, as one layer (the first one trained), to freeze; "
                    f"not --method {self.method} --boundaries {self.boundaries}."
                )
            if self.aux_objective != "recon":
                raise UserError(f"--aux_objective only applies to LoPT methods, not --method {self.method}.")
            if self.aux_warmup_steps:
                raise UserError(
                    f"--aux_warmup_steps only applies to LoPT methods, not --method {self.method}."
                )
            if self.untie_embeddings:
                raise UserError(
                    f"--untie_embeddings only applies to LoPT methods, not --method {self.method} (freeze always "
                    "unties, e2e and lora never do)."
                )
        if self.num_blocks < 2:
            raise UserError(f"--num_blocks {self.num_blocks} is invalid: LoPT needs at least 2 blocks.")
        if self.optimizer_in_backward:
            if self.method == "lora":  # lopt_joint: lopt.integrations.checks.check_optimizer_in_backward
                raise UserError(
                    "--optimizer_in_backward works with --method lopt, e2e and freeze, not lora (the adapters' "
                    "gradients are small: there is little to free)."
                )
            if self.round_to_bfloat16:
                raise UserError(
                    "--round_to_bfloat16 rounds after the ordinary optimizer step: it does not combine with "
                    "--optimizer_in_backward."
                )
            if self.block_parallel:
                raise UserError(
                    "--optimizer_in_backward and --block_parallel are exclusive (each block-parallel rank steps its "
                    "own block): choose one."
                )
        if self.round_to_bfloat16 and self.block_parallel:
            raise UserError(
                "--round_to_bfloat16 and --block_parallel are exclusive (each block-parallel rank runs its own "
                "trainer): choose one."
            )
        if self.checkpoint_layers is not None:
            from lopt.engine.checkpointing import checkpoint_layers_form

            try:  # the form now; the range once the model's depth is known (the trainer)
                checkpoint_layers_form(self.checkpoint_layers)
            except ValueError as err:
                raise UserError(str(err)) from None
        bounds = self.boundary_list()
        if bounds is not None and "num_blocks" in set_fields and self.num_blocks != len(bounds) + 1:
            raise UserError(
                f"--boundaries {self.boundaries!r} makes {len(bounds) + 1} blocks but --num_blocks is "
                f"{self.num_blocks}: drop --num_blocks or make them agree."
            )
        if self.is_lopt:
            self.lopt_config()  # every value checked by LoPTConfig, before a model is loaded

    def lopt_config(self) -> LoPTConfig | None:
        """The LoPTConfig of a LoPT method (None for the baselines). Fields named as in LoPTConfig pass through."""
        if not self.is_lopt:
            return None
        shared = {f.name for f in fields(LoPTConfig)} & {f.name for f in fields(self)}
        values = {name: getattr(self, name) for name in shared}
        values.update(
            boundaries=self.boundary_list(),
            aux_weight=self.lambda_aux,
            backward="joint" if self.method == "lopt_joint" else "local",
        )
        return LoPTConfig(**values)


@dataclass
class DataArguments:
    """Training data: a built-in task (the default) or the user's rows."""

    task: str | None = field(
        default=None,
        metadata={
            "help": "A built-in task (default: 'successor' for the built-in model, 'extract' for a real base such as "
            "smollm2-135m); successor and modules only with the built-in model, extract and totals with any chat "
            "model. grpo also takes gsm8k and numinamath (the authors' hub datasets)."
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "JSONL, JSON or Parquet rows (row formats: docs/TRAINING.md)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets hub id or local dataset folder."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of --dataset_name."})
    split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    max_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})
    eval_file: str | None = field(
        default=None,
        metadata={
            "help": "Rows in the training format scored by the trainer under --eval_strategy steps|epoch."
        },
    )
    eval_samples: int = field(
        default=200,
        metadata={
            "help": "Built-in task only: rows of its test split scored (greedy, the task's scorer) after training."
        },
    )

    @property
    def user_data(self) -> bool:
        return self.train_file is not None or self.dataset_name is not None

    def check(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"--max_samples {self.max_samples} must be a positive integer.")
        if self.eval_samples < 0:
            raise UserError(f"--eval_samples {self.eval_samples} must be 0 or more.")


@dataclass
class GRPOTaskArguments:
    """What `lopt grpo` adds to TRL's GRPOConfig: the reward, a prompt-length filter and a plot."""

    reward: str = field(
        default="auto",
        metadata={
            "help": "math: final answer (\\boxed{} > '####' > last number) compared by value; exact_match: the "
            "whole completion equals the answer after normalisation; json_match: the completion is exactly the "
            "answer's JSON object. auto: the built-in task's scorer (json_match for extract and totals, else "
            "exact_match), else math.",
            "choices": REWARDS,
        },
    )
    max_prompt_length: int = field(
        default=1024,
        metadata={
            "help": "Rows whose prompt is longer (in tokens) are skipped. Default 128 built-in task / 1024."
        },
    )
    plot: bool = field(
        default=False,
        metadata={"help": "Write reward_curve.png (mean reward per logged step) to output_dir."},
    )
