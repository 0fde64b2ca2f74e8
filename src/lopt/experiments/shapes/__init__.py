"""Architecture configs of real models (shapes only, no weights) for `lopt bench --model` and `lopt plan`.

Each JSON file is the model's published architecture (layers, hidden and intermediate sizes, attention and key/value
heads, vocabulary, embedding tying, rope): the fields of its Hugging Face `config.json` that decide the memory.
"""

from __future__ import annotations

import json
import os
from importlib import resources

from transformers import AutoConfig, PretrainedConfig


def shape_names() -> list[str]:
    """The shipped presets, e.g. "qwen2.5-0.5b"."""
    files = resources.files(__package__).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_shape(name_or_path: str, num_layers: int | None = None) -> PretrainedConfig:
    """A preset name or a path to a config.json, as a transformers config (no weights), depth cut to `num_layers`."""
    from lopt.builtin.hub_bases import REAL_BASES, real_base_path

    preset = resources.files(__package__) / f"{name_or_path.lower()}.json"
    if preset.is_file():
        data = json.loads(preset.read_text())
    elif name_or_path in REAL_BASES and not os.path.exists(name_or_path):  # its converted config.json
        data = json.loads((real_base_path(name_or_path) / "config.json").read_text())
    elif os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"--model {name_or_path!r} is not valid JSON ({err}): give a config.json."
                ) from err
    else:
        raise ValueError(
            f"--model {name_or_path!r} is neither a preset nor a config.json file: choose from "
            f"{', '.join(shape_names() + sorted(REAL_BASES))} or give a path to a Hugging Face config.json."
        )
    if "model_type" not in data:
        raise ValueError(f"--model {name_or_path!r} has no model_type: give a Hugging Face config.json.")
    data = {
        k: v for k, v in data.items() if k not in ("architectures", "torch_dtype", "dtype", "_name_or_path")
    }
    config = AutoConfig.for_model(**data)
    if num_layers is not None:
        full = config.num_hidden_layers
        if not 1 <= num_layers <= full:
            raise ValueError(
                f"--num_layers must be between 1 and {full} for {name_or_path}, got {num_layers}."
            )
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:num_layers]
    config.use_cache = False
    return config
