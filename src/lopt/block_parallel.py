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

How a rank runs "only its block" on an unchanged Hugging Face model: it calls the whole model's forward, but
  - decoder layers it does not own are replaced by pass-through modules that return their input in the layer's own
    output format (a tensor, or a tuple for e.g. Falcon: probed once with a two-token forward);
  - on ranks > 0 the layer just before the block returns the received hidden state instead (the block's input);
    the model is called with a zero `inputs_embeds` placeholder, so the embedding is not needed there;
  - on ranks < k-1 the layer just after the block raises a private exception carrying the block's output, which
    ends the forward (the final norm and LM head never run there).
The modules a rank does not own move to the meta device (no memory). At the end, rank 0 restores them, receives
the other ranks' tensors (send/recv of raw tensors in the state dict's order: no pickling) and saves one standard
Hugging Face checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lopt.architectures import find_decoder_parts, unwrap_peft
from lopt.arguments import DataArguments, LoPTArguments
from lopt.config import LoPTConfig
from lopt.distributed import finish
from lopt.heads import AuxHead, reconstruction_loss
from lopt.io import atomic_write_json
from lopt.launch import LaunchRequired
from lopt.model import untie_embeddings

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
        untie_embeddings(
            unwrap_peft(model), parts
        )  # the embedding (rank 0) and LM head (last rank) part ways
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
        raise LaunchRequired(k)  # one process per block: the CLI starts them (lopt.launch.launch_local)
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

    from lopt.data import make_collator, tokenize_rows
    from lopt.integrations.callbacks import peak_memory_bytes
    from lopt.loading import builtin_task_accuracy, load_model_and_tokenizer

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
        summary["heldout_exact_match"] = builtin_task_accuracy(saved, tokenizer, data_args.eval_samples, task)
    atomic_write_json(os.path.join(args.output_dir, "summary.json"), summary)
    print(f"lopt sft: saved a Hugging Face checkpoint to {args.output_dir}", file=sys.stderr)
    for key, value in summary.items():
        print(f"  {key}: {value}", file=sys.stderr)
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
        record["loss"] = record["task_loss"] + aux_weight * sum(aux) / len(
            aux
        )  # the LoPT objective, as in sft
        record["tokens_per_s"] = round(tokens_per_s, 2)
        record["peak_memory_bytes_per_rank"] = [int(s[1]) for s in per_rank_stats]
        lines.append(json.dumps(record))
    atomic_write_text(os.path.join(output_dir, "metrics.jsonl"), "\n".join(lines) + "\n")


def _save(model: nn.Module, tokenizer, config: LoPTConfig, args, early_lr, run_args: dict) -> None:
    """The same layout as `lopt sft`: HF checkpoint, tokenizer, lopt_config.json, training and CLI arguments."""
    from lopt.io import atomic_directory_write

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
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_args.json"), "w") as f:
            json.dump(training, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "lopt_args.json"), "w") as f:
            json.dump({**run_args, **training}, f, indent=2, sort_keys=True, default=str)

    atomic_directory_write(args.output_dir, write)
