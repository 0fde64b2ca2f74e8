"""The saved-bytes meter: the peak bytes autograd saves for backward (`SavedTensorMeter`, `measure_saved_tensor_peak`),
the activation number of `lopt bench`, `lopt plan` and `lopt compare`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn


class _SavedBox:
    """What autograd keeps instead of the tensor: it dies exactly when autograd drops the saved tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _is_parameter(tensor: torch.Tensor) -> bool:
    # Weights are not activations. `linear` saves `weight.t()`, a view, so look at the view's base too.
    # Leaf tensors that require grad cover parameters that are not nn.Parameter objects (e.g. flat params).
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)


class SavedTensorMeter:
    """Context manager counting the bytes of tensors saved for backward: `live` now, `peak` since entering.

    Accounting is per storage, not per tensor: a storage is counted once, with its full `nbytes`, for as long
    as at least one saved tensor referencing it is alive. Why: several ops often save the same tensor (q, k
    and v projections all save the normed input) or views of one buffer; counting each would overstate the
    memory, while the whole storage stays allocated as long as any view of it is saved (a saved slice keeps
    its entire buffer alive), so `nbytes` of the storage is what is really held. Tensors that are parameters
    (or views of them, or leaf tensors requiring grad) are excluded unless `include_parameters=True`.

    `dedup=False` counts every saved tensor's storage again each time it is saved (an upper bound, and
    what a naive meter reports; e.g. cross-entropy's log-softmax output is saved twice, by log_softmax and
    by nll_loss), for comparison only.

    Gradient checkpointing (non-reentrant): each checkpointed region saves its inputs through autograd
    (counted here), while the tensors it saves inside the region go through the checkpoint's own innermost
    hooks and are recomputed in the backward: those recomputed tensors (one region at a time, transient) are
    invisible to this meter.
    """

    def __init__(self, include_parameters: bool = False, dedup: bool = True):
        self.include_parameters = include_parameters
        self.dedup = dedup
        self.live = 0
        self.peak = 0
        self.num_saved = 0  # tensors packed (counted or not), for diagnostics
        self._storages: dict[tuple, list[int]] = {}  # key -> [saved boxes alive, nbytes counted]
        self._lock = threading.RLock()  # the backward may run on another thread; RLock: a finalizer can fire
        self._hooks = None  # while _pack holds the lock, on the same thread

    def _pack(self, tensor: torch.Tensor) -> _SavedBox:
        # Keep a detached alias (same storage): an op's saved *output* carries the grad_fn that saves it, and
        # holding it as is would make a node -> box -> tensor -> node cycle that is never freed (the
        # backward breaks it, a graph dropped without backward would leak). Unpacking re-attaches autograd
        # metadata itself, as torch.utils.checkpoint's own hooks rely on.
        box = _SavedBox(tensor.detach())
        self.num_saved += 1
        if not self.include_parameters and _is_parameter(tensor):
            return box
        try:
            storage = tensor.untyped_storage()
            nbytes, ptr = storage.nbytes(), storage._cdata
        except (RuntimeError, NotImplementedError):  # sparse / storage-less subclasses: count the elements
            nbytes, ptr = tensor.nelement() * tensor.element_size(), 0
        if nbytes == 0:
            return box
        # The storage's identity (its StorageImpl, shared by every view) is unique while the box keeps it alive.
        # It exists on fake and meta tensors too, which have no data pointer: `lopt plan` meters fake steps.
        key = ("storage", ptr) if ptr and self.dedup else ("box", id(box))
        with self._lock:
            entry = self._storages.get(key)
            if entry is None:
                self._storages[key] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            else:
                entry[0] += 1
        weakref.finalize(box, self._release, key)  # must not reference box, or it would never be freed
        return box

    def _release(self, key: tuple) -> None:
        with self._lock:
            entry = self._storages[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self._storages[key]
                self.live -= entry[1]

    @staticmethod
    def _unpack(box: _SavedBox) -> torch.Tensor:
        return box.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None


def measure_saved_tensor_peak(
    fn: Callable[[], object], include_parameters: bool = False, dedup: bool = True
) -> int:
    """Peak bytes saved for backward while `fn()` runs (give it forward + backward). See SavedTensorMeter."""
    with SavedTensorMeter(include_parameters=include_parameters, dedup=dedup) as meter:
        fn()
    return meter.peak
