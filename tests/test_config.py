"""LoPTConfig: defaults, block layout, validation and JSON round trip."""

from __future__ import annotations

import json
import math

import pytest
from reference import split_layers

import lopt
from lopt import LoPTConfig


def test_defaults_are_the_papers():
    config = LoPTConfig()
    assert config.num_blocks == 2
    assert config.boundaries is None
    assert config.aux_weight == 10.0 and isinstance(config.aux_weight, float)
    assert config.backward == "local"
    assert config.aux_head_ratio == 4


@pytest.mark.parametrize(
    ("num_layers", "num_blocks", "expected"),
    [
        (9, 2, [(0, 5), (5, 9)]),
        (8, 2, [(0, 4), (4, 8)]),
        (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
        (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
        (5, 2, [(0, 3), (3, 5)]),
        (3, 3, [(0, 1), (1, 2), (2, 3)]),
        (2, 2, [(0, 1), (1, 2)]),
    ],
)
def test_block_ranges(num_layers, num_blocks, expected):
    assert LoPTConfig(num_blocks=num_blocks).block_ranges(num_layers) == expected


@pytest.mark.parametrize(
    ("num_layers", "num_blocks"), [(n, k) for n in range(2, 13) for k in range(2, 6) if k <= n]
)
def test_block_ranges_partition_the_layers(num_layers, num_blocks):
    ranges = LoPTConfig(num_blocks=num_blocks).block_ranges(num_layers)
    assert ranges == split_layers(num_layers, num_blocks)
    sizes = [end - start for start, end in ranges]
    assert len(ranges) == num_blocks and sum(sizes) == num_layers
    assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_boundaries_override_num_blocks():
    config = LoPTConfig(num_blocks=4, boundaries=[3])
    assert config.num_blocks == 2
    assert config.block_ranges(8) == [(0, 3), (3, 8)]
    config = LoPTConfig(boundaries=[1, 4, 6])
    assert config.num_blocks == 4
    assert config.block_ranges(7) == [(0, 1), (1, 4), (4, 6), (6, 7)]


def test_json_round_trip(tmp_path):
    config = LoPTConfig(boundaries=[2, 5], aux_weight=3, backward="joint", aux_head_ratio=2)
    path = config.save_pretrained(tmp_path / "run")
    data = json.loads(open(path).read())
    assert data["lopt_version"] == lopt.__version__
    assert data["boundaries"] == [2, 5] and data["backward"] == "joint" and data["aux_weight"] == 3.0
    assert LoPTConfig.from_pretrained(tmp_path / "run") == config  # a directory
    assert LoPTConfig.from_pretrained(path) == config  # or the file itself
    assert LoPTConfig.from_dict(config.to_dict()) == config


def test_unknown_keys_are_refused():
    data = {**LoPTConfig().to_dict(), "lamda": 3.0}
    with pytest.raises(ValueError, match="lamda"):
        LoPTConfig.from_dict(data)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="lopt_config.json"):
        LoPTConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(num_blocks=1), "num_blocks"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(num_blocks=2.0), "num_blocks"),
        (dict(num_blocks=True), "num_blocks"),
        (dict(boundaries=[]), "boundaries"),
        (dict(boundaries=[0, 3]), "boundaries"),
        (dict(boundaries=[-1]), "boundaries"),
        (dict(boundaries=[4, 2]), "boundaries"),
        (dict(boundaries=[2, 2]), "boundaries"),
        (dict(boundaries=[2.5]), "boundaries"),
        (dict(backward="both"), "backward"),
        (dict(backward="LOCAL"), "backward"),
        (dict(aux_weight=-0.1), "aux_weight"),
        (dict(aux_weight="10"), "aux_weight"),
        (dict(aux_head_ratio=0), "aux_head_ratio"),
    ],
)
def test_invalid_values_are_refused(kwargs, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment):
        LoPTConfig(**kwargs)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_aux_weight_is_refused(value):
    with pytest.raises(ValueError, match="aux_weight"):
        LoPTConfig(aux_weight=value)


def test_zero_aux_weight_is_allowed():
    assert LoPTConfig(aux_weight=0).aux_weight == 0.0


@pytest.mark.parametrize(("num_blocks", "num_layers"), [(5, 4), (3, 2)])
def test_more_blocks_than_layers_is_refused(num_blocks, num_layers):
    with pytest.raises(ValueError, match=f"{num_layers} layers"):
        LoPTConfig(num_blocks=num_blocks).block_ranges(num_layers)


@pytest.mark.parametrize("boundaries", [[4], [2, 4], [1, 9]])
def test_boundaries_out_of_range_are_refused(boundaries):
    with pytest.raises(ValueError, match="4 layers"):
        LoPTConfig(boundaries=boundaries).block_ranges(4)
