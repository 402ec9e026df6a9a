"""Mesh shapes from the config: GPT-NeoX's pipe_parallel_size 0/1, HSDP split, errors naming keys."""

from __future__ import annotations

import pytest

from neoxt.config.schema import ParallelismConfig
from neoxt.distributed.mesh import MeshShape, build_mesh, dp_rank_size, mesh_shape
from neoxt.distributed.pipeline import split_layers
from neoxt.errors import ConfigError


@pytest.mark.parametrize(
    ("par", "world", "expected"),
    [
        (ParallelismConfig(), 1, MeshShape(1, 1, 1, 1)),
        (ParallelismConfig(), 8, MeshShape(1, 1, 8, 1)),
        (ParallelismConfig(pipe_parallel_size=0, model_parallel_size=4), 64, MeshShape(1, 1, 16, 4)),
        (ParallelismConfig(pipe_parallel_size=1, model_parallel_size=2), 8, MeshShape(1, 1, 4, 2)),
        (ParallelismConfig(pipe_parallel_size=4, model_parallel_size=4, data_parallel_replicate=2), 256,
         MeshShape(4, 2, 8, 4)),
    ],
)
def test_mesh_shape(par, world, expected):
    shape = mesh_shape(par, world)
    assert shape == expected and shape.world_size == world
    assert shape.dp == world // (shape.tp * shape.pp)


@pytest.mark.parametrize(
    ("par", "world", "needle"),
    [
        (ParallelismConfig(model_parallel_size=3), 8, "model_parallel_size=3"),
        (ParallelismConfig(pipe_parallel_size=3), 8, "pipe_parallel_size=3"),
        (ParallelismConfig(data_parallel_replicate=3), 8, "data_parallel_replicate=3"),
        (ParallelismConfig(model_parallel_size=0), 8, "model_parallel_size must be >= 1"),
    ],
)
def test_mesh_shape_errors_name_the_key(par, world, needle):
    with pytest.raises(ConfigError, match=needle):
        mesh_shape(par, world)


def test_single_process_has_no_mesh():
    assert build_mesh(ParallelismConfig(), 1) is None
    assert dp_rank_size(None) == (0, 1)


def test_split_layers_is_contiguous_and_even():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ConfigError, match="num_layers=2"):
        split_layers(2, 4)


def test_tp_refuses_uneven_head_split():
    from neoxt.distributed.tensor_parallel import check_tp
    from neoxt.model import Transformer, preset

    model = Transformer(preset("llama-tiny"))  # 4 heads, 2 kv heads
    check_tp(model, 2, sequence_parallel=True)
    with pytest.raises(ConfigError, match="num_kv_heads=2 is not divisible by model_parallel_size=4"):
        check_tp(model, 4, sequence_parallel=False)
    learned = Transformer(preset("gpt-neox-tiny", pos_emb="learned"))
    with pytest.raises(ConfigError, match="sequence_parallel"):
        check_tp(learned, 2, sequence_parallel=True)


def test_dp_group_is_none_without_mesh():
    from neoxt.distributed.mesh import dp_group

    assert dp_group(None) is None
