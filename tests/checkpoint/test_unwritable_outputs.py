"""Issue 12, "Why" item 7: unwritable or full outputs are one line naming the path, found before the work
(train's save / tensorboard_dir, eval --output, generate --sample-output-file) or, for a disk that fills
during a checkpoint, with the previous checkpoint intact and no half-written one. (Tests run as root,
where permissions do not stop writes: "unwritable" here is a regular file where a directory belongs,
and ENOSPC is injected.)"""

from __future__ import annotations

import errno

import pytest
import torch
import yaml

from neoxt.checkpoint import latest_checkpoint, save_checkpoint
from neoxt.cli import main
from neoxt.errors import CheckpointError


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("neoxt:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("key", ["save", "tensorboard_dir"])
def test_train_checks_its_output_dirs_before_it_starts(tmp_path, capsys, corpus_dataset, key):
    tok, prefix = corpus_dataset
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    cfg = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 16, "train_iters": 1,
           "train_data_paths": [prefix], "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file,
           "save": str(tmp_path / "run")}
    cfg[key] = str(blocker / "sub")
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"neoxt: {key}: cannot write to {blocker / 'sub'}"), line


def test_generate_and_eval_outputs_fail_before_running(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    missing_model = tmp_path / "no_model"  # never reached: the output is checked first
    assert main(["generate", "--model", str(missing_model), "--text-gen-type", "unconditional", "--num-samples", "1",
                 "--sample-output-file", str(blocker / "out.jsonl")]) == 2
    assert f"--sample-output-file: cannot write to {blocker / 'out.jsonl'}" in _error_line(capsys)
    assert main(["eval", "--model", str(missing_model), "--tasks", "x", "--output", str(blocker / "r.json")]) == 2
    assert f"--output: cannot write to {blocker / 'r.json'}" in _error_line(capsys)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}}, "")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.distcp"))

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(3)}}, "")
    assert "\n" not in str(err.value) and "No space left on device" in str(err.value)
    assert latest_checkpoint(tmp_path).name == "global_step1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step1", "latest"]


def test_os_errors_a_user_fixes_are_one_line_at_the_cli(tmp_path, capsys, monkeypatch):
    import neoxt.convert.commands as commands

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.bin")

    monkeypatch.setattr(commands, "run_inspect", full)
    assert main(["convert", "inspect", str(tmp_path)]) == 2
    assert _error_line(capsys) == "neoxt: /data/out.bin: No space left on device"
