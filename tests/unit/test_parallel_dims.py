"""ParallelDims: the degrees of the one device mesh, and the refusal of degrees that cannot work."""

import pytest
import torch

from kiln.config import ParallelConfig
from kiln.distributed.parallel_dims import ParallelDims
from kiln.errors import ConfigError

CPU = torch.device("cpu")


def dims(world: int, **degrees) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**degrees), 0, world, 0, CPU)


def test_data_shard_degree_is_what_remains():
    d = dims(8, tensor=2, pipeline=2)
    assert d.degrees == {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 2}
    assert d.dp_size == 2
    d = dims(8, data_replicate=2)
    assert (d.dp_replicate, d.dp_shard, d.dp_size) == (2, 4, 8)
    one = dims(1)
    assert one.mesh is None and one.dp_rank == 0 and one.group("dp") is None


@pytest.mark.parametrize(
    "world, degrees", [(4, dict(tensor=3)), (1, dict(pipeline=2)), (6, dict(tensor=2, pipeline=2))]
)
def test_degrees_that_do_not_divide_the_world_are_refused(world, degrees):
    with pytest.raises(ConfigError, match=r"does not divide the world size"):
        dims(world, **degrees)


def test_non_positive_degree_is_refused():
    with pytest.raises(ConfigError, match="parallel.tensor is 0"):
        ParallelConfig(tensor=0)


def test_expert_degree_borrows_from_the_data_shard_ranks():
    d = dims(8, data_replicate=2, expert=2)
    assert (d.ep, d.dp_shard, d.dp_size) == (2, 4, 8)  # the dense layout is unchanged
    with pytest.raises(ConfigError, match=r"parallel.expert 4 does not divide the data-shard"):
        dims(4, data_replicate=2, expert=4)  # dp_shard 2
    with pytest.raises(ConfigError, match=r"parallel.expert 3 does not divide the data-shard"):
        dims(4, expert=3)
