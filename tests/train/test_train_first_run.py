"""GPT-NeoX's resume idiom: `load` and `save` name the same directory in every run of a job."""

from __future__ import annotations

from trainkit import PatternSource, tiny_config, train_killed_after, with_checkpoint

from neoxt.checkpoint import latest_checkpoint
from neoxt.train.loop import train
from neoxt.train.setup import TrainData


def test_load_equal_to_save_starts_fresh_then_resumes(tmp_path):
    run = str(tmp_path / "run")
    cfg = with_checkpoint(tiny_config(save=run, train_iters=4), load=run, checkpoint_factor=2)
    lines: list[str] = []
    first = train_killed_after(2, cfg, "", data=TrainData(PatternSource()), log=lines.append)
    assert lines[0].startswith("starting from scratch") and "holds no checkpoint yet" in lines[0]
    assert first.start_iteration == 0 and latest_checkpoint(run).name == "global_step2"

    lines.clear()
    second = train(cfg, "", data=TrainData(PatternSource()), log=lines.append)
    assert lines[0].startswith("resuming from") and second.start_iteration == 2 and second.iteration == 4


def test_load_elsewhere_that_is_empty_is_an_error(tmp_path):
    import pytest

    from neoxt.errors import NeoxtError

    cfg = with_checkpoint(tiny_config(save=str(tmp_path / "run"), train_iters=2), load=str(tmp_path / "missing"))
    with pytest.raises(NeoxtError, match="missing"):
        train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)
