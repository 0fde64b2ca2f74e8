"""Loading what a run trains on: the model and tokenizer (the user's or the built-in one), and training rows.
Shared by the commands, `lopt compare` and block-parallel training."""

from __future__ import annotations

import os

from lopt.builtin.bases import base_of
from lopt.data.rows import ensure_pad_token
from lopt.errors import UserError


def looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else with a slash, or starting like a path, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


def check_model_path(model_name_or_path: str | None) -> None:
    """A one-line error for a local model path that does not exist (hub ids are checked when loaded)."""
    if isinstance(model_name_or_path, str) and looks_like_path(model_name_or_path):
        if not os.path.exists(os.path.expanduser(model_name_or_path)):
            raise UserError(
                f"--model_name_or_path {model_name_or_path!r} does not exist: give a local model folder or a hub id."
            )


def model_depth(
    model_name_or_path: str | None, trust_remote_code: bool = False, revision: str | None = None
) -> int | None:
    """The decoder layers of the model a run would load, read from its config without building, converting or
    loading any weights: the built-in model's preset (and the built-in SFT checkpoints made from it), a real base's
    converted folder, a folder's or hub id's config.json. None when only building or loading would tell (a real base
    not converted yet, a config that cannot be read or names no depth): the trainer checks the loaded model then."""
    from lopt.builtin.hub_bases import REAL_BASES, is_complete
    from lopt.io import cache_root

    if model_name_or_path is None:
        from lopt.builtin.base import preset_config

        return preset_config().num_hidden_layers
    path = model_name_or_path
    if model_name_or_path in REAL_BASES and not os.path.exists(model_name_or_path):
        folder = cache_root() / REAL_BASES[model_name_or_path].folder_name
        if not is_complete(folder):
            return None
        path = str(folder)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError):
        return None  # loading it says why, in its own words (load_model_and_tokenizer)
    for part in (config, getattr(config, "text_config", None)):
        layers = getattr(part, "num_hidden_layers", None)
        if isinstance(layers, int):
            return layers
    return None


def load_model_and_tokenizer(
    model_name_or_path: str | None,
    trust_remote_code: bool = False,
    progress: bool = True,
    revision: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    use_kernels: bool | None = None,
):
    """The user's model (safetensors only, no remote code unless asked), a real base by short name (converted once,
    see lopt.builtin.hub_bases) or the built-in one, with its tokenizer (a pad token added if missing) and the path it came
    from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_name_or_path = base_of(model_name_or_path).path(
        progress=progress
    )  # built or converted on first use
    check_model_path(model_name_or_path)
    model_kwargs = {}
    if revision is not None:
        model_kwargs["revision"] = revision
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    if use_kernels is not None:
        model_kwargs["use_kernels"] = use_kernels
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, use_safetensors=True, **model_kwargs
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {model_name_or_path!r}: {first_line}") from err
    ensure_pad_token(tokenizer)
    return model, tokenizer, model_name_or_path


def load_user_rows(
    train_file: str | None,
    dataset_name: str | None,
    dataset_config: str | None,
    split: str,
    max_samples: int | None,
    trust_remote_code: bool = False,
) -> list[dict]:
    """Rows from a file or a dataset (one-line DataErrors for bad ones)."""
    from lopt.data.rows import load_rows

    return load_rows(
        train_file=train_file,
        dataset_name=dataset_name,
        dataset_config=dataset_config,
        split=split,
        max_samples=max_samples,
        trust_remote_code=trust_remote_code,
    )
