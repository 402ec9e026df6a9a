"""The one atomic directory writer (neoxt.io), progress display (neoxt.progress) and dtype-name map
(neoxt.dtypes) that every stage shares."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from neoxt.dtypes import PRECISIONS, dtype_of, precision_of
from neoxt.errors import ConversionError
from neoxt.io import publish_dir, temp_dir_beside
from neoxt.progress import Progress, track


def test_directory_is_published_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sub" / "model"
    tmp = temp_dir_beside(out, ConversionError)
    assert tmp.parent == out.parent and tmp.name.startswith(".model.tmp.") and not out.exists()
    (tmp / "weights.bin").write_bytes(b"x")
    os.chmod(tmp / "weights.bin", 0o600)  # as safetensors writes them
    publish_dir(tmp, out)
    assert (out / "weights.bin").read_bytes() == b"x" and not tmp.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "weights.bin").stat().st_mode) == 0o666 & ~umask
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        temp_dir_beside(out, ConversionError)
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # nothing half-written beside it


def test_progress_off_a_terminal_logs_at_intervals_and_at_the_end(capsys):
    assert list(track(range(3), "reading shards", "file", every_s=3600)) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("reading shards: 100% 3/3 [")  # only the final line
    assert "file/s]" in lines[0]  # tqdm's meter: count, elapsed<ETA, rate
    list(track(["a", "b"], "writing", "tensor", every_s=0.0))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == ["writing:  50% 1/2", "writing: 100% 2/2"]
    bar = Progress(None, "eval", "request", every_s=0.0, describe=lambda n: f"eval: {n} done")
    bar.update(5)
    bar.close()
    assert capsys.readouterr().err == "eval: 5 done\n"
    quiet = Progress(4, "eval", disable=True)
    quiet.update(4)
    assert capsys.readouterr().err == "" and quiet.done == 4


def test_one_dtype_name_map():
    assert [dtype_of(n) for n in PRECISIONS] == [torch.float32, torch.bfloat16, torch.float16]
    assert dtype_of("bfloat16") is torch.bfloat16 and dtype_of("float16") is torch.float16
    assert [precision_of(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == list(PRECISIONS)
    assert precision_of(torch.int64) == "fp32"
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*bf16"):
        dtype_of("fp8")


def test_a_streamed_file_appears_whole_or_not_at_all(tmp_path):
    from neoxt.io import atomic_open

    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_open(target, "wb") as f:
        f.write(b"whole\n")
        assert not target.exists()  # nothing at the final name until the block ends
    assert target.read_bytes() == b"whole\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
