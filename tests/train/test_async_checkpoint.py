"""Background checkpoint writes (``async_save: true``, ``neoxt.checkpoint.async_save``): the loop is
blocked only for staging, ``latest`` moves only once the write is complete, a second save waits for the
first, SIGTERM and the end of the run wait for the in-flight save, and resume stays bit-exact.
(kill -9 during the background write: ``test_train_cli.py::test_kill9_during_checkpoint_write...[async]``.)"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import torch
from trainkit import PatternSource, tiny_config, train_killed_after, with_checkpoint

from neoxt.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from neoxt.checkpoint.async_save import AsyncCheckpointWriter
from neoxt.train.loop import train
from neoxt.train.setup import TrainData


def _slow_publish(monkeypatch, spec: str) -> None:
    from neoxt.checkpoint import layout
    from slow_publish import sleeping

    monkeypatch.setattr(layout, "_write_meta_and_manifest", sleeping(layout._write_meta_and_manifest, spec))


def _data() -> TrainData:
    return TrainData(PatternSource(seed=3), PatternSource(seed=9))


def test_writer_publishes_only_when_complete_and_second_save_waits(tmp_path, monkeypatch):
    _slow_publish(monkeypatch, "1.0")  # each publish sleeps 1 s in the background
    state = {"model": {"w": torch.arange(1000.0)}, "counters": {"n": 1}}
    writer = AsyncCheckpointWriter()
    try:
        first = writer.save(tmp_path, 1, state, "cfg: 1\n")
        assert first.blocked_s < 0.9  # the caller did not wait for the (sleeping) write
        assert writer.in_flight == tmp_path / "global_step1"
        assert latest_checkpoint(tmp_path) is None and not (tmp_path / "global_step1").exists()
        state["model"]["w"] += 1  # training goes on: the staged copy is what gets written
        began = time.perf_counter()
        second = writer.save(tmp_path, 2, state, "cfg: 2\n")
        assert time.perf_counter() - began > 0.3  # it waited for the first save to be published
        assert latest_checkpoint(tmp_path).name == "global_step1"
        assert writer.wait() == second.path
    finally:
        writer.close()
    assert latest_checkpoint(tmp_path).name == "global_step2"
    for step, offset in ((1, 0.0), (2, 1.0)):
        from neoxt.checkpoint import load_state

        template = {"model": {"w": torch.zeros(1000)}}
        load_state(tmp_path / f"global_step{step}", template)
        assert torch.equal(template["model"]["w"], torch.arange(1000.0) + offset)


def test_async_exact_resume_is_bit_identical(tmp_path):
    """8 steps straight (sync saves) == 5 steps with async saves ('killed' after 5, the save of 4 is
    completed before exit) + resume to 8: losses and weights bit-identical."""
    from test_train_loop import _weights

    straight = with_checkpoint(tiny_config(save=tmp_path / "a", train_iters=8), checkpoint_factor=4)
    ref = train(straight, "", data=_data(), log=lambda m: None)
    cfg = with_checkpoint(straight, save=str(tmp_path / "b"), async_save=True)
    lines: list[str] = []
    first = train_killed_after(5, cfg, "", data=_data(), log=lines.append)
    assert any("in the background" in line for line in lines), lines
    assert latest_checkpoint(tmp_path / "b").name == "global_step4"
    second = train(cfg, "", data=_data(), log=lambda m: None)
    assert second.start_iteration == 4 and second.iteration == 8
    assert first.losses[:4] + second.losses == ref.losses
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["global_step4", "global_step8"]


def test_sigterm_and_end_of_run_wait_for_the_in_flight_save(tmp_path, monkeypatch):
    _slow_publish(monkeypatch, "0.5")
    cfg = with_checkpoint(tiny_config(save=tmp_path / "run", train_iters=100), checkpoint_factor=3, async_save=True)

    def sigterm_at_3(iteration, r):
        if iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(cfg, "", data=_data(), log=lambda m: None, on_step=[sigterm_at_3])
    assert result.status == "signal" and result.iteration == 4  # the flag is read after the next step
    # The signal's save (4) was published before train() returned, after the background one at 3.
    assert latest_checkpoint(tmp_path / "run").name == "global_step4"
    assert read_meta(tmp_path / "run" / "global_step3")["iteration"] == 3

    end = replace(cfg, training=replace(cfg.training, train_iters=6))
    result = train(end, "", data=_data(), log=lambda m: None)
    assert result.status == "finished" and latest_checkpoint(tmp_path / "run").name == "global_step6"
    assert not list((tmp_path / "run").glob("*.tmp*"))
