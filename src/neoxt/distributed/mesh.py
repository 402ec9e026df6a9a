"""The process group and the 5-D device mesh ``(pp, dp_replicate, dp_shard, cp, tp)`` a run trains on.

Why five named dims, always: every consumer asks the mesh by name (``mesh["tp"]``, ``mesh["dp"]``)
and a dim of size 1 costs nothing, so the code that parallelizes, loads data and saves checkpoints
never branches on which kinds of parallelism are on. ``dp`` (replicate x shard flattened) is the
data-parallel group: the data loader's rank/size use it.

Context parallelism (``context_parallel_size`` > 1) splits every sequence over ``cp``: the ranks of
one ``cp`` group read the same batch (same ``dp`` rank) and each keeps 1/cp of its tokens
(``neoxt.distributed.context_parallel``). So token counts and loss shares are summed over ``dp_cp``
(dp x cp flattened, ``dp_group``), and FSDP shards and sums gradients over ``dp_shard_cp``, as
torchtitan does: a cp rank is a data-parallel rank for everything but the choice of batch.

Order matters for locality: ``tp`` is innermost so a tensor-parallel group lands on the GPUs of one
node (NVLink), then ``cp`` (ring attention passes K/V around it every layer), then FSDP's shard
group, then HSDP replicas, then pipeline stages across nodes.

Expert parallelism (``moe_expert_parallel_size`` > 1) splits ``dp_shard`` into
``(dp_shard_mod_ep, ep)``: MoE experts are divided over ``ep`` (its ranks exchange tokens
all-to-all), and ``dp_shard`` / ``dp`` are the same ranks flattened back, so nothing else changes.
``dp_mod_ep`` (replicate x dp_shard_mod_ep) is the group that holds copies of the same experts: FSDP
shards the expert weights over it. Without EP the mesh is the plain 4-D one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from neoxt.config.schema import ParallelismConfig
from neoxt.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class MeshShape:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int = 1  # experts split over ep ranks of dp_shard
    cp: int = 1  # each sequence split over cp ranks

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)


def mesh_shape(par: ParallelismConfig, world_size: int) -> MeshShape:
    """Split ``world_size`` processes as the config asks; data parallel takes what is left.

    GPT-NeoX's ``pipe_parallel_size`` 0 (no pipeline module) and 1 both mean one stage here.
    """
    tp = par.model_parallel_size
    pp = max(par.pipe_parallel_size, 1)
    rep = par.data_parallel_replicate
    cp = par.context_parallel_size
    if tp < 1:
        raise ConfigError(f"model_parallel_size must be >= 1, got {tp}")
    if rep < 1:
        raise ConfigError(f"data_parallel_replicate must be >= 1, got {rep}")
    if cp < 1:
        raise ConfigError(f"context_parallel_size must be >= 1, got {cp}")
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"model_parallel_size={tp} x pipe_parallel_size={pp} x context_parallel_size={cp} does not divide "
            f"the {world_size} processes"
        )
    dp = world_size // (tp * pp * cp)
    if dp % rep:
        raise ConfigError(
            f"data_parallel_replicate={rep} does not divide the data-parallel size {dp} ({world_size} processes / "
            f"(model_parallel_size={tp} x pipe_parallel_size={pp} x context_parallel_size={cp}))"
        )
    ep = par.moe_expert_parallel_size
    if ep < 1 or (dp // rep) % ep:
        raise ConfigError(
            f"moe_expert_parallel_size={ep} does not divide the data-parallel shard size {dp // rep} "
            "(experts are split over data-parallel ranks)"
        )
    if ep > 1 and tp > 1:
        raise ConfigError("moe_expert_parallel_size > 1 with model_parallel_size > 1 is not supported yet; "
                          "use one of them")
    if ep > 1 and cp > 1:
        raise ConfigError("moe_expert_parallel_size > 1 with context_parallel_size > 1 is not supported yet; "
                          "use one of them")
    return MeshShape(pp=pp, dp_replicate=rep, dp_shard=dp // rep, tp=tp, ep=ep, cp=cp)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits, read from torchrun's environment (a lone process is rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, world, local, device)


DEFAULT_TIMEOUT_S = 1800.0


DEFAULT_STARTUP_TIMEOUT_S = 600.0


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> DistEnv:
    """Initialise the default process group from torchrun's env (nccl on CUDA, gloo on CPU).

    The one place a neoxt process joins a process group: the collective ``timeout_s``
    (``dist_timeout_s`` in the config) and NCCL's ``device_id`` are set here, so nothing may
    initialise the group earlier. Idempotent, and a no-op for a single process not started by
    torchrun, so ``neoxt train`` runs the same with or without a launcher. The ranks must all come up
    within ``startup_timeout_s`` (``neoxt.distributed.rendezvous``), else one line says which did not.
    """
    from neoxt.distributed.rendezvous import startup_store

    env = dist_env()
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        store = startup_store(env.rank, env.world_size, startup_timeout_s, timeout_s)
        joined = {"store": store, "rank": env.rank, "world_size": env.world_size} if store is not None else {}
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=env.device if backend == "nccl" else None,
            **joined,
        )
    return env


def group_timeout_s() -> float | None:
    """The collective timeout the default process group actually carries (None without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    try:  # private torch API: report nothing rather than fail a run if it changes
        return dist.group.WORLD._get_backend(device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return None


def rank_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` in place over ``group`` (the data-parallel group from ``dp_group``) and return it;
    ``None`` (one data-parallel rank) is a no-op.

    Never the world group by default: tensor-parallel and pipeline ranks of one data-parallel rank see
    the same batch and must not be counted twice.
    """
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def build_mesh(
    par: ParallelismConfig, world_size: int | None = None, device_type: str | None = None
) -> DeviceMesh | None:
    """The ``(pp, dp_replicate, dp_shard, tp)`` mesh plus a flattened ``dp`` dim.

    Needs an initialised process group (``init_distributed``). A lone process without one gets
    ``None``: ``parallelize(model, cfg, None)`` then applies only activation checkpointing and
    compile, and ``dp_rank_size(None)`` is (0, 1).
    """
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    shape = mesh_shape(par, world_size)
    if world_size == 1 and not dist.is_initialized():
        return None
    if shape.ep > 1:
        dims = (shape.pp, shape.dp_replicate, shape.dp_shard // shape.ep, shape.ep, shape.tp)
        mesh = init_device_mesh(device_type, dims, mesh_dim_names=("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp"))
        mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
        mesh["dp_replicate", "dp_shard_mod_ep"]._flatten("dp_mod_ep")
        mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
        return mesh
    mesh = init_device_mesh(device_type, shape.as_tuple(), mesh_dim_names=MESH_DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return mesh


def dp_rank_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): which slice of the global batch this process reads."""
    if mesh is None:
        return 0, 1
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()


def loss_dim(mesh: DeviceMesh) -> str:
    """The mesh dim whose ranks hold disjoint tokens: ``dp``, or ``dp_cp`` under context parallelism."""
    return "dp_cp" if "cp" in (mesh.mesh_dim_names or ()) and mesh["cp"].size() > 1 else "dp"


def dp_group(mesh: DeviceMesh | None):
    """The process group to sum token counts and loss shares over (None: no reduction needed).

    Not the world group: tensor-parallel (and pipeline) ranks of one data-parallel rank see the same
    batch, so reducing over the world would count it tp x pp times. Under context parallelism the cp
    ranks of one data-parallel rank hold different tokens of that batch, so it is dp x cp.
    """
    if mesh is None or mesh[loss_dim(mesh)].size() == 1:
        return None
    return mesh[loss_dim(mesh)].get_group()
