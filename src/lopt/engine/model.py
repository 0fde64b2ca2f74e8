"""`LoPTModel`: the LoPT step, top to bottom, on an unchanged Hugging Face causal LM.

A training forward (module in train mode, grad enabled) goes like this, for k blocks:

    h_0 = embedding output            (captured by a pre-hook on block 0's first layer)
    block 0:   h_1 = layers[b_0:b_1](h_0)
    boundary:  aux_0 = MSE(head_0(h_1), h_0.detach())     (pre-hook on block 1's first layer; "recon")
                     [+ anchor_weight * MSE(h_1, h_1 of the pretrained model)]   ("anchor", see lopt.engine.anchor)
                     [+ task_weight * CE(lm_head(final_norm(h_1)), labels)]       ("task", see lopt.engine.lens)
               ("synth": + synth_weight * <h_1, P_0(h_1)> / n, a predicted task gradient, outside lambda;
                the boundary is tapped so the later backward trains P_0: see lopt.engine.synthetic)
               aux-head warm-up (aux_heads_only): h_1 is detached before aux_0, so only the head learns
               local mode: backward(scale * lambda/(k-1) * aux_0) right now -> block 0's activations are freed
               joint mode: keep aux_0's graph; it joins the task loss in one backward later
               block 1 receives h_1.detach(): the gradient boundary
    ...
    last block -> final norm -> LM head -> task loss (computed by the model or by the trainer)

Everything is done with forward pre-hooks on the first layer of each block, so the HF model keeps its module
structure and parameter names, saves as a plain checkpoint, and can be handed to any trainer as it is.
In eval mode or under `torch.no_grad()` the hooks do nothing: logits equal the base model's.

A tied embedding and LM head stay one matrix (unless `LoPTConfig.untie_embeddings`): its gradient is the sum of
block 0's local gradient through the embedding and the task gradient through the head. Each reaches it without
crossing a boundary, so the stop-gradient holds; the matrix is trained with the late group (lopt.engine.optim).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from lopt.engine.anchor import ANCHOR_REFERENCE_NAME, PretrainedAnchor, anchor_loss
from lopt.engine.architectures import DecoderParts, find_decoder_parts, hidden_states_arg, unwrap_peft
from lopt.engine.config import LoPTConfig
from lopt.engine.distributed import fsdp2_local_backward
from lopt.engine.heads import AuxHead, reconstruction_loss
from lopt.engine.lens import lens_cross_entropy
from lopt.engine.synthetic import (
    GradientPredictor,
    SyntheticGradientStats,
    synthetic_gradient_term,
    tap_boundary,
    target_embeddings,
)
from lopt.io import atomic_directory_write, save_checkpoint_files

AUX_HEADS_NAME = "lopt_aux_heads.safetensors"


def _in_backward_pass() -> bool:
    """True while the autograd engine runs, e.g. when activation checkpointing replays a layer's forward."""
    return torch._C._current_graph_task_id() != -1


def _replace_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class LoPTModel(nn.Module):
    """A causal LM trained with LoPT. Build it with `get_lopt_model(model, config)`.

    Attributes:
        model: the wrapped model (transformers or PEFT), structure and parameter names unchanged.
        lopt_config: the LoPTConfig. (`config` and other unknown attributes pass through to the wrapped model.)
        block_ranges: (start, end) decoder-layer indices of each block.
        aux_heads: one head per early block (training only, never in saved checkpoints): the reconstruction head
            ("recon") or the gradient predictor ("synth", lopt.engine.synthetic); empty when the objective has
            neither.
        synthetic_gradient_stats: the gradient predictors' quality (cosine with the true boundary gradient, and
            their loss) since the last `take()`, per boundary; trainer integrations log it.
        anchor: the frozen pretrained reference (`PretrainedAnchor`) for the anchor objectives, else None.
        loss_scale: the factor the caller will multiply the returned loss by before `backward()` (e.g.
            1/gradient_accumulation_steps, times a fp16 grad-scaler's scale). The local backward uses it so that
            early-block gradients scale exactly like the task gradient. Trainer integrations set it.
        last_aux_losses: detached aux_i of the most recent training forward, one per boundary (for logging).
        aux_heads_only: while True (the aux-head warm-up, `LoPTConfig.aux_warmup_steps`), the block outputs are
            detached before the local objective: only the aux heads learn from it, the embedding and early blocks
            get no gradient (nor backward compute). Trainer integrations set it from the optimizer step.
    """

    def __init__(
        self, model: nn.Module, config: LoPTConfig, parts: DecoderParts, block_ranges: list[tuple[int, int]]
    ):
        super().__init__()
        self.model = model
        self.lopt_config = config
        self.block_ranges = block_ranges
        self._parts = parts
        self.num_boundaries = len(block_ranges) - 1
        hidden_size = parts.embedding.weight.shape[-1]
        device = parts.embedding.weight.device
        head = GradientPredictor if config.uses_synthetic_gradient else AuxHead
        num_heads = self.num_boundaries if config.uses_reconstruction or config.uses_synthetic_gradient else 0
        self.aux_heads = nn.ModuleList(
            head(hidden_size, config.aux_head_ratio).to(device) for _ in range(num_heads)
        )
        self.synthetic_gradient_stats = SyntheticGradientStats()
        self._boundary_predictions: dict[int, torch.Tensor] = {}
        self.anchor: PretrainedAnchor | None = None
        if config.uses_anchor:
            # The reference copies what runs before the last boundary: a tied embedding too, although it is late.
            embedding = {id(p) for p in parts.embedding.parameters()}
            late = {id(p) for module in self.late_modules() for p in module.parameters()} - embedding
            dtype = getattr(torch, config.anchor_dtype) if config.anchor_dtype else None
            self.anchor = PretrainedAnchor(model, parts, block_ranges, late, dtype)
        self._anchor_states: list[torch.Tensor] | None = None
        self._labels: torch.Tensor | None = None
        self._target_embeddings: torch.Tensor | None = None
        self.aux_heads_only = False
        self.loss_scale = 1.0
        self.last_aux_losses: list[torch.Tensor] = []
        self.last_task_loss: torch.Tensor | None = None
        self._block_inputs: dict[int, torch.Tensor] = {}
        self._pending_aux: torch.Tensor | None = None  # lambda * mean(aux) since the last take_aux_loss()
        self._local_backward_hooks: OrderedDict = OrderedDict()  # register_local_backward_hook
        self._block_hook_handles = []
        self.register_block_hooks()
        self._hook_handles = []
        if self.anchor is not None:
            # On the wrapped model itself, since trainers call it (not this wrapper): the pretrained boundary
            # states for this input are computed before its forward and dropped after it.
            self._hook_handles += [
                model.register_forward_pre_hook(self._compute_anchor_states, with_kwargs=True),
                model.register_forward_hook(self._drop_anchor_states, always_call=True),
            ]
        if config.uses_task or config.uses_synthetic_gradient:
            # The task term needs this batch's labels at every boundary, the gradient predictor its target tokens:
            # taken from the call to the whole model.
            self._hook_handles += [
                model.register_forward_pre_hook(self._capture_labels, with_kwargs=True),
                model.register_forward_hook(self._drop_labels, always_call=True),
            ]

    def register_block_hooks(self, prepend: bool = False) -> None:
        """(Re-)register the block-start hooks; `prepend=True` puts them before every hook registered since (FSDP2's
        pre-forward must come after the local backward: see lopt.engine.distributed.fully_shard_lopt_model)."""
        for handle in self._block_hook_handles:
            handle.remove()
        self._block_hook_handles = [
            self._parts.layers[start].register_forward_pre_hook(
                self._make_block_start_hook(i), with_kwargs=True, prepend=prepend
            )
            for i, (start, _) in enumerate(self.block_ranges)
        ]

    # --- the LoPT step ---------------------------------------------------------------------------
    def _training_forward(self) -> bool:
        return self.model.training and torch.is_grad_enabled()

    def _make_block_start_hook(self, block_index: int):
        def hook(module, args, kwargs):
            if not self._training_forward():
                return None  # eval / no_grad (generation, reference log-probs): the plain model, no aux work
            hidden = hidden_states_arg(args, kwargs)
            if block_index == 0:
                if not _in_backward_pass():
                    self._begin_forward(hidden)
                return None
            if not _in_backward_pass():  # a checkpoint replay must not redo the aux work
                self._end_early_block(block_index - 1, block_output=hidden)
            boundary = hidden.detach()  # the gradient boundary: no later loss reaches earlier blocks
            prediction = self._boundary_predictions.pop(block_index - 1, None)
            if prediction is not None and prediction.requires_grad:  # the later backward trains the predictor
                name = str(block_index - 1)
                boundary = tap_boundary(
                    boundary, prediction, self.loss_scale, self.synthetic_gradient_stats, name
                )
            self._block_inputs[block_index] = boundary
            return _replace_hidden_states(args, kwargs, boundary)

        return hook

    def _compute_anchor_states(self, module, args, kwargs):
        if self._training_forward():  # the reference forward itself runs in eval mode: no recursion
            self._anchor_states = self.anchor.boundary_states(args, kwargs)

    def _drop_anchor_states(self, *_):
        self._anchor_states = None

    def _capture_labels(self, module, args, kwargs):
        self._labels = kwargs.get("labels")

    def _drop_labels(self, *_):
        self._labels = self._target_embeddings = None

    def _begin_forward(self, embedding_output: torch.Tensor) -> None:
        self._check_checkpointing()
        self._block_inputs = {0: embedding_output}
        self._boundary_predictions = {}
        self._target_embeddings = None
        if self.lopt_config.uses_synthetic_gradient and self._labels is not None:
            self._target_embeddings = target_embeddings(self._labels, self._parts.embedding.weight)
        self.last_aux_losses = []
        if self.anchor is not None and self._anchor_states is None:
            raise RuntimeError(
                "The anchor objective computes the pretrained reference when the whole model is called: call the "
                "model (or the LoPTModel), not one of its submodules."
            )
        if self.lopt_config.uses_task and self._labels is None:
            raise ValueError(
                f"aux_objective={self.lopt_config.aux_objective!r} needs the batch's labels, and this training "
                "forward has none (GRPO/DPO, or a loss computed outside the model): call the model with labels=..., "
                "or use aux_objective='recon' or 'anchor'."
            )
        heads = list(self.aux_heads.parameters())
        if heads and heads[0].device != embedding_output.device:
            self.aux_heads.to(embedding_output.device)  # in place: optimizer references stay valid

    def _end_early_block(self, index: int, block_output: torch.Tensor) -> None:
        config = self.lopt_config
        block_input = self._block_inputs.pop(index)
        if self.aux_heads_only:  # warm-up: the heads learn, the block is held (nothing flows back into it)
            block_output, block_input = block_output.detach(), block_input.detach()
        aux = block_output.new_zeros((), dtype=torch.float32)
        if config.uses_reconstruction:
            aux = aux + reconstruction_loss(self.aux_heads[index], block_output, block_input)
        if config.uses_anchor:
            aux = aux + config.anchor_weight * anchor_loss(block_output, self._anchor_states[index])
        if config.uses_task:
            parts = self._parts
            task = lens_cross_entropy(block_output, self._labels, parts.final_norm, parts.lm_head)
            aux = aux + config.task_weight * task
        self.last_aux_losses.append(aux.detach())
        weighted = aux * (config.aux_weight / self.num_boundaries)
        if config.uses_synthetic_gradient:
            prediction = self.aux_heads[index](block_output.detach(), self._target_embeddings)
            self._boundary_predictions[index] = prediction
            weighted = weighted + config.synth_weight * synthetic_gradient_term(block_output, prediction)
        if self.lopt_config.backward == "local" and weighted.requires_grad:
            # Backpropagate this block's objective now, so its activations are freed before the next block runs.
            # Autocast is for forward ops only; the backward uses the dtypes the forward chose. Under FSDP2 the guard
            # keeps the units still in this forward gathered (see lopt.engine.distributed.fsdp2_local_backward).
            with torch.autocast(block_output.device.type, enabled=False), fsdp2_local_backward(self.model):
                (weighted * self.loss_scale).backward()
            weighted = weighted.detach()
            for hook in list(self._local_backward_hooks.values()):  # the block's gradients are final now
                hook(index)
        self._pending_aux = weighted if self._pending_aux is None else self._pending_aux + weighted

    def _check_checkpointing(self) -> None:
        for start, _ in self.block_ranges[1:]:
            layer = self._parts.layers[start]
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if getattr(layer, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get(
                "use_reentrant"
            ):
                raise ValueError(
                    "LoPT needs non-reentrant activation checkpointing (the boundary input is detached, which "
                    "reentrant checkpointing cannot backpropagate through): call gradient_checkpointing_enable("
                    "gradient_checkpointing_kwargs={'use_reentrant': False})."
                )

    def register_local_backward_hook(self, hook) -> RemovableHandle:
        """Call `hook(block_index)` right after each early block's local backward, inside the forward: that block's
        gradients (and its aux head's) are final then, since no later loss reaches it. lopt.engine.in_backward steps
        the block's parameters there. Returns a handle whose `remove()` unregisters it."""
        handle = RemovableHandle(self._local_backward_hooks)
        self._local_backward_hooks[handle.id] = hook
        return handle

    def take_aux_loss(self) -> torch.Tensor | None:
        """lambda * mean_i aux_i summed over the training forwards since the last call, then cleared.

        Joint mode: it carries the graph; add it to the loss you backpropagate. Local mode: it is detached (its
        gradients are already in .grad); add it only to report the full objective. None if there was no
        training forward.
        """
        pending, self._pending_aux = self._pending_aux, None
        return pending

    def forward(self, *args, **kwargs):
        """The wrapped model's forward. With labels, `loss` = task_loss + lambda * mean(aux), whose backward gives
        exactly that objective's gradients in both modes; `task_loss` and `aux_loss` are detached copies."""
        self._pending_aux = None
        output = self.model(*args, **kwargs)
        task_loss = getattr(output, "loss", None)
        if task_loss is not None and self._pending_aux is not None:
            aux = self.take_aux_loss()
            output.loss = task_loss + aux
            output["task_loss"] = task_loss.detach()
            output["aux_loss"] = aux.detach()
            self.last_task_loss = task_loss.detach()
        return output

    # --- parameters ------------------------------------------------------------------------------
    def late_modules(self) -> list[nn.Module]:
        """The modules trained by the task loss: the last block, the final norm and the LM head."""
        start, end = self.block_ranges[-1]
        return [*self._parts.layers[start:end], self._parts.final_norm, self._parts.lm_head]

    def early_block_modules(self, index: int) -> list[nn.Module]:
        start, end = self.block_ranges[index]
        return list(self._parts.layers[start:end])

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Per block, the trainable parameters its own loss trains: early block i's layers and reconstruction head
        (block 0 also the embedding, unless it is tied to the LM head), then the last block's late modules (a tied
        matrix there). A gradient predictor belongs to the block after its boundary, whose backward trains it."""
        late = [p for module in self.late_modules() for p in module.parameters() if p.requires_grad]
        late_ids = {id(p) for p in late}
        predictors_shift = 1 if self.lopt_config.uses_synthetic_gradient else 0
        modules_of = [self.early_block_modules(index) for index in range(self.num_boundaries)] + [[]]
        modules_of[0].append(self.embedding)
        for index, head in enumerate(self.aux_heads):
            modules_of[index + predictors_shift].append(head)
        blocks = []
        for modules in modules_of:
            params = {
                id(p): p for m in modules for p in m.parameters() if p.requires_grad and id(p) not in late_ids
            }
            blocks.append(list(params.values()))
        blocks[-1] = list({id(p): p for p in late}.values()) + blocks[-1]
        return blocks

    @property
    def embedding(self) -> nn.Module:
        return self._parts.embedding

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self._parts.layers)

    # --- the plain model back ------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """The wrapped model itself. While this LoPTModel is alive, training it still trains with LoPT."""
        return self.model

    def unload(self) -> nn.Module:
        """Remove the hooks and return the plain model (aux heads are dropped)."""
        for handle in self._block_hook_handles + self._hook_handles:
            handle.remove()
        self._block_hook_handles, self._hook_handles = [], []
        return self.model

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """A standard HF checkpoint (safetensors, no aux keys), written atomically. Under torch.distributed only rank 0
        writes (as transformers does): call it on every rank."""
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return  # never an empty folder put in place beside rank 0's
        kwargs.setdefault("safe_serialization", True)
        atomic_directory_write(save_directory, lambda tmp: save_checkpoint_files(self.model, tmp, **kwargs))

    def save_aux_heads(self, directory: str | os.PathLike) -> str:
        """Aux heads and the LoPT config, for resuming training."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, AUX_HEADS_NAME)
        state = {k: v.detach().contiguous().cpu() for k, v in self.aux_heads.state_dict().items()}
        tmp = path + ".tmp"
        save_file(state, tmp, metadata={"num_heads": str(len(self.aux_heads))})
        os.replace(tmp, path)
        if self.anchor is not None:  # the pretrained reference: a resumed run must anchor to the same states
            reference = os.path.join(directory, ANCHOR_REFERENCE_NAME)
            save_file(self.anchor.state_dict(), reference + ".tmp")
            os.replace(reference + ".tmp", reference)
        self.lopt_config.save_pretrained(directory)
        return path

    def load_aux_heads(self, directory: str | os.PathLike) -> None:
        path = os.path.join(directory, AUX_HEADS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No aux heads at {path!r}: expected a file written by save_aux_heads().")
        state = load_file(path)
        saved_heads = len({key.split(".")[0] for key in state})
        try:
            self.aux_heads.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"Aux heads in {path!r} ({saved_heads} heads) do not fit this model ({len(self.aux_heads)} heads, "
                f"block_ranges={self.block_ranges}): resume with the num_blocks/boundaries of that run."
            ) from err
        if self.anchor is not None:
            reference = os.path.join(directory, ANCHOR_REFERENCE_NAME)
            if not os.path.isfile(reference):
                raise FileNotFoundError(
                    f"No anchor reference at {reference!r}: this checkpoint was not written by an anchor run."
                )
            self.anchor.load_state_dict(load_file(reference))

    def extra_repr(self) -> str:
        c = self.lopt_config
        return (
            f"block_ranges={self.block_ranges}, backward={c.backward!r}, aux_objective={c.aux_objective!r}, "
            f"aux_weight={c.aux_weight}"
        )


def untie_embeddings(hf_model: nn.Module, parts: DecoderParts) -> None:
    """Give the LM head its own weight so the task gradient cannot reach the (early) embedding: the authors' setting
    (`LoPTConfig(untie_embeddings=True)`), the freeze baseline's and block-parallel's (embedding and head on two
    ranks). Costs one more vocab x hidden matrix, and the model then saves untied."""
    if parts.lm_head.weight is not parts.embedding.weight:
        return
    tied = parts.embedding.weight
    parts.lm_head.weight = nn.Parameter(tied.detach().clone(), requires_grad=tied.requires_grad)
    for config in {id(c): c for c in (hf_model.config, hf_model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def get_lopt_model(model: nn.Module, config: LoPTConfig | None = None) -> LoPTModel:
    """Wrap a transformers causal LM (optionally already wrapped by PEFT) for LoPT training.

    Everything is validated before the model is touched. A tied embedding and LM head stay one parameter (trained
    with the late group, see lopt.engine.optim.param_groups), so the model saves in its base's shape; with
    `config.untie_embeddings` the head gets its own copy first, the only change LoPT makes to the model itself.
    Apply PEFT (`get_peft_model`) first, then LoPT.
    """
    config = LoPTConfig() if config is None else config
    if not isinstance(config, LoPTConfig):
        raise TypeError(
            f"config must be a LoPTConfig, got {type(config).__name__}: use LoPTConfig(**your_dict)."
        )
    if isinstance(model, LoPTModel):
        raise TypeError("This model is already a LoPTModel; call get_lopt_model on the plain model once.")
    parts = find_decoder_parts(model)
    block_ranges = config.block_ranges(parts.num_layers)
    if not hasattr(parts.embedding, "weight") or not hasattr(parts.lm_head, "weight"):
        raise TypeError(f"{type(model).__name__}: the embedding and LM head must have a `.weight`.")
    if config.untie_embeddings:
        untie_embeddings(unwrap_peft(model), parts)
    return LoPTModel(model, config, parts, block_ranges)
