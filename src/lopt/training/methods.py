"""Training methods by name: LoPT and the baselines it is compared with, prepared the same way for every command.

e2e         every parameter learns from the task loss (standard fine-tuning)
lopt / ll   LoPT, local backward (each early block backpropagates its aux loss as soon as it ends)
lopt_joint  LoPT, one joint backward over task + aux (the authors' formulation: same gradients, more memory)
freeze      embedding and first half (or the layers before `boundaries`) frozen, the rest fine-tuned end to end
            (the baseline LoPT must beat)
lora        PEFT LoRA adapters trained end to end
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lopt.engine.architectures import find_decoder_parts, unwrap_peft
from lopt.engine.config import LoPTConfig
from lopt.engine.model import untie_embeddings
from lopt.errors import UserError

METHOD_ALIASES = {"ll": "lopt"}
METHODS = ("lopt", "ll", "lopt_joint", "e2e", "freeze", "lora")


@dataclass
class PreparedModel:
    model: nn.Module  # what the trainer trains (PEFT-wrapped for lora)
    lopt_config: LoPTConfig | None  # set for LoPT methods: the trainer integration wraps the model with it
    method: str


def canonical_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"--method {method!r} is not one of {', '.join(METHODS)}.")
    return METHOD_ALIASES.get(method, method)


def prepare_model(
    model: nn.Module,
    method: str,
    num_blocks: int = 2,
    boundaries: list[int] | None = None,
    aux_weight: float = 10.0,
    aux_objective: str = "recon",
    anchor_weight: float = 1.0,
    anchor_dtype: str | None = None,
    task_weight: float = 1.0,
    aux_warmup_steps: int = 0,
    untie_embeddings: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list[str] = "all-linear",
    lopt_config: LoPTConfig | None = None,
    lora_config=None,
) -> PreparedModel:
    """Set up `model` for `method`. LoPT config errors (e.g. num_blocks > layers) are raised before any change.

    `lopt_config` (a full LoPTConfig) replaces the LoPT keyword arguments, and `lora_config` (a peft LoraConfig)
    the lora_* ones.
    """
    method = canonical_method(method)
    if method in ("lopt", "lopt_joint"):
        config = lopt_config or LoPTConfig(
            num_blocks=num_blocks,
            boundaries=boundaries,
            aux_weight=aux_weight,
            backward="joint" if method == "lopt_joint" else "local",
            aux_objective=aux_objective,
            anchor_weight=anchor_weight,
            anchor_dtype=anchor_dtype,
            task_weight=task_weight,
            aux_warmup_steps=aux_warmup_steps,
            untie_embeddings=untie_embeddings,
        )
        # Validate now (e.g. num_blocks > layers), before the trainer or the model is touched.
        config.block_ranges(find_decoder_parts(model).num_layers)
        return PreparedModel(model, config, method)
    if method == "freeze":
        freeze_early_layers(model, boundaries)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules
        if isinstance(targets, str) and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lora = lora_config or LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return PreparedModel(model, None, method)


def freeze_early_layers(model: nn.Module, boundaries: list[int] | None = None) -> None:
    """Freeze the embedding and the layers before the last boundary (default: LoPT k=2's midpoint), so the rest is
    what LoPT's last block trains; untie the LM head so it still trains."""
    parts = find_decoder_parts(model)
    config = LoPTConfig(num_blocks=2) if boundaries is None else LoPTConfig(boundaries=list(boundaries))
    first_trained = config.block_ranges(parts.num_layers)[-1][0]
    untie_embeddings(unwrap_peft(model), parts)
    late = {
        id(p)
        for m in (*parts.layers[first_trained:], parts.final_norm, parts.lm_head)
        for p in m.parameters()
    }
    for param in model.parameters():
        if id(param) not in late:
            param.requires_grad_(False)
