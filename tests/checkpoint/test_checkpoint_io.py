"""Checkpoint directory format: atomic writes, latest pointer, subset loads, pruning."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxt.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    read_config_text,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from neoxt.errors import CheckpointError

TESTS = Path(__file__).resolve().parents[1]  # for tests/slow_publish.py


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_model_optimizer_rng_and_meta(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _model_and_opt(0)
    msd, osd = get_state_dict(model, opt)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    state = {"model": msd, "optimizer": osd, "rng": rng, "scheduler": {"num_iters": 7}, "data": {"pos": 42}}
    ckpt = save_checkpoint(tmp_path, 7, state, "train_iters: 10\n", {"consumed_tokens": 1234})

    assert ckpt == tmp_path / "global_step7"
    assert (tmp_path / "latest").read_text().strip() == "global_step7"
    meta = read_meta(ckpt)
    assert meta["iteration"] == 7 and meta["consumed_tokens"] == 1234 and "neoxt_version" in meta
    assert read_config_text(ckpt) == "train_iters: 10\n"
    assert not any(".tmp" in p.name for p in tmp_path.iterdir())

    model2, opt2 = _model_and_opt(1)
    msd2, osd2 = get_state_dict(model2, opt2)
    rng2 = {"python": None, "numpy": None, "torch": torch.zeros_like(torch.get_rng_state())}
    state2 = {"model": msd2, "optimizer": osd2, "rng": rng2, "scheduler": {"num_iters": 0}, "data": {"pos": 0}}
    load_state(resolve_checkpoint(tmp_path), state2)
    set_state_dict(model2, opt2, model_state_dict=state2["model"], optim_state_dict=state2["optimizer"])
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name])
    assert state2["scheduler"] == {"num_iters": 7} and state2["data"] == {"pos": 42}
    assert state2["rng"]["python"] == rng["python"]
    assert torch.equal(state2["rng"]["torch"], rng["torch"])
    assert np.array_equal(state2["rng"]["numpy"][1], rng["numpy"][1])


def test_load_subset_model_only(tmp_path):
    model, opt = _model_and_opt(0)
    save_checkpoint(tmp_path, 1, {"model": model.state_dict(), "optimizer": opt.state_dict()["param_groups"][0]["lr"]}, "", {})
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    load_state(tmp_path / "global_step1", {"model": sd})
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_and_missing_key_are_checkpoint_errors(tmp_path):
    model, _ = _model_and_opt(0)
    ckpt = save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, "", {})
    with pytest.raises(CheckpointError, match=r"model\.0\.weight"):
        load_state(ckpt, {"model": {"0.weight": torch.zeros(2, 2)}})
    with pytest.raises(CheckpointError, match="nope"):
        load_state(ckpt, {"model": {"nope": torch.zeros(2, 2)}})
    with pytest.raises(CheckpointError, match="not a complete"):
        load_state(tmp_path, {"model": {}})


def test_latest_ignores_tmp_and_errors_on_dangling_pointer(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    model, _ = _model_and_opt(0)
    save_checkpoint(tmp_path, 2, {"model": model.state_dict()}, "", {})
    (tmp_path / "global_step4.tmp").mkdir()  # an interrupted write
    assert latest_checkpoint(tmp_path) == tmp_path / "global_step2"
    assert resolve_checkpoint(tmp_path) == tmp_path / "global_step2"
    assert resolve_checkpoint(tmp_path / "global_step2") == tmp_path / "global_step2"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(tmp_path / "global_step4.tmp")

    # Without `latest` the newest complete step directory is found.
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "global_step2"

    (tmp_path / "latest").write_text("global_step9\n")
    with pytest.raises(CheckpointError, match="global_step9"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "nothing-here")


def test_resave_same_iteration_replaces(tmp_path):
    a, _ = _model_and_opt(0)
    b, _ = _model_and_opt(1)
    save_checkpoint(tmp_path, 3, {"model": a.state_dict()}, "", {})
    save_checkpoint(tmp_path, 3, {"model": b.state_dict()}, "", {})
    sd = {k: torch.zeros_like(v) for k, v in b.state_dict().items()}
    load_state(tmp_path / "global_step3", {"model": sd})
    assert all(torch.equal(sd[k], v) for k, v in b.state_dict().items())
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["global_step3"]


def test_prune_keeps_newest_and_latest(tmp_path):
    model, _ = _model_and_opt(0)
    for it in (1, 2, 3, 4):
        save_checkpoint(tmp_path, it, {"model": model.state_dict()}, "", {})
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["global_step1", "global_step2"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["global_step3", "global_step4"]
    assert prune_checkpoints(tmp_path, None) == []
    # `latest` pointing at an older step is never pruned.
    (tmp_path / "latest").write_text("global_step3\n")
    assert prune_checkpoints(tmp_path, 1) == []


def test_kill_during_write_keeps_previous_checkpoint(tmp_path):
    """SIGKILL between the tensor write and the rename: the previous checkpoint stays the latest."""
    save_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import slow_publish  # the publish sleeps once the files are written (tests/slow_publish.py)
        import torch
        from neoxt.checkpoint import save_checkpoint
        sd = {{"w": torch.arange(6.0)}}
        save_checkpoint({str(save_dir)!r}, 1, {{"model": sd}}, "", {{}})
        print("saved1", flush=True)
        sd = {{"w": torch.arange(6.0) * 2}}
        save_checkpoint({str(save_dir)!r}, 2, {{"model": sd}}, "", {{}})
        print("saved2", flush=True)
        """
    )
    env = dict(os.environ, SLOW_PUBLISH="60@2")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not any(save_dir.glob("global_step2.tmp-*/meta.json")):
            assert proc.poll() is None, "writer exited early"
            assert time.time() < deadline, "second checkpoint write never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert latest_checkpoint(save_dir) == save_dir / "global_step1"
    sd = {"w": torch.zeros(6)}
    load_state(resolve_checkpoint(save_dir), {"model": sd})
    assert torch.equal(sd["w"], torch.arange(6.0))
    assert json.loads((save_dir / "global_step1" / "meta.json").read_text())["iteration"] == 1


def test_dcp_metadata_is_read_in_one_place_and_a_corrupt_index_is_named(tmp_path):
    from neoxt.checkpoint import read_dcp_metadata

    step = save_checkpoint(tmp_path, 3, {"model": {"w": torch.ones(2, 3)}}, "x: 1\n")
    md = read_dcp_metadata(step)
    assert list(md["model.w"].size) == [2, 3]
    (step / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata|DCP metadata"):
        read_dcp_metadata(step)
