"""Data-parallel and sharded LoPT: what DistributedDataParallel and FSDP2 cannot do for it, done by hand.

DDP syncs a parameter's gradient when autograd produces it during the backward of DDP's forward output. LoPT's
early parameters (embedding, early blocks: everything that requires grad and is not in `late_modules()`) do not
fit that:
- local mode backpropagates each early block INSIDE the forward (`LoPTModel._end_early_block`): the reducer would
  see their gradients mid-forward and fail ("marked ready twice", bucket errors);
- joint mode backpropagates them through the aux loss, which is not part of DDP's output (the boundary is
  detached): with `find_unused_parameters=True` (the transformers Trainer's default) DDP marks them unused at the
  end of the forward and then fails with "marked ready twice" when their gradients arrive.
So in both modes DDP ignores the early parameters, and we average their gradients ourselves once per optimizer
step. The aux heads live outside the module DDP wraps, so DDP never sees them: we broadcast their initial weights
from rank 0 and average their gradients too. DDP syncs the rest (the last block, final norm and LM head) as usual.

Use (the trainer mixin does this for you):

    sync = LoPTGradientSync(lopt_model)   # after get_lopt_model, BEFORE the model is wrapped in DDP
    ...
    sync.sync_gradients()                 # after the last backward of each optimizer step, before clipping

FSDP2 (`fully_shard`): `fully_shard_lopt_model`, with `LoPTGradientSync(lopt_model, sync_early=False)` for the aux
heads; why local mode is correct under it is explained above `fsdp2_local_backward`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

# Flatten at most this many elements into one collective (bounds the extra memory of the flat copy).
_BUCKET_ELEMENTS = 32 * 1024 * 1024


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def early_named_parameters(lopt_model) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter outside `late_modules()`, names relative to the module
    that DDP wraps (`lopt_model.model`)."""
    late = {id(p) for module in lopt_model.late_modules() for p in module.parameters()}
    return [(n, p) for n, p in lopt_model.model.named_parameters() if p.requires_grad and id(p) not in late]


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones through a copy)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device if tensor.device.type == "cpu" else torch.device("cpu")


def _buckets(tensors: list[torch.Tensor]):
    """Groups of tensors with the same dtype and device, each at most _BUCKET_ELEMENTS (one tensor may exceed it)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket, size = [], 0
        for t in group:
            if bucket and size + t.numel() > _BUCKET_ELEMENTS:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            yield bucket


def _flat_collective(tensors: list[torch.Tensor], collective) -> None:
    """Run `collective(flat)` on each bucket's flattened copy and write the result back in place."""
    for bucket in _buckets(tensors):
        device = _comm_device(bucket[0])
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in bucket])
        collective(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Every rank gets rank 0's values (in place)."""
    if is_distributed() and tensors:
        _flat_collective(list(tensors), lambda flat: dist.broadcast(flat, src=0))


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average over ranks, in place (SUM then divide: gloo has no AVG)."""
    if not is_distributed() or not tensors:
        return
    world = dist.get_world_size()

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)

    _flat_collective(list(tensors), mean)


def finish() -> None:
    """End a multi-process run: wait until every rank gets here (a barrier, the last collective).

    Also a guard against a torch 2.13 deadlock seen with gloo: when the process group is destroyed (at exit, or by
    a garbage-collected DDP reducer) right after a collective on Python-owned tensors, a gloo worker thread can
    still be releasing those tensors and wait for the GIL that the destroying thread holds. The barrier holds no
    Python tensors, and while every rank waits in it (GIL released) the earlier collectives are released.
    """
    if is_distributed():
        dist.barrier()


class LoPTGradientSync:
    """Keeps what DDP does not sync identical across ranks: marks the early parameters as ignored by DDP, and syncs
    them and the aux heads by hand. Build it after `get_lopt_model` and BEFORE the model is wrapped in DDP (DDP
    reads the ignore list when it is constructed). A no-op in a single process.

    `sync_early=False` leaves the early parameters to the wrapper (FSDP shards and reduces every parameter of the
    module it wraps); only the aux heads are synced then.
    """

    def __init__(self, lopt_model, sync_early: bool = True):
        self.lopt_model = lopt_model
        self.params: list[nn.Parameter] = []
        if not is_distributed():
            return
        early = early_named_parameters(lopt_model) if sync_early else []
        if early:
            module = lopt_model.model
            ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | {n for n, _ in early}
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, sorted(ignored)
            )
        aux = [p for p in lopt_model.aux_heads.parameters() if p.requires_grad]
        self.params = [p for _, p in early] + aux
        # DDP broadcasts rank 0's weights only for what it syncs; the rest must start equal too.
        broadcast_from_rank0(self.params)

    def sync_gradients(self) -> None:
        """Average the gradients DDP does not touch. Call once per optimizer step, after the last micro-batch's
        backward and before gradient clipping. A missing gradient counts as zero (on every rank alike)."""
        if not self.params:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_mean_([p.grad for p in self.params])


# --- FSDP2 (torch.distributed.fsdp.fully_shard) ------------------------------------------------------------------
# How FSDP2 sees LoPT's local backward, and why the guard below makes it correct.
#
# FSDP2 keeps one state per `fully_shard` unit (here: every decoder layer, and the HF model as the root, which owns
# the embedding, final norm and LM head). Its hooks assume "one forward of the root, then one backward":
#   pre-forward   all-gathers the unit's parameters (state FORWARD); non-root units reshard in their post-forward,
#                 the root keeps its parameters gathered until its own backward;
#   pre-backward  (a hook on the unit's outputs) all-gathers again; post-backward (a node on the unit's inputs)
#                 reduce-scatters the unit's gradients into the sharded `.grad` (summing with what is there) and
#                 reshards;
#   final callback (queued by the first pre-backward, run when that backward ends) treats the whole iteration as
#                 done: every unit not yet post-backward is post-backwarded (reduce-scatter + reshard), every
#                 state is set IDLE and the root's "forward in progress" marker is cleared.
# LoPT's local backward runs at a block boundary, in the middle of the root's forward. For the units of the block
# that just ended it is an ordinary complete backward (pre-backward gathers, post-backward reduce-scatters and
# reshards), and the gradients it produces are final: later losses never reach that block (the boundary is
# detached). The final callback, though, also closes the units that are still *open* in the forward: the root (it
# reduce-scatters the embedding's gradient, which is right, and reshards the root's parameters, which the rest of
# the forward - final norm, LM head - still needs: "mixed torch.Tensor and DTensor"), and any unit whose pre-forward
# already ran. So, around each local backward, `fsdp2_local_backward` remembers the units that are in the forward
# and afterwards gathers their parameters again and puts them back in the FORWARD state (with the root's marker),
# as if the local backward had not happened to them. Gradients stay right because FSDP2's reduce-scatter is a
# mean over ranks that is *added* to the sharded gradient: reducing block i's (or the embedding's) gradient at its
# boundary and the rest at the end sums to what one reduction would give. The cost is one extra all-gather of the
# root's parameters per boundary. This reads FSDP2's private state (torch 2.13); tests/test_distributed.py checks
# the result against one process.
@contextlib.contextmanager
def fsdp2_local_backward(model: nn.Module):
    """Context for a backward that runs inside `model`'s forward under FSDP2; a no-op for a model without it."""
    states = _fsdp2_states(model)
    if not states:
        yield
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    open_states = [s for s in states if s._training_state == TrainingState.FORWARD]
    open_groups = [
        g for s in open_states for g in s._fsdp_param_groups if g._training_state == TrainingState.FORWARD
    ]
    modules_to_run = [(s, set(s._modules_to_run_forward)) for s in open_states]
    forward_root = states[0]._state_ctx.iter_forward_root
    yield
    for state, modules in modules_to_run:
        state._training_state = TrainingState.FORWARD
        state._modules_to_run_forward.update(modules)
    for group in open_groups:
        group._training_state = TrainingState.FORWARD
        group.unshard()
        group.wait_for_unshard()
    states[0]._state_ctx.iter_forward_root = forward_root


def _fsdp2_states(model: nn.Module) -> list:
    """The FSDP2 states of `model`'s modules, each once, in module order (empty without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    states = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            if state not in states:
                states.append(state)
    return states


def fully_shard_decoder(model: nn.Module, **fsdp_kwargs) -> None:
    """FSDP2 for a transformers causal LM, in place: `fully_shard` on every decoder layer, then on the model itself
    (the root: embedding, final norm, LM head). `fsdp_kwargs` go to every call (mesh, mp_policy, ...)."""
    from torch.distributed.fsdp import fully_shard

    from lopt.engine.architectures import find_decoder_parts

    for layer in find_decoder_parts(model).layers:
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)


def fully_shard_lopt_model(lopt_model, **fsdp_kwargs) -> None:
    """`fully_shard_decoder` on a LoPTModel's wrapped model. The aux heads are not part of it and stay replicated:
    build `LoPTGradientSync(lopt_model, sync_early=False)` to keep them equal, and build the optimizer afterwards
    (the model's parameters become DTensors).

    LoPT's block-start hooks are then moved in front of FSDP2's pre-forward hooks, so that a block's first layer
    is entered (gathered, with its post-backward node) only after the local backward of the block before it, and
    sees the detached boundary: the local backward then involves only finished units and the root (see above).
    """
    fully_shard_decoder(lopt_model.model, **fsdp_kwargs)
    lopt_model.register_block_hooks(prepend=True)


def is_fsdp2_sharded(model: nn.Module) -> bool:
    return bool(_fsdp2_states(model))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict as plain CPU tensors on rank 0 ({} elsewhere). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict, e.g. a checkpoint's, into an FSDP2-sharded model; every rank passes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def unsharded_copy_on_rank0(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded, hook-free) copy of an FSDP2-sharded transformers model on rank 0, None on the others:
    for saving, evaluating and generating on one process. A collective: every rank calls it."""
    import copy

    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    cls = type(model)
    plain = cls.__mro__[cls._orig_cls_mro_index](copy.deepcopy(model.config))  # the class FSDP2 derived from
    plain.load_state_dict(state, assign=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(next(model.parameters()).device).train(model.training)


def split_dtensor_groups(groups: list[dict]) -> list[dict]:
    """Optimizer groups with sharded (DTensor) and plain parameters (the aux heads) apart, same settings: a fused or
    foreach optimizer step refuses a group that mixes them."""
    from torch.distributed.tensor import DTensor

    split = []
    for group in groups:
        for is_dtensor in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) == is_dtensor]
            if params:
                split.append({**group, "params": params})
    return split


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with this rank's shards as plain tensors (DTensor states -> local tensors)."""
    state = optimizer.state_dict()
    state["state"] = {
        i: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what `local_optimizer_state` saved on this rank (same world size and sharding): each state tensor of a
    DTensor parameter becomes a DTensor with that parameter's mesh and placements again."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    restored = {}
    for index, param_state in state["state"].items():
        param = params[int(index)]
        restored[index] = {
            k: DTensor.from_local(
                v.to(param.device),
                param.device_mesh,
                param.placements,
                shape=param.shape,
                stride=param.stride(),
            )
            if isinstance(param, DTensor) and torch.is_tensor(v) and v.dim() > 0
            else v
            for k, v in param_state.items()
        }
    optimizer.load_state_dict({**state, "state": restored})


def clip_grad_norm_(model_params, aux_params, max_norm: float) -> torch.Tensor:
    """Clip the model's gradients (DTensors under FSDP2, or plain) and the aux heads' (plain, replicated) with one
    global norm, as one process would over all of them; returns that norm. Two calls with one norm: a single
    foreach over DTensor and plain gradients fails."""
    model_params = [p for p in model_params if p.grad is not None]
    aux_params = [p for p in aux_params if p.grad is not None]
    norms = []
    for params in (model_params, aux_params):
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            norms.append(
                norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            )  # sharded: a collective
    if not norms:
        return torch.zeros(())
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))
    for params in (model_params, aux_params):
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.device))
    return total
