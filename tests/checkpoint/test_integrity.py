"""Issue 12, acceptance 3: a flipped byte in any checkpoint file is detected on load with one line."""

from __future__ import annotations

import shutil

import pytest
import torch

from neoxt.checkpoint import load_state, read_meta, save_checkpoint
from neoxt.checkpoint.integrity import MANIFEST_FILE, read_manifest, verify_checkpoint
from neoxt.cli import main
from neoxt.errors import CheckpointError


@pytest.fixture
def saved(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).square().sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optimizer": osd, "scheduler": {"num_iters": 5, "decay_style": "cosine"}}
    return save_checkpoint(tmp_path / "run", 5, state, "train_iters: 10\n", {"consumed_tokens": 7}), state


def _template(state):
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
            "scheduler": {"num_iters": 0, "decay_style": ""}}


def test_manifest_lists_every_file_and_a_clean_checkpoint_verifies(saved, capsys):
    ckpt, state = saved
    listed = read_manifest(ckpt)
    assert sorted(listed) == sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST_FILE)
    assert verify_checkpoint(ckpt) == len(listed)
    assert load_state(ckpt, _template(state))["scheduler"]["num_iters"] == 5
    assert main(["convert", "inspect", "--verify", str(ckpt.parent)]) == 0
    assert f"all {len(listed)} files match {MANIFEST_FILE}" in capsys.readouterr().err


def test_a_flipped_byte_in_any_file_is_a_one_line_error_on_load(saved, tmp_path, capsys):
    ckpt, state = saved
    names = sorted(p.name for p in ckpt.iterdir())
    assert any(n.endswith(".distcp") for n in names) and ".metadata" in names and MANIFEST_FILE in names
    for name in names:
        copy = tmp_path / f"flip_{name}" / ckpt.name
        shutil.copytree(ckpt, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit of one byte; a hex digit or JSON digit stays parseable
        (copy / name).write_bytes(bytes(data))

        with pytest.raises(CheckpointError) as err:
            load_state(copy, _template(state))
        message = str(err.value)
        assert "\n" not in message and str(copy) in message, (name, message)
        capsys.readouterr()
        assert main(["convert", "inspect", "--verify", str(copy)]) == 2, name
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("neoxt:")]
        assert len(lines) == 1 and str(copy) in lines[0], (name, lines)


def test_a_flipped_shard_byte_names_the_file_and_stops_a_model_load(saved, tmp_path):
    ckpt, state = saved
    shard = next(p for p in ckpt.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard}: checksum mismatch"):
        load_state(ckpt, {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}})
    assert read_meta(ckpt)["iteration"] == 5  # metadata-only readers check just what they read


def test_checkpoints_without_a_manifest_still_load(saved):
    ckpt, state = saved
    (ckpt / MANIFEST_FILE).unlink()
    assert verify_checkpoint(ckpt) is None
    assert load_state(ckpt, _template(state))["scheduler"]["decay_style"] == "cosine"
