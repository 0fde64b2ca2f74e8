"""One rank's part of block-parallel LoPT (`BlockStage`, run by lopt.training.block_parallel): its
block, aux head, optimizer and schedule, the hidden states it receives and sends, and the assembly of the trained
model on rank 0.

How a rank runs "only its block" on an unchanged Hugging Face model: it calls the whole model's forward, but
  - decoder layers it does not own are replaced by pass-through modules that return their input in the layer's own
    output format (a tensor, or a tuple for e.g. Falcon: probed once with a two-token forward);
  - on ranks > 0 the layer just before the block returns the received hidden state instead (the block's input);
    the model is called with a zero `inputs_embeds` placeholder, so the embedding is not needed there;
  - on ranks < k-1 the layer just after the block raises a private exception carrying the block's output, which
    ends the forward (the final norm and LM head never run there).
The modules a rank does not own move to the meta device (no memory). At the end, rank 0 restores them and receives
the other ranks' tensors (send/recv of raw tensors in the state dict's order: no pickling): one whole model, which
lopt.training.block_parallel saves as a standard Hugging Face checkpoint.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from lopt.engine.architectures import find_decoder_parts, unwrap_peft
from lopt.engine.config import LoPTConfig
from lopt.engine.heads import AuxHead, reconstruction_loss
from lopt.engine.model import untie_embeddings

# Sends a rank may have in flight before it waits for the oldest (bounds the memory of pending activations).
MAX_PENDING_SENDS = 2


class _StopForward(Exception):
    """Raised by the pass-through after a rank's block: carries the block's output out of the model's forward."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class _PassThrough(nn.Module):
    """Stands in for a decoder layer this rank does not own.

    mode "skip": return the input hidden state unchanged; "inject": return `stage.received` (the block input from
    the previous rank) instead; "stop": raise _StopForward with the input (the output of this rank's block).
    The result has the real layer's output format: the tensor, or a tuple of `tuple_len` with the tensor first.
    """

    def __init__(self, mode: str, tuple_len: int | None, stage: BlockStage):
        super().__init__()
        self.mode, self.tuple_len = mode, tuple_len
        self._stage = [stage]  # a list, so nn.Module does not register the stage as a submodule

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.mode == "stop":
            raise _StopForward(hidden)
        if self.mode == "inject":
            hidden = self._stage[0].received
        return hidden if self.tuple_len is None else (hidden, *([None] * (self.tuple_len - 1)))


def _layer_output_tuple_len(model: nn.Module, layer: nn.Module) -> int | None:
    """None if the decoder layer returns the hidden state itself (most transformers 5 models), else the length of
    the tuple it returns. Found by one no-grad forward of two tokens, stopped right after `layer`."""
    found: dict[str, int | None] = {}

    def hook(module, args, output):
        found["len"] = None if isinstance(output, torch.Tensor) else len(output)
        raise _StopForward(output)

    handle = layer.register_forward_hook(hook)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "len" not in found:
        raise TypeError(f"{type(model).__name__}: the forward never reached its first decoder layer.")
    return found["len"]


def make_aux_heads(hidden_size: int, num_heads: int, ratio: int, seed: int) -> list[AuxHead]:
    """All k-1 aux heads, built in order from `seed`: every rank builds the same ones and keeps its own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [AuxHead(hidden_size, ratio) for _ in range(num_heads)]


def _in_backward_pass() -> bool:
    return torch._C._current_graph_task_id() != -1


def _to_wire(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor


class BlockStage:
    """This rank's part of block-parallel LoPT: its block, aux head (early ranks), optimizer and schedule.

    Build it on every rank with the same model (same weights), config and arguments; then `train(...)` with the
    same micro-batches on every rank, and `assemble_on_rank0()` to get the trained model back on rank 0.
    """

    def __init__(
        self,
        model: nn.Module,
        lopt_config: LoPTConfig,
        *,
        learning_rate: float,
        early_learning_rate: float | None = None,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        num_steps: int,
        warmup_steps: int = 0,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        bf16: bool = False,
    ):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "block-parallel LoPT needs torch.distributed initialised (launch with torchrun)."
            )
        if lopt_config.backward != "local":
            raise ValueError(
                "block-parallel LoPT is local by construction: use LoPTConfig(backward='local')."
            )
        if lopt_config.aux_objective != "recon" or lopt_config.aux_warmup_steps:
            raise ValueError(
                f"block-parallel LoPT supports only aux_objective='recon' without aux_warmup_steps, not "
                f"aux_objective={lopt_config.aux_objective!r}, aux_warmup_steps={lopt_config.aux_warmup_steps}."
            )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.model, self.config = model, lopt_config
        self.device = torch.device(device)
        self.accumulation = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.bf16 = bf16
        parts = find_decoder_parts(model)
        self.parts = parts
        self.block_ranges = lopt_config.block_ranges(parts.num_layers)
        if len(self.block_ranges) != self.world:
            raise ValueError(
                f"block-parallel LoPT runs one process per block: {len(self.block_ranges)} blocks but "
                f"{self.world} processes (use torchrun --nproc_per_node {len(self.block_ranges)})."
            )
        self.first, self.last = self.rank == 0, self.rank == self.world - 1
        # Always untied, whatever lopt_config.untie_embeddings says: the embedding (rank 0) and the LM head (last rank)
        # live on two ranks, and a shared matrix would need its two gradients summed across them every step.
        untie_embeddings(unwrap_peft(model), parts)
        self.hidden_size = parts.embedding.weight.shape[-1]
        self.wire_dtype = parts.embedding.weight.dtype  # boundary activations travel in the weights' dtype
        self.owner = self._owners()  # state-dict name -> rank; the dict's order is the fixed transfer order
        tuple_len = _layer_output_tuple_len(model, parts.layers[0])

        # Keep only this rank's block. Modules owned elsewhere move to the meta device (shape and dtype, no memory);
        # layers are swapped for pass-throughs and kept here, so rank 0 can restore them to assemble the checkpoint.
        start, end = self.block_ranges[self.rank]
        self._removed_layers: dict[int, nn.Module] = {}
        for i in range(parts.num_layers):
            if start <= i < end:
                continue
            mode = "inject" if i == start - 1 else "stop" if i == end else "skip"
            self._removed_layers[i] = parts.layers[i].to("meta")
            parts.layers[i] = _PassThrough(mode, tuple_len, self)
        if not self.last:
            parts.final_norm.to("meta")
            parts.lm_head.to("meta")
        if not self.first:
            parts.embedding.to("meta")  # ranks > 0 call the model with a placeholder inputs_embeds
        for name, param in model.named_parameters():  # train only what this rank owns
            param.requires_grad_(param.requires_grad and self.owner.get(name) == self.rank)
        model._apply(lambda t: t if t.is_meta else t.to(self.device))  # `.to()` would refuse the meta tensors
        model.train()

        self.received: torch.Tensor | None = None  # this micro-batch's block input (ranks > 0)
        self._block_input: torch.Tensor | None = None  # rank 0: the embedding output, captured below
        if self.first:
            parts.layers[0].register_forward_pre_hook(self._capture_block_input, with_kwargs=True)
        self.aux_head = None
        params = [p for p in model.parameters() if p.requires_grad]
        if not self.last:
            heads = make_aux_heads(self.hidden_size, self.world - 1, lopt_config.aux_head_ratio, seed)
            self.aux_head = heads[self.rank].to(self.device)
            params += list(self.aux_head.parameters())
        # The LoPT groups: the last block, final norm and LM head at `learning_rate`; everything else at the
        # early rate. Each rank has one of the two.
        lr = learning_rate if self.last or early_learning_rate is None else early_learning_rate
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup_steps, num_steps)
        self.num_steps = num_steps
        self._pending_sends: collections.deque = collections.deque()

    # --- ownership ------------------------------------------------------------------------------------------------
    def _owners(self) -> dict[str, int]:
        """Which rank trains each state-dict entry: layer i -> its block's rank; final norm, LM head -> last rank;
        everything else (embedding, position embeddings, ...) -> rank 0."""
        prefixes: list[tuple[str, int]] = []
        module_rank = {id(self.parts.final_norm): self.world - 1, id(self.parts.lm_head): self.world - 1}
        for rank, (start, end) in enumerate(self.block_ranges):
            for i in range(start, end):
                module_rank[id(self.parts.layers[i])] = rank
        for name, module in self.model.named_modules():
            if id(module) in module_rank:
                prefixes.append((name + ".", module_rank[id(module)]))
        owner = {}
        for key in self.model.state_dict():
            owner[key] = next((rank for prefix, rank in prefixes if key.startswith(prefix)), 0)
        return owner

    # --- one micro-batch --------------------------------------------------------------------------------------------
    def _capture_block_input(self, module, args, kwargs):
        if torch.is_grad_enabled() and not _in_backward_pass():  # not in a checkpoint replay
            self._block_input = args[0] if args else kwargs["hidden_states"]

    def _forward(self, batch: dict[str, torch.Tensor]):
        """This rank's part of the model's forward: (block output, None) on early ranks, (None, task loss) last."""
        kwargs = {"attention_mask": batch["attention_mask"], "use_cache": False}
        if self.first:
            kwargs["input_ids"] = batch["input_ids"]
        else:
            batch_size, seq_len = batch["input_ids"].shape
            kwargs["inputs_embeds"] = torch.zeros(
                batch_size, seq_len, self.hidden_size, dtype=self.wire_dtype, device=self.device
            )
        if self.last:
            kwargs["labels"] = batch["labels"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            try:
                output = self.model(**kwargs)
            except _StopForward as stop:
                return stop.hidden, None
        return None, output.loss

    def _receive(self, batch: dict[str, torch.Tensor]) -> None:
        batch_size, seq_len = batch["input_ids"].shape
        buffer = torch.empty(batch_size, seq_len, self.hidden_size, dtype=self.wire_dtype, device=self.device)
        dist.recv(buffer, src=self.rank - 1)
        self.received = buffer

    def _send(self, hidden: torch.Tensor) -> None:
        """Send a detached copy to the next rank without waiting; keep it alive until the send completes."""
        while len(self._pending_sends) >= MAX_PENDING_SENDS:
            self._pending_sends.popleft()[0].wait()
        out = hidden.detach().to(self.wire_dtype).contiguous()
        self._pending_sends.append((dist.isend(out, dst=self.rank + 1), out))

    def micro_step(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward and backward of one micro-batch on this rank's block; returns its (unscaled) loss."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if not self.first:
            self._receive(batch)
        block_output, task_loss = self._forward(batch)
        if self.last:
            (task_loss / self.accumulation).backward()
            return float(task_loss.detach())
        self._send(block_output)
        block_input = self._block_input if self.first else self.received
        aux = reconstruction_loss(self.aux_head, block_output, block_input)
        weight = self.config.aux_weight / (self.world - 1)
        (aux * (weight / self.accumulation)).backward()
        self._block_input = None
        return float(aux.detach())

    def optimizer_step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def finish_sends(self) -> None:
        while self._pending_sends:
            self._pending_sends.popleft()[0].wait()

    # --- training loop ----------------------------------------------------------------------------------------------
    def train(self, micro_batches: Iterable[dict], on_step=None) -> dict:
        """Run `num_steps` optimizer steps of `gradient_accumulation_steps` micro-batches each (the iterator must
        yield at least that many, identical on every rank). Returns this rank's per-step losses (aux loss on early
        ranks, task loss on the last), tokens processed and wall time. `on_step(step, loss)` is called after each
        optimizer step."""
        batches = iter(micro_batches)
        losses, tokens = [], 0
        dist.barrier()  # start the clock together
        start = time.perf_counter()
        for step in range(1, self.num_steps + 1):
            total = 0.0
            for _ in range(self.accumulation):
                batch = next(batches)
                tokens += int(batch["attention_mask"].sum())
                total += self.micro_step(batch)
            self.optimizer_step()
            losses.append(total / self.accumulation)
            if on_step is not None:
                on_step(step, losses[-1])
        self.finish_sends()
        elapsed = time.perf_counter() - start
        return {"losses": losses, "tokens": tokens, "seconds": elapsed}

    # --- results on rank 0 ------------------------------------------------------------------------------------------
    def gather_on_rank0(self, values: list[float]) -> list[list[float]] | None:
        """Every rank's list of floats (same length on every rank) on rank 0, by send/recv; None elsewhere."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        if not self.first:
            dist.send(tensor, dst=0)
            return None
        out = [values]
        for src in range(1, self.world):
            buffer = torch.empty_like(tensor)
            dist.recv(buffer, src=src)
            out.append(buffer.cpu().tolist())
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    @torch.no_grad()
    def assemble_on_rank0(self) -> nn.Module | None:
        """Rank 0: the whole trained model (the original modules back in place, every tensor from its owner).
        Other ranks send their tensors and return None. Every rank must call it; afterwards this stage is spent.
        Only state-dict entries travel: non-persistent buffers of restored modules (none in most transformers 5
        models) are uninitialised, so save the model and load it back to use it (as `lopt sft` does)."""
        self.finish_sends()
        comm = self._comm_device()
        if self.first:
            for i, layer in self._removed_layers.items():
                self.parts.layers[i] = layer.to_empty(device=self.device)
            if not self.last:
                self.parts.final_norm.to_empty(device=self.device)
                self.parts.lm_head.to_empty(device=self.device)
        state = self.model.state_dict()
        for name, owner in self.owner.items():  # the same order on every rank
            if owner == 0 or (not self.first and owner != self.rank):
                continue
            if owner == self.rank:
                dist.send(_to_wire(state[name]).detach().to(comm).contiguous(), dst=0)
            else:
                target = state[name]
                buffer = torch.empty(target.shape, dtype=_to_wire(target).dtype, device=comm)
                dist.recv(buffer, src=owner)
                target.copy_(buffer.to(target.dtype))
        if not self.first:
            return None
        for param in self.model.parameters():
            param.requires_grad_(True)
        return self.model
