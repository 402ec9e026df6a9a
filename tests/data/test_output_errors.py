"""Data commands check their outputs before any work, and a full or read-only disk is one line.

Tests run as root here, where permission bits do not stop writes, so an unwritable place is a path
under a regular file (ENOTDIR) or a simulated read-only file system / full disk (the OS call
monkeypatched to fail with EROFS / ENOSPC).
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

import neoxt.data.indexed as indexed_mod
import neoxt.data.merge as merge_mod
import neoxt.data.outputs as outputs_mod
from neoxt.cli import main
from neoxt.data.indexed import IndexedDataset, IndexedDatasetWriter

MISSING_TOKENIZER = "/nonexistent/tokenizer.json"  # the output error must come before the tokenizer's


@pytest.fixture
def blocker(tmp_path):
    path = tmp_path / "a-regular-file"
    path.write_text("not a directory")
    return path


@pytest.fixture
def inputs(tmp_path):
    text = tmp_path / "in.jsonl"
    text.write_text("".join(json.dumps({"text": "abc" * (i + 1)}) + "\n" for i in range(5)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) + "\n")
    return text, chat


def _one_line_exit_2(argv, capsys) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _commands(blocker, inputs):
    text, chat = inputs
    out = blocker / "out"
    return {
        "preprocess": ["preprocess", "--input", text, "--output-prefix", out, "--tokenizer-type", "HFTokenizer",
                       "--vocab-file", MISSING_TOKENIZER],
        "preprocess-chat": ["preprocess-chat", "--input", chat, "--output-prefix", out,
                            "--tokenizer-path", MISSING_TOKENIZER],
        "preprocess-masked": ["preprocess-masked", "--input", text, "--output-prefix", out, "--mask-before-token",
                              "1", "--tokenizer-type", "HFTokenizer", "--vocab-file", MISSING_TOKENIZER],
        "prepare-hf": ["prepare-hf", "--dataset", blocker.parent / "no-such-dataset", "--output-dir", out,
                       "--vocab-file", MISSING_TOKENIZER],
        "data merge": ["data", "merge", out, blocker.parent / "no-such-shard"],
        # Would download from a closed port: the check must stop it first.
        "prepare-data": ["prepare-data", "enwik8", "-d", out, "--url", "http://127.0.0.1:9/enwik8.zip",
                         "--retries", "0"],
    }


@pytest.mark.parametrize("command", ["preprocess", "preprocess-chat", "preprocess-masked", "prepare-hf",
                                     "data merge", "prepare-data"])
def test_output_under_a_regular_file_fails_first_in_one_line(command, blocker, inputs, capsys):
    line = _one_line_exit_2(_commands(blocker, inputs)[command], capsys)
    assert str(blocker) in line and "regular file" in line, line
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("command", ["preprocess", "preprocess-chat", "prepare-hf", "data merge", "prepare-data"])
def test_read_only_output_directory_fails_first_in_one_line(command, tmp_path, inputs, capsys, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if ".neoxt-write-test" in os.fspath(path):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(outputs_mod.os, "open", read_only)
    writable_dir = tmp_path / "ro"
    writable_dir.mkdir()
    argv = _commands(writable_dir / "x", inputs)[command]
    line = _one_line_exit_2(argv, capsys)
    assert "read-only file system" in line and str(writable_dir) in line, line
    assert list(writable_dir.iterdir()) == []


def test_output_whose_bin_is_a_directory_fails_first(tmp_path, inputs, capsys):
    (tmp_path / "out_text_document.bin").mkdir()
    line = _one_line_exit_2(["preprocess", "--input", inputs[0], "--output-prefix", tmp_path / "out",
                             "--tokenizer-type", "HFTokenizer", "--vocab-file", MISSING_TOKENIZER], capsys)
    assert "out_text_document.bin: is a directory" in line


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fail_writes_to(module, monkeypatch, marker: str) -> None:
    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and marker in os.fspath(path) else f

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize("marker", [".bin.tmp.", ".idx.tmp-sizes.", ".idx.tmp."])
def test_disk_full_while_preprocessing_is_one_line_and_leaves_the_old_dataset(marker, tmp_path, inputs, capsys,
                                                                             monkeypatch):
    out = tmp_path / "out" / "d"
    with IndexedDatasetWriter(f"{out}_text_document", np.uint16) as w:
        w.add_document([9, 9])
    before = _snapshot(out.parent)
    _fail_writes_to(indexed_mod, monkeypatch, marker)
    line = _one_line_exit_2(["preprocess", "--input", inputs[0], "--output-prefix", out,
                             "--tokenizer-type", "CharLevelTokenizer"], capsys)
    assert "no space left on device" in line and "d_text_document" in line, line
    assert _snapshot(out.parent) == before  # no temporary file, no lock, the old pair untouched
    assert IndexedDataset(f"{out}_text_document")[0].tolist() == [9, 9]


def test_disk_full_while_merging_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    for name in ("a", "b"):
        with IndexedDatasetWriter(tmp_path / name, np.uint16) as w:
            w.add_document([1, 2, 3])
    before = _snapshot(tmp_path)
    _fail_writes_to(merge_mod, monkeypatch, ".bin.tmp.")
    line = _one_line_exit_2(["data", "merge", tmp_path / "m", tmp_path / "a", tmp_path / "b"], capsys)
    assert "m.bin: cannot write (no space left on device)" in line, line
    assert _snapshot(tmp_path) == before


def _loader_config(tmp_path, cache_dir) -> object:
    import yaml

    from neoxt.config import load_config

    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for i in range(20):
            w.add_document(list(range(1, 12 + i)))
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 8, "train_iters": 2,
        "train_micro_batch_size_per_gpu": 2, "train_data_paths": [str(tmp_path / "d")], "eval_iters": 0,
        "tokenizer_type": "CharLevelTokenizer", "index_cache_dir": str(cache_dir),
    }))
    return load_config([path])


def test_index_cache_dir_that_is_a_regular_file_fails_before_the_build(blocker, tmp_path, monkeypatch):
    import neoxt.data.index_builder as index_builder
    from neoxt.data.loader import build_loader
    from neoxt.errors import DataError

    def no_build(*args, **kwargs):
        raise AssertionError("index maps built although the cache cannot be written")

    monkeypatch.setattr(index_builder, "build_index_maps", no_build)
    cfg = _loader_config(tmp_path, blocker / "cache")
    with pytest.raises(DataError, match="regular file") as info:
        build_loader(cfg, "train")
    assert "index_cache_dir" in str(info.value) and "\n" not in str(info.value)


def test_index_cache_write_failure_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import neoxt.data.index_cache as index_cache
    from neoxt.data.loader import build_loader
    from neoxt.errors import DataError

    real_save = np.save
    calls = []

    def full_after_one(handle, array, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(handle, array, **kwargs)

    monkeypatch.setattr(index_cache.np, "save", full_after_one)
    cache = tmp_path / "cache"
    cfg = _loader_config(tmp_path, cache)
    with pytest.raises(DataError, match="cannot write index cache .*No space left on device"):
        build_loader(cfg, "train")
    assert [p.name for p in cache.iterdir() if ".npy" in p.name] == []
