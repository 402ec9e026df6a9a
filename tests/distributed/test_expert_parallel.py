"""MoE acceptance 3 (model level): expert parallelism 2 over 2 gloo processes, composed with FSDP2,
gives the one-process gradients; the mesh splits dp_shard into (dp_shard_mod_ep, ep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neoxt.config.schema import ParallelismConfig
from neoxt.distributed.mesh import MeshShape, mesh_shape
from neoxt.errors import ConfigError

HERE = Path(__file__).parent


def test_mesh_shape_with_expert_parallel():
    assert mesh_shape(ParallelismConfig(moe_expert_parallel_size=2), 8) == MeshShape(1, 1, 8, 1, ep=2)
    with pytest.raises(ConfigError, match="moe_expert_parallel_size=3"):
        mesh_shape(ParallelismConfig(moe_expert_parallel_size=3), 8)


@pytest.mark.distributed
def test_expert_parallel_gradients_equal_one_process(tmp_path):
    out = tmp_path / "ep.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "ep_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["ep_group"] and (result["local_experts"], result["global_experts"]) == (2, 4)
    assert result["max_grad_diff"] < 1e-6
    assert 0 < result["meta_loss"] < 100
