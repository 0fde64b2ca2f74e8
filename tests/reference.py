"""An independent oracle for the gradients of the LoPT objective. It does not import or call lopt.

The objective, for k blocks with boundaries at layers s_1 < ... < s_{k-1}, is

    L = CE(logits, labels) + lambda * mean_i MSE(head_i(h_{s_{i+1}}), h_{s_i}.detach())      (i = 0 .. k-2)

where h_j is the hidden state entering layer j (h_0 = the embedding output as the model computes it) and the
hidden state is detached at every boundary before the next block runs.

Instead of re-creating the detach scheme, this oracle uses what it implies: with a stop-gradient at every
boundary, each parameter is reached by exactly one term of L, and that term's gradient with respect to the
parameter is the same with or without the stop-gradients (they only cut paths *into earlier* blocks):

    * the last block, the final norm and the LM head   <- the task cross-entropy only;
    * block i (i < k-1) and aux head i                  <- lambda/(k-1) * aux_i only;
    * everything before layer 0 (embeddings, ...)       <- lambda/(k-1) * aux_0 only.

The "task" term (aux_i += task_weight * CE(lm_head(final_norm(h_{s_{i+1}})), labels)) fits the same scheme: the
norm and the head it reads through belong to the last block's group, which only the task cross-entropy may train,
so restricting each term's gradient to its own parameters is exactly "the lens weights are held fixed".

So one plain forward of the unmodified model (read-only hooks record h_j and the block outputs) and one
`torch.autograd.grad` per term, restricted to that term's parameters, give the exact gradients of L.

A tied embedding and LM head (one matrix W used twice, E = H = W) breaks "one term per parameter": W is reached by
aux_0 through the embedding and by the task cross-entropy through the head. The chain rule for a shared variable
gives dL/dW = dL/dE + dL/dH at E = H = W, so `tied_reference_gradients` unties a copy (two parameters holding W),
computes the gradients above, and adds the embedding's and the head's into the shared one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# model_type -> (decoder layer list, final norm, LM head), as attribute paths from the *ForCausalLM model.
PARTS: dict[str, tuple[str, str, str]] = {
    **dict.fromkeys(
        ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "stablelm"],
        ("model.layers", "model.norm", "lm_head"),
    ),
    "phi": ("model.layers", "model.final_layernorm", "lm_head"),
    "gpt2": ("transformer.h", "transformer.ln_f", "lm_head"),
    "gpt_neox": (
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        "lm_head",
    ),  # "embed_out" before transformers 5
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm", "lm_head"),
    "falcon": ("transformer.h", "transformer.ln_f", "lm_head"),
}


def split_layers(
    num_layers: int, num_blocks: int = 2, boundaries: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Block ranges: explicit boundaries, or sizes as even as possible with the extra layers in earlier blocks."""
    if boundaries is not None:
        starts = [0, *boundaries]
    else:
        starts, start = [], 0
        for i in range(num_blocks):
            starts.append(start)
            start += num_layers // num_blocks + (1 if i < num_layers % num_blocks else 0)
    return [(s, e) for s, e in zip(starts, [*starts[1:], num_layers])]


class ReferenceAuxHead(nn.Sequential):
    """LayerNorm(d) -> Linear(d, d/ratio) -> GELU -> Linear(d/ratio, d)."""

    def __init__(self, hidden_size: int, ratio: int = 4):
        bottleneck = max(1, hidden_size // ratio)
        super().__init__(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, bottleneck),
            nn.GELU(),
            nn.Linear(bottleneck, hidden_size),
        )

    def load_lopt_state(self, state: dict[str, torch.Tensor]) -> ReferenceAuxHead:
        """Copy the weights of a lopt head, whose modules are named norm / down / up."""
        with torch.no_grad():
            for index, name in ((0, "norm"), (1, "down"), (3, "up")):
                self[index].weight.copy_(state[f"{name}.weight"])
                self[index].bias.copy_(state[f"{name}.bias"])
        return self


def _get(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, in float32."""
    shifted = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted, ignore_index=-100)


def reference_gradients(
    model: nn.Module,
    model_type: str,
    heads: Sequence[nn.Module],
    block_ranges: Sequence[tuple[int, int]],
    aux_weight: float,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    anchor_states: Sequence[torch.Tensor] | None = None,
    anchor_weight: float = 1.0,
    task_weight: float | None = None,
) -> tuple[dict[str, torch.Tensor | None], list[torch.Tensor | None], torch.Tensor, list[torch.Tensor]]:
    """Gradients of the LoPT objective for `model` (a plain HF causal LM, possibly inside PEFT) in train mode.

    With `anchor_states` (the pretrained model's block outputs, see `pretrained_block_outputs`), aux_i gains
    `anchor_weight * MSE(block i output, anchor_states[i])`; with `heads=None` aux_i is that anchor term alone.
    With `task_weight`, aux_i gains `task_weight * CE(lm_head(final_norm(block i output)), labels)` (shifted, mean
    over labelled tokens, like the task loss).

    Returns (model grads by parameter name, one list of grads per head in parameters() order, task loss, aux
    losses). A gradient is None where the objective does not reach the parameter. Only parameters with
    requires_grad are differentiated.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers_path, norm_path, head_path = PARTS[model_type]
    layers = _get(base, layers_path)
    num_boundaries = len(block_ranges) - 1
    assert heads is None or len(heads) == num_boundaries
    assert heads is not None or anchor_states is not None or task_weight is not None

    block_inputs: dict[int, torch.Tensor] = {}
    block_outputs: dict[int, torch.Tensor] = {}

    def record_input(module, args, kwargs):
        block_inputs[0] = _hidden_in(args, kwargs)

    def record_output(index):
        def hook(module, args, output):
            block_outputs[index] = _hidden_out(output)

        return hook

    handles = [layers[0].register_forward_pre_hook(record_input, with_kwargs=True)]
    for index, (_, end) in enumerate(block_ranges[:-1]):
        handles.append(layers[end - 1].register_forward_hook(record_output(index)))
    try:
        logits = model(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    for index in range(1, len(block_ranges)):
        block_inputs[index] = block_outputs[index - 1]

    task = causal_lm_loss(logits, labels)
    auxes = []
    for i in range(num_boundaries):
        aux = torch.zeros((), dtype=torch.float32)
        if heads is not None:
            aux = aux + F.mse_loss(heads[i](block_outputs[i]).float(), block_inputs[i].detach().float())
        if anchor_states is not None:
            aux = aux + anchor_weight * F.mse_loss(block_outputs[i].float(), anchor_states[i].float())
        if task_weight is not None:
            lens = _get(base, head_path)(_get(base, norm_path)(block_outputs[i]))
            aux = aux + task_weight * causal_lm_loss(lens, labels)
        auxes.append(aux)
    scale = aux_weight / num_boundaries

    # Partition the parameters by the one term of the objective that reaches each of them.
    block_of_layer = {layer: b for b, (s, e) in enumerate(block_ranges) for layer in range(s, e)}
    layer_prefix = {f"{layers_path}.{j}.": block_of_layer[j] for j in range(len(layers))}
    late_prefixes = (f"{norm_path}.", f"{head_path}.")
    owner: dict[str, int] = {}  # parameter name (of `base`) -> block index whose term reaches it
    for name, _ in base.named_parameters():
        block = next((b for prefix, b in layer_prefix.items() if name.startswith(prefix)), None)
        if block is None:
            block = len(block_ranges) - 1 if name.startswith(late_prefixes) else 0  # before layer 0: aux_0
        owner[name] = block

    named = dict(base.named_parameters())
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(named)
    terms = [scale * aux for aux in auxes] + [task]
    head_grads: list[list[torch.Tensor | None]] = []
    for block, term in enumerate(terms):
        names = [n for n, b in owner.items() if b == block and named[n].requires_grad]
        extra = list(heads[block].parameters()) if heads is not None and block < num_boundaries else []
        found = torch.autograd.grad(
            term, [named[n] for n in names] + extra, retain_graph=True, allow_unused=True
        )
        grads.update(zip(names, found[: len(names)]))
        if extra:
            head_grads.append(list(found[len(names) :]))
    return grads, head_grads, task.detach(), [aux.detach() for aux in auxes]


@torch.no_grad()
def pretrained_block_outputs(
    model: nn.Module, model_type: str, block_ranges: Sequence[tuple[int, int]], input_ids: torch.Tensor
) -> list[torch.Tensor]:
    """The output of every early block (the last layer of blocks 0..k-2) of a plain model, in eval mode."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = _get(base, PARTS[model_type][0])
    outputs: dict[int, torch.Tensor] = {}

    def record(index):
        def hook(module, args, output):
            outputs[index] = _hidden_out(output)

        return hook

    handles = [
        layers[end - 1].register_forward_hook(record(i)) for i, (_, end) in enumerate(block_ranges[:-1])
    ]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [outputs[i] for i in range(len(block_ranges) - 1)]


def tied_reference_gradients(model: nn.Module, model_type: str, *args, **kwargs):
    """`reference_gradients` for a model whose embedding and LM head share one weight W: the same return values,
    with W's gradient (under the embedding's name, the one `named_parameters()` gives) = the embedding's gradient
    + the head's gradient of an untied copy. `model` is untied in place: pass a copy."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    assert head.weight is embedding.weight, "the model's embedding and LM head are not tied"
    names = {id(module): name for name, module in base.named_modules()}
    shared = embedding.weight
    head.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    grads, head_grads, task, auxes = reference_gradients(model, model_type, *args, **kwargs)
    embedding_name, head_name = f"{names[id(embedding)]}.weight", f"{names[id(head)]}.weight"
    parts = [g for g in (grads.pop(embedding_name), grads.pop(head_name)) if g is not None]
    grads[embedding_name] = sum(parts[1:], parts[0]) if parts else None
    return grads, head_grads, task, auxes
