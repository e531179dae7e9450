"""Masks have exactly the requested pattern and level; bad configs raise ConfigError."""

import pytest
import torch

from kiln.errors import ConfigError
from kiln.sparsity.patterns import (
    block_mask,
    mask_density,
    nm_mask,
    parse_pattern,
    unstructured_mask,
)


def scores(out_f=64, in_f=96, seed=0):
    return torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1])
def test_unstructured_level_and_largest(density):
    s = scores()
    mask = unstructured_mask(s, density)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert mask.sum() == round(density * s.numel())
    assert s[mask].min() >= s[~mask].max() if density < 1 else mask.all()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_every_group_exact(n, m):
    s = scores()
    mask = nm_mask(s, n, m)
    groups = mask.view(s.shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    assert mask_density(mask) == pytest.approx(n / m)
    kept_min = torch.where(groups, s.view_as(groups), 2.0).amin(-1)
    dropped_max = torch.where(groups, -1.0, s.view_as(groups)).amax(-1)
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("axis", ["rows", "cols"])
@pytest.mark.parametrize("density,b", [(1 / 3, 32), (2 / 3, 32), (0.5, 16), (1 / 6, 16), (1.0, 16)])
def test_balanced_block_exact(axis, density, b):
    s = scores(96, 96)
    mask = block_mask(s, density, b, axis=axis)
    blocks = mask.view(96 // b, b, 96 // b, b)
    kept = blocks.any(dim=(1, 3))
    assert torch.equal(kept, blocks.all(dim=(1, 3)))  # whole blocks only
    per_line = kept.sum(1) if axis == "rows" else kept.sum(0)
    assert (per_line == per_line[0]).all()
    assert mask_density(mask) == pytest.approx(density)


def test_block_keeps_largest_l1_blocks_and_free_placement():
    s = torch.zeros(64, 64)
    s[:32, 32:] = 5.0  # the strongest block
    s[32:, :32] = 1.0
    free = block_mask(s, 0.25, 32, balanced=False)
    assert free[:32, 32:].all() and free.sum() == 32 * 32
    rows = block_mask(s, 0.5, 32)
    assert rows[:32, 32:].all() and rows[32:, :32].all()


@pytest.mark.parametrize(
    "call",
    [
        lambda: unstructured_mask(scores(), 0.0),
        lambda: unstructured_mask(scores(), 1.5),
        lambda: nm_mask(scores(), 5, 4),
        lambda: nm_mask(scores(), 0, 4),
        lambda: nm_mask(scores(64, 90), 2, 4),
        lambda: block_mask(scores(), 0.5, 40),
        lambda: block_mask(scores(), 0.2, 32),  # 3 blocks per row: 0.6 not whole
        lambda: block_mask(scores(), 0.5, 32, axis="diag"),
        lambda: parse_pattern("3:2"),
        lambda: parse_pattern("blocky"),
    ],
)
def test_bad_configs_raise(call):
    with pytest.raises(ConfigError):
        call()


def test_parse_pattern():
    assert parse_pattern("2:4").kind == "nm" and parse_pattern("2:4").n == 2
    assert parse_pattern("unstructured").kind == "unstructured"
    assert parse_pattern("block").block_size is None
    assert parse_pattern("block64").block_size == 64
    assert parse_pattern("Block64").name == "block64"
