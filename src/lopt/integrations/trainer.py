"""LoPT inside transformers' Trainer and TRL's trainers: a thin mixin, not a fork.

    class MyTrainer(LoPTTrainerMixin, SFTTrainer): ...          # or use lopt.integrations.LoPTSFTTrainer
    trainer = MyTrainer(model=model, args=args, train_dataset=ds, lopt_config=LoPTConfig(num_blocks=2))

The mixin
- wraps the trainer's model with `get_lopt_model` after the base trainer has set it up (so PEFT, when the trainer
  applies it, comes first); the trainer keeps training the plain HF model object, so saving, PEFT and TRL's own
  model patches work unchanged;
- builds the optimizer from `lopt.param_groups` (early group at `early_learning_rate`);
- before each forward, sets `loss_scale` so the local backward scales exactly like the loss the trainer
  backpropagates (gradient accumulation, fp16 grad scaler); in joint mode it adds the aux objective to the loss;
- logs the task loss and each boundary's aux loss (averaged over ranks);
- writes checkpoints atomically and keeps the aux heads in them for resuming;
- under DDP (torchrun / accelerate launch), syncs what DDP cannot: see `lopt.engine.distributed`;
- with `fsdp=True` (under torchrun), shards the model itself with FSDP2 (`fully_shard` per decoder layer and on the
  model; CPU/gloo or GPU), which transformers then treats as a model that owns its sharding and gradient reduction
  (no DDP wrap); the local backward runs inside the forward as usual (lopt.engine.distributed.fsdp2_local_backward), the
  aux heads stay replicated, checkpoints hold one standard HF model (gathered on rank 0) plus each rank's optimizer
  shard, and after `train()` rank 0's `trainer.model` is an unsharded copy on CPU (for saving and evaluating).
  Accelerate's own FSDP2 plugin is accepted too (untested: no GPU here, and transformers ignores FSDP on CPU); its
  FSDP1 and DeepSpeed are refused for local mode with a one-line error.
- with `optimizer_in_backward=True`, steps the optimizer inside the backward (lopt.engine.in_backward): each
  parameter as its gradient is final (LoPT's early blocks inside their local backward, a tied matrix when the task
  backward ends, in `training_step`). Same optimizer, state_dict, checkpoints and scheduler; clipping per
  parameter; one process, no gradient accumulation, no fp16 grad scaler.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lopt.engine.architectures import find_decoder_parts, unwrap_peft
from lopt.engine.checkpointing import parse_checkpoint_layers, select_checkpointed_layers
from lopt.engine.config import LoPTConfig
from lopt.engine.distributed import (
    LoPTGradientSync,
    all_reduce_mean_,
    clip_grad_norm_,
    full_state_dict,
    fully_shard_decoder,
    fully_shard_lopt_model,
    is_distributed,
    is_fsdp2_sharded,
    load_full_state_dict,
    load_local_optimizer_state,
    local_optimizer_state,
    split_dtensor_groups,
    unsharded_copy_on_rank0,
)
from lopt.engine.in_backward import OptimizerInBackward
from lopt.engine.model import AUX_HEADS_NAME, get_lopt_model
from lopt.engine.optim import param_groups
from lopt.integrations import checks


class LoPTTrainerMixin:
    """Mix in before a transformers/TRL trainer class. `lopt_config=None` leaves the trainer unchanged (baselines).
    `fsdp=True` shards the model with FSDP2 over the processes of a torchrun launch (baselines too).
    `optimizer_in_backward=True` steps the optimizer inside the backward (baselines too; lopt.engine.in_backward).
    `clip_per_block=True` (LoPT): each block's gradients are clipped by their own norm, so a large local gradient
    cannot shrink the last block's task step, as one global norm over every block does."""

    # False for trainers whose model calls carry no labels (GRPO, DPO): the "task" local objective needs them.
    lopt_batches_have_labels = True

    def __init__(
        self,
        *args,
        lopt_config: LoPTConfig | None = None,
        early_learning_rate: float | None = None,
        fsdp: bool = False,
        optimizer_in_backward: bool = False,
        clip_per_block: bool = False,
        checkpoint_layers: int | float | str | list[int] | None = None,
        **kwargs,
    ):
        if lopt_config is not None:
            checks.check_objective_has_labels(
                lopt_config.aux_objective,
                lopt_config.uses_task,
                self.lopt_batches_have_labels,
                type(self).__name__,
            )
        super().__init__(*args, **kwargs)
        self.early_learning_rate = early_learning_rate
        self.lopt_model = None
        self._lopt_grad_sync = None
        self.lopt_fsdp = fsdp
        if fsdp:
            self._check_fsdp(lopt_config)
        self.lopt_optimizer_in_backward = optimizer_in_backward
        self.lopt_clip_per_block = clip_per_block
        if clip_per_block:
            checks.check_clip_per_block(
                lopt=lopt_config is not None, fsdp=fsdp, optimizer_in_backward=optimizer_in_backward
            )
        self._lopt_in_backward: OptimizerInBackward | None = None
        self._lopt_grad_norm = None  # the last step's norm, measured part by part as they were stepped
        if optimizer_in_backward:
            self._check_optimizer_in_backward(lopt_config)
        if lopt_config is not None:
            self._check_distributed_backend(lopt_config)
            self.lopt_model = get_lopt_model(self.model, lopt_config)
            self.lopt_model.aux_heads.to(self.args.device)
            # The trainer zeroes and clips only its model's gradients; the aux heads live beside it.
            self.add_callback(_ZeroAuxHeadGrads(self.lopt_model))
            # Multi-process: set up before train() wraps the model in DDP (a no-op in one process).
            sync_early = not (getattr(self, "is_fsdp_enabled", False) or fsdp)  # FSDP reduces the whole model
            self._lopt_grad_sync = LoPTGradientSync(self.lopt_model, sync_early=sync_early)
        if fsdp:
            if self.lopt_model is not None:
                fully_shard_lopt_model(self.lopt_model)
            else:
                fully_shard_decoder(self.model)
            # transformers' flag for a model sharded before the trainer got it (`from_pretrained(distributed_config=
            # ...)`): the trainer then neither moves it nor wraps it in DDP, and builds the optimizer on the DTensors.
            self.is_distributed_loading_by_transformers = True
        if checkpoint_layers is not None:
            self._select_checkpointed_layers(checkpoint_layers)
        self._lopt_sums: dict[str, float] = {}
        self._lopt_micro_steps = 0
        self._lopt_group_lrs: dict[str, float] = {}

    def _select_checkpointed_layers(self, checkpoint_layers) -> None:
        """--checkpoint_layers: checked against the model's depth now; train() enables checkpointing on every layer
        (activation_checkpointing), then a callback keeps it on the chosen ones only."""
        checks.check_checkpoint_layers(checkpoint_layers, self.args.activation_checkpointing)
        layers = parse_checkpoint_layers(checkpoint_layers, find_decoder_parts(self.model).num_layers)
        self.add_callback(_SelectCheckpointedLayers(self.model, layers))

    def _check_fsdp(self, lopt_config: LoPTConfig | None) -> None:
        """What `fsdp=True` needs, checked before the model is touched."""
        anchor = lopt_config.aux_objective if lopt_config is not None and lopt_config.uses_anchor else None
        checks.check_fsdp(launched=dist.is_available() and dist.is_initialized(), anchor_objective=anchor)
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "--fsdp shards the model itself: drop the accelerate FSDP / DeepSpeed settings (or drop --fsdp)."
            )
        if unwrap_peft(self.model) is not self.model:
            raise ValueError(
                "--fsdp with a PEFT (LoRA) model is not supported yet: train LoRA without --fsdp (DDP)."
            )

    def _check_distributed_backend(self, lopt_config: LoPTConfig) -> None:
        """Local mode backpropagates inside the forward: fine under DDP (see lopt.engine.distributed) and FSDP2
        (lopt.engine.distributed.fsdp2_local_backward), not under FSDP1's flat parameters or DeepSpeed, whose gradient
        reduction hooks expect one backward after the forward."""
        if lopt_config.backward != "local":
            return
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "LoPT's local backward (--method lopt) is not supported under DeepSpeed: shard the model with --fsdp "
                "(FSDP2, under torchrun) instead, or use DDP (plain torchrun), or --method lopt_joint."
            )
        if getattr(self, "is_fsdp_enabled", False):
            version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
            if version != 2:
                raise ValueError(
                    f"LoPT's local backward (--method lopt) is not supported under FSDP version {version}: use "
                    "--fsdp (FSDP2, sharded by lopt), or accelerate's fsdp_version: 2."
                )

    def _check_optimizer_in_backward(self, lopt_config: LoPTConfig | None) -> None:
        """What the optimizer step in the backward cannot do, refused before training (one line each)."""
        args = self.args
        checks.check_optimizer_in_backward(
            joint_backward=lopt_config is not None and lopt_config.backward != "local",
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            fp16=args.fp16,
            processes=max(args.world_size, 2 if is_distributed() else 1),
            fsdp=self.lopt_fsdp,
            optim=args.optim,
        )
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError("optimizer_in_backward is not supported under DeepSpeed or FSDP.")

    # --- optimizer: the two LoPT groups --------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = self._create_optimizer(model)
        if self.lopt_optimizer_in_backward and self._lopt_in_backward is None:
            self._lopt_in_backward = OptimizerInBackward(
                self.lopt_model if self.lopt_model is not None else self.model,
                optimizer,
                max_grad_norm=self.args.max_grad_norm,
            )
        return optimizer

    def _create_optimizer(self, model=None):
        if self.lopt_model is None:
            if self.early_learning_rate is not None:
                raise ValueError(
                    "early_learning_rate needs a lopt_config (it sets the LoPT early group's lr)."
                )
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = param_groups(
                self.lopt_model,
                lr=self.args.learning_rate,
                early_lr=self.early_learning_rate,
                weight_decay=self.args.weight_decay,
            )
            if self.lopt_fsdp:
                groups = split_dtensor_groups(groups)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The last micro-batch of an optimizer step (the trainer clips and steps right after this returns): average
        # the gradients DDP does not sync. Earlier micro-batches accumulate locally, as DDP's no_sync does.
        if self._lopt_grad_sync is not None and self.accelerator.sync_gradients:
            self._lopt_grad_sync.sync_gradients()
        if self._lopt_in_backward is not None:
            # The backward has ended: step what it completed (LoPT: the task loss's parameters; e2e: nothing left).
            # The trainer's own clip and optimizer.step() that follow find no gradient.
            self._lopt_grad_norm = self._lopt_in_backward.step()
        return loss

    def _clip_grad_norm(self, model):
        """One global norm over the model and the aux heads (all that the optimizer steps), as in plain training."""
        if (
            self._lopt_in_backward is not None
        ):  # clipped part by part as they were stepped: no gradient is left
            return self._lopt_grad_norm
        aux = (
            [p for p in self.lopt_model.aux_heads.parameters() if p.grad is not None]
            if self.lopt_model
            else []
        )
        if self.lopt_model is None and not self.lopt_fsdp:
            return super()._clip_grad_norm(model)
        if self.lopt_clip_per_block:
            return _clip_each_block(self.lopt_model.block_parameters(), self.args.max_grad_norm)
        if self.lopt_fsdp or getattr(self, "is_fsdp_enabled", False):
            # Sharded (DTensor) model gradients and replicated aux-head gradients: one norm, two scalings.
            return clip_grad_norm_(model.parameters(), aux, self.args.max_grad_norm)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *aux], self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if self._lopt_in_backward is not None:
            return self._lopt_grad_norm
        return super()._get_grad_norm(model, grad_norm)

    # --- the loss ------------------------------------------------------------------------------
    def _loss_factor_applied_by_trainer(self, num_items_in_batch) -> float:
        """What `Trainer.training_step` multiplies the returned loss by before backward (mirrors its rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return 1.0 if scaled else 1.0 / self.current_gradient_accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lopt_model = self.lopt_model
        if lopt_model is None or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # aux_i is a per-micro-batch mean, so over an accumulated batch each micro-batch carries 1/GA of it.
        aux_factor = 1.0 / self.current_gradient_accumulation_steps
        grad_scaler = getattr(self.accelerator, "scaler", None)
        amp_scale = grad_scaler.get_scale() if grad_scaler is not None and grad_scaler.is_enabled() else 1.0
        lopt_model.loss_scale = aux_factor * amp_scale
        # Aux-head warm-up: the early blocks wait until the heads are trained (global_step = steps done so far).
        lopt_model.aux_heads_only = self.state.global_step < lopt_model.lopt_config.aux_warmup_steps
        lopt_model.take_aux_loss()  # drop anything left by a forward outside compute_loss
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if return_outputs else (result, None)
        aux = lopt_model.take_aux_loss()
        trainer_factor = self._loss_factor_applied_by_trainer(num_items_in_batch)
        self._record(loss.detach() * trainer_factor, lopt_model.last_aux_losses)
        if self.optimizer is not None:  # the rates this step uses (the scheduler moves them after the step)
            self._lopt_group_lrs = {
                f"lr_{g.get('name', 'group')}": g["lr"] for g in self.optimizer.param_groups
            }
        if aux is not None:
            # Joint mode: aux carries the graph and joins the backward here. Local mode: its gradients are already
            # in .grad and aux is a detached value, added so the reported loss is the whole objective.
            loss = loss + aux * (aux_factor / trainer_factor)
        return (loss, outputs) if return_outputs else loss

    # --- logging -------------------------------------------------------------------------------
    def _record(self, task_loss: torch.Tensor, aux_losses: list[torch.Tensor]) -> None:
        self._lopt_micro_steps += 1
        values = {"task_loss": task_loss}
        aux_factor = 1.0 / self.current_gradient_accumulation_steps
        for boundary, aux in enumerate(aux_losses):
            values[f"aux_loss_{boundary}"] = aux * aux_factor
        for key, value in values.items():
            self._lopt_sums[key] = self._lopt_sums.get(key, 0.0) + float(value)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._lopt_micro_steps:
            optimizer_steps = self._lopt_micro_steps / self.current_gradient_accumulation_steps
            sums = self._lopt_sums
            if is_distributed():  # every rank logs at the same step: report the mean over ranks
                keys = sorted(sums)
                values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.args.device)
                all_reduce_mean_([values])
                sums = dict(zip(keys, values.tolist()))
            logs.update({k: float(f"{v / optimizer_steps:.6g}") for k, v in sums.items()})
            self._lopt_sums, self._lopt_micro_steps = {}, 0
        if "loss" in logs and self.lopt_model is not None:
            logs.update(self._lopt_group_lrs)
            # The "synth" objective's predictors, against the true boundary gradients of the backwards since the last
            # log (this process's).
            logs.update(
                {k: float(f"{v:.4g}") for k, v in self.lopt_model.synthetic_gradient_stats.take().items()}
            )
        return super().log(logs, *args, **kwargs)

    # --- FSDP2 (fsdp=True) ---------------------------------------------------------------------------
    def _defer_fsdp_gradient_reduction(self):
        """Gradient accumulation: FSDP2 reduce-scatters every micro-batch's gradients and sums them (transformers'
        version of this reads a `distributed_config` that a model sharded by lopt does not have)."""
        if self.lopt_fsdp:
            return contextlib.nullcontext()
        return super()._defer_fsdp_gradient_reduction()

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self.lopt_fsdp and is_fsdp2_sharded(self.model):
            # Every rank gathers; rank 0 keeps an unsharded copy to save and evaluate on its own.
            plain = unsharded_copy_on_rank0(self.model)
            if plain is not None:
                self.model = self.model_wrapped = plain
        return result

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not (self.lopt_fsdp and is_fsdp2_sharded(self.model)):
            return super()._save(output_dir, state_dict)
        state_dict = full_state_dict(self.model)  # a collective: every rank is here
        if self.args.should_save:
            super()._save(output_dir, state_dict)

    def _fsdp_optimizer_file(self, directory: str) -> str:
        return os.path.join(
            directory, f"optimizer.rank{self.args.process_index}-of-{self.args.world_size}.pt"
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.lopt_fsdp:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Each rank writes its own shard of the optimizer state; the scheduler is the same everywhere.
        os.makedirs(output_dir, exist_ok=True)
        torch.save(local_optimizer_state(self.optimizer), self._fsdp_optimizer_file(output_dir))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.lopt_fsdp or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = self._fsdp_optimizer_file(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint!r} has no {os.path.basename(path)}: resume an --fsdp run with the number of processes "
                "that saved it, from a checkpoint written with --fsdp."
            )
        load_local_optimizer_state(self.optimizer, torch.load(path, weights_only=True))
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True)
        )

    # --- checkpoints ---------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a hidden staging folder, add the aux heads, then rename it into place:
        `checkpoint-N` either exists complete or not at all."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_run_dir = os.path.join(run_dir, ".lopt-staging")
        get_output_dir = self._get_output_dir
        self._get_output_dir = lambda trial=None: staging_run_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = get_output_dir
        if is_distributed():
            dist.barrier()  # every rank's files (RNG state, FSDP optimizer shard) are staged before the rename
        if not self.args.should_save:
            return
        staged = os.path.join(staging_run_dir, name)
        if self.lopt_model is not None:
            self.lopt_model.save_aux_heads(staged)
        final = os.path.join(run_dir, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staged, final)
        shutil.rmtree(staging_run_dir, ignore_errors=True)
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.lopt_fsdp:  # every rank reads the whole checkpoint and keeps its shards
            load_full_state_dict(self.model, _read_weights(resume_from_checkpoint))
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.lopt_model is not None:
            if not os.path.isfile(os.path.join(resume_from_checkpoint, AUX_HEADS_NAME)):
                raise FileNotFoundError(
                    f"{resume_from_checkpoint!r} has no {AUX_HEADS_NAME}: it was not written by a LoPT run, so the "
                    "aux heads cannot be restored. Resume from a LoPT checkpoint, or start a new run."
                )
            self.lopt_model.load_aux_heads(resume_from_checkpoint)


def _clip_each_block(blocks: list[list[torch.nn.Parameter]], max_norm: float) -> torch.Tensor:
    """Clip each block's gradients by that block's own norm; returns the norm of them all (before clipping), for
    the log."""
    norms = []
    for params in blocks:
        params = [p for p in params if p.grad is not None]
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            norms.append(norm.float())
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    """The weights of a safetensors HF checkpoint folder (one file or an index of shards)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {name} in {directory!r}: resume from a checkpoint-N folder of an --fsdp run."
            )
        weights.update(load_file(path))
    return weights


class _SelectCheckpointedLayers(TrainerCallback):
    """After train() has enabled activation checkpointing on every decoder layer: keep it on the chosen ones."""

    def __init__(self, model, layers: list[int]):
        self.model, self.layers = model, layers

    def on_train_begin(self, args, state, control, **kwargs):
        select_checkpointed_layers(self.model, self.layers)


class _ZeroAuxHeadGrads(TrainerCallback):
    """Zero the aux heads' gradients after every optimizer step, as the trainer does for its model."""

    def __init__(self, lopt_model):
        self.lopt_model = lopt_model

    def on_step_end(self, args, state, control, **kwargs):
        self.lopt_model.aux_heads.zero_grad(set_to_none=True)
