"""`LoPTConfig`: every knob of the LoPT method in one validated, JSON-serialisable dataclass."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from lopt.io import atomic_write_json

CONFIG_NAME = "lopt_config.json"
BACKWARD_MODES = ("local", "joint")
# Each objective is a sum of terms: "recon" (the paper's), "anchor" (lopt.engine.anchor), "task" (lopt.engine.lens),
# "synth" (a predicted task gradient, lopt.engine.synthetic).
AUX_OBJECTIVES = (
    "recon",
    "anchor",
    "recon+anchor",
    "task",
    "recon+task",
    "task+anchor",
    "synth",
    "synth+anchor",
)
ANCHOR_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoPTConfig:
    num_blocks: int = field(
        default=2,
        metadata={"help": "Number of contiguous layer blocks (k). k=2 puts the boundary at the midpoint."},
    )
    boundaries: list[int] | None = field(
        default=None,
        metadata={"help": "Layer indices where a new block starts, e.g. [4, 8]. Overrides num_blocks."},
    )
    aux_weight: float = field(
        default=10.0,
        metadata={"help": "lambda: objective = task_loss + lambda * mean over boundaries of aux_i."},
    )
    backward: str = field(
        default="local",
        metadata={
            "help": "'local': each early block backpropagates its aux loss as soon as its forward ends "
            "(frees its activations). 'joint': one backward over the whole objective (the authors' code)."
        },
    )
    aux_head_ratio: int = field(
        default=4,
        metadata={"help": "Bottleneck ratio of the auxiliary head: hidden -> hidden/ratio -> hidden."},
    )
    aux_objective: str = field(
        default="recon",
        metadata={
            "help": "Local objective of each early block. 'recon': the paper's (an aux head reconstructs the "
            "block's input from its output). 'anchor': MSE between the block's output and the pretrained model's "
            "hidden state at the same boundary for the same input. 'task': next-token cross-entropy on the batch's "
            "labels of the block's output read through the model's own final norm and LM head, held fixed (a "
            "'logit lens'; needs labels, so SFT only). 'synth': the task loss's gradient at the block's output, "
            "predicted by a small head that learns it from the later block's backward (synthetic gradients; any "
            "trainer). Sums: 'recon+anchor', 'recon+task', 'task+anchor', 'synth+anchor', each "
            "non-recon term times its weight."
        },
    )
    synth_weight: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the predicted gradient ('synth', 'synth+anchor'). Not multiplied by lambda: at 1.0 a "
            "perfect predictor gives the early blocks exactly end-to-end's gradient."
        },
    )
    anchor_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the anchor term inside aux_i ('anchor' and 'recon+anchor')."},
    )
    task_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the task (logit-lens cross-entropy) term inside aux_i ('task', 'recon+task', ...)."
        },
    )
    synth_lr: float | None = field(
        default=1e-3,
        metadata={
            "help": "Learning rate of the gradient predictors ('synth', 'synth+anchor'): their own AdamW group "
            "('predictor', see lopt.engine.optim.param_groups), since they start from nothing and must keep up with "
            "the later block. None: the main rate. 1e-3: on SmolLM2-135M with the model held fixed, a predictor "
            "reached a held-out cosine of 0.8 with the true boundary gradient in 25 steps at 1e-3 "
            "(scripts/gradient_predictability.py)."
        },
    )
    aux_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "For the first N optimizer steps the local objective trains only the aux heads: the block outputs "
            "are detached before it, so the embedding and early blocks get no gradient (and AdamW skips them) "
            "until the heads are no longer random (a tied embedding still learns as the LM head). The last block "
            "trains from step 0. Trainer integrations apply it; with the bare model set LoPTModel.aux_heads_only "
            "yourself."
        },
    )
    anchor_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the frozen pretrained copy used by the anchor (e.g. 'bfloat16' halves its memory "
            "for a float32 model). None: the model's dtype."
        },
    )
    untie_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Give a tied LM head its own copy of the embedding matrix, as the authors' code does, so the task "
            "loss never reaches the embedding (costs one more vocab x hidden matrix of weights, gradients and "
            "optimizer states, and the checkpoint is saved untied). False: a tied matrix stays one parameter, "
            "trained in the late group (see lopt.engine.optim.param_groups). No effect on an untied model."
        },
    )

    def __post_init__(self):
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 2:
            raise ValueError(
                f"num_blocks={self.num_blocks!r} is invalid: LoPT needs at least 2 blocks (use 2 for a midpoint cut)."
            )
        if self.boundaries is not None:
            bounds = list(self.boundaries)
            if not bounds or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
                raise ValueError(f"boundaries={self.boundaries!r} must be a non-empty list of layer indices.")
            if any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
                raise ValueError(
                    f"boundaries={bounds} must be strictly increasing layer indices > 0 "
                    "(each is the first layer of a new block)."
                )
            self.boundaries = bounds
            self.num_blocks = len(bounds) + 1
        self.aux_weight = _non_negative_float("aux_weight", self.aux_weight)
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward={self.backward!r} is not one of {BACKWARD_MODES}.")
        if (
            isinstance(self.aux_head_ratio, bool)
            or not isinstance(self.aux_head_ratio, int)
            or self.aux_head_ratio < 1
        ):
            raise ValueError(f"aux_head_ratio={self.aux_head_ratio!r} must be an integer >= 1.")
        if self.aux_objective not in AUX_OBJECTIVES:
            raise ValueError(f"aux_objective={self.aux_objective!r} is not one of {AUX_OBJECTIVES}.")
        self.anchor_weight = _non_negative_float("anchor_weight", self.anchor_weight)
        self.task_weight = _non_negative_float("task_weight", self.task_weight)
        self.synth_weight = _non_negative_float("synth_weight", self.synth_weight)
        if self.synth_lr is not None:
            self.synth_lr = _non_negative_float("synth_lr", self.synth_lr)
        if (
            isinstance(self.aux_warmup_steps, bool)
            or not isinstance(self.aux_warmup_steps, int)
            or self.aux_warmup_steps < 0
        ):
            raise ValueError(
                f"aux_warmup_steps={self.aux_warmup_steps!r} must be an integer >= 0 (0: no warm-up)."
            )
        if not isinstance(self.untie_embeddings, bool):
            raise ValueError(f"untie_embeddings={self.untie_embeddings!r} must be True or False.")
        if self.anchor_dtype is not None and self.anchor_dtype not in ANCHOR_DTYPES:
            raise ValueError(f"anchor_dtype={self.anchor_dtype!r} is not one of {ANCHOR_DTYPES} (or None).")

    @property
    def uses_reconstruction(self) -> bool:
        return "recon" in self.aux_objective.split("+")

    @property
    def uses_anchor(self) -> bool:
        return "anchor" in self.aux_objective.split("+")

    @property
    def uses_synthetic_gradient(self) -> bool:
        return "synth" in self.aux_objective.split("+")

    @property
    def uses_task(self) -> bool:
        """The local task term needs the batch's labels (SFT), which GRPO and DPO batches do not have."""
        return "task" in self.aux_objective.split("+")

    def block_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """Contiguous (start, end) layer ranges; earlier blocks take the extra layer (9 layers, k=2 -> 5 + 4)."""
        if self.boundaries is not None:
            if self.boundaries[-1] >= num_layers:
                raise ValueError(
                    f"boundaries={self.boundaries} are out of range for a model with {num_layers} layers: "
                    f"every boundary must be between 1 and {num_layers - 1}."
                )
            starts = [0, *self.boundaries]
        else:
            if self.num_blocks > num_layers:
                raise ValueError(
                    f"num_blocks={self.num_blocks} is larger than the model's {num_layers} layers: "
                    f"choose num_blocks between 2 and {num_layers}."
                )
            base, extra = divmod(num_layers, self.num_blocks)
            sizes = [base + (1 if i < extra else 0) for i in range(self.num_blocks)]
            starts = [sum(sizes[:i]) for i in range(self.num_blocks)]
        ends = [*starts[1:], num_layers]
        return list(zip(starts, ends))

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        from lopt._version import __version__

        return {**asdict(self), "lopt_version": __version__}

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        path = os.path.join(directory, CONFIG_NAME)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> LoPTConfig:
        data = dict(data)
        data.pop("lopt_version", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LoPTConfig keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LoPTConfig:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No LoPT config at {path!r}: expected a {CONFIG_NAME} written by save_pretrained."
            )
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _non_negative_float(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0.")
    return float(value)
