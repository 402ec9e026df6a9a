"""``neoxt data count`` (index files only, fast) and ``neoxt data merge`` (byte-identical to upstream's
merge_datasets.py on files its script wrote, streamed, atomic, and the result trains)."""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from neoxt.cli import main
from neoxt.config import config_from_dict
from neoxt.data import merge as merge_mod
from neoxt.data.indexed import IndexedDataset
from neoxt.data.loader import build_loader
from neoxt.errors import DataError

FIX = Path(__file__).parent / "fixtures" / "upstream_merge"
SHARDS = [str(FIX / "shards" / f"shard_{s}_text_document") for s in "abc"]


def pair(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_merge_is_byte_identical_to_upstream(tmp_path, capsys):
    assert main(["data", "merge", str(tmp_path / "m"), *SHARDS]) == 0
    assert pair(tmp_path / "m") == pair(FIX / "merged")
    assert "60 items, 3,543 tokens" in capsys.readouterr().out
    # upstream's form: every pair in a directory, sorted by name
    assert main(["data", "merge", str(tmp_path / "d"), "--input", str(FIX / "shards")]) == 0
    assert pair(tmp_path / "d") == pair(FIX / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx", "m.bin", "m.idx"]


def test_keep_document_index_records_the_shards_documents(tmp_path):
    assert main(["data", "merge", str(tmp_path / "k"), *SHARDS, "--keep-document-index"]) == 0
    merged = IndexedDataset(tmp_path / "k")
    assert Path(tmp_path / "k.bin").read_bytes() == Path(FIX / "merged.bin").read_bytes()
    assert merged.num_documents == 60 and merged.doc_idx.tolist() == list(range(61))
    shards = [IndexedDataset(p) for p in SHARDS]
    items = [shard[i].tolist() for shard in shards for i in range(len(shard))]
    assert [merged[i].tolist() for i in range(len(merged))] == items


def test_interrupted_merge_leaves_nothing_and_keeps_the_old_output(tmp_path, monkeypatch):
    assert main(["data", "merge", str(tmp_path / "m"), *SHARDS[:1]]) == 0
    before = pair(tmp_path / "m")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_mod, "_write_index", boom)
    assert main(["data", "merge", str(tmp_path / "m"), *SHARDS]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.idx"]
    assert pair(tmp_path / "m") == before


def test_temporary_names_are_unique_per_process(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(merge_mod.os, "replace", spy)
    merge_mod.merge_datasets(str(tmp_path / "m"), SHARDS)
    pid = os.getpid()
    assert [re.sub(r"[0-9a-f]{8}$", "R", name) for name in seen] == [f"m.bin.tmp.{pid}.R", f"m.idx.tmp.{pid}.R"]


def test_mixed_dtypes_and_missing_files_are_one_line_errors(tmp_path, capsys):
    masked = str(Path(__file__).parent / "fixtures" / "upstream_mask" / "masked_eod_text_document")
    assert main(["data", "merge", str(tmp_path / "m"), SHARDS[0], masked]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dtype int32 differs" in err
    assert main(["data", "merge", str(tmp_path / "m"), str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="also one of the inputs"):
        merge_mod.merge_datasets(SHARDS[0], SHARDS)


def test_merged_dataset_trains(tmp_path):
    """The loader draws training batches from upstream's merged file (document index [0], items via sizes)."""
    merged = str(FIX / "merged")
    items = [it.tolist() for it in IndexedDataset(merged)]
    cfg = config_from_dict({
        "seq_length": max(map(len, items)) + 1, "train_iters": 5, "train_micro_batch_size_per_gpu": 4,
        "eval_interval": 100, "eval_iters": 0, "seed": 3, "pack_impl": "unpacked",
        "index_cache_dir": str(tmp_path / "cache"),
        "train_data_paths": [merged], "valid_data_paths": [merged], "test_data_paths": [merged],
    }, world_size=1)
    loader = build_loader(cfg, "train", eod_id=0)
    seen = set()
    for _ in range(5):
        batch = next(loader)
        for row in loader.samples(batch.sample_indices)["text"]:
            seen.add(next(i for i, it in enumerate(items) if row[: len(it)].tolist() == it))
    assert len(seen) >= 10
    packed = build_loader(config_from_dict({"seq_length": 32, "train_iters": 3, "train_micro_batch_size_per_gpu": 2,
                                            "eval_interval": 100, "eval_iters": 0, "data_path": merged,
                                            "index_cache_dir": str(tmp_path / "cache2")},
                                           world_size=1), "train")
    assert next(packed).tokens.shape == (2, 32)


def test_count_matches_upstream_token_count(tmp_path, capsys):
    assert main(["data", "count", str(FIX / "merged"), *SHARDS, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["datasets"][0]["tokens"] == 3543  # upstream's dataset_token_count.py on the same file
    assert out["datasets"][0]["documents"] == 0  # upstream's merge keeps no document boundaries
    assert [d["documents"] for d in out["datasets"][1:]] == [20, 30, 10]
    assert out["tokens"] == 2 * 3543 and out["documents"] == 60


def test_count_1000_prefixes_reads_only_the_index(tmp_path, monkeypatch, capsys):
    expected = 0
    for i in range(1000):
        src = SHARDS[i % 3]
        for ext in (".bin", ".idx"):
            shutil.copyfile(src + ext, tmp_path / f"s{i:04d}{ext}")
        expected += int(IndexedDataset(src).sizes.sum())

    real_open, real_memmap = builtins.open, np.memmap

    def no_bin(opener):
        def guarded(file, *args, **kwargs):
            if str(file).endswith(".bin"):
                raise AssertionError(f"count read {file}")
            return opener(file, *args, **kwargs)
        return guarded

    monkeypatch.setattr(builtins, "open", no_bin(real_open))
    monkeypatch.setattr(np, "memmap", no_bin(real_memmap))
    start = time.perf_counter()
    assert main(["data", "count", str(tmp_path), "--total-only"]) == 0
    elapsed = time.perf_counter() - start
    assert capsys.readouterr().out.strip() == f"total: 1,000 dataset(s), {334 * 20 + 333 * 40:,} documents, " \
                                              f"{expected:,} tokens"
    assert elapsed < 5.0, f"{elapsed:.1f} s"


def test_count_refuses_truncated_files(tmp_path, capsys):
    for ext in (".bin", ".idx"):
        shutil.copyfile(SHARDS[0] + ext, tmp_path / f"t{ext}")
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(10)
    assert main(["data", "count", str(tmp_path / "t")]) == 2
    assert "t.bin: 10 bytes" in capsys.readouterr().err
    (tmp_path / "t.idx").write_bytes(b"junk")
    assert main(["data", "count", str(tmp_path / "t.idx")]) == 2
    assert "not a GPT-NeoX/Megatron mmap index" in capsys.readouterr().err


def test_shard_with_bytes_outside_its_index_is_refused(tmp_path):
    for ext in (".bin", ".idx"):
        shutil.copyfile(SHARDS[0] + ext, tmp_path / f"x{ext}")
    with open(tmp_path / "x.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="x.bin: 2302 bytes.*misalign"):
        merge_mod.merge_datasets(str(tmp_path / "m"), [str(tmp_path / "x"), SHARDS[1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]


def test_count_notes_datasets_without_a_document_index(capsys):
    assert main(["data", "count", str(FIX / "merged")]) == 0
    assert "note: 1 dataset(s) have no document index" in capsys.readouterr().out


def test_fixture_directories_hold_only_what_upstream_wrote():
    """Index caches of a test run must go to tmp dirs, never beside the committed fixtures."""
    names = {p.suffix for p in (Path(__file__).parent / "fixtures").rglob("*") if p.is_file()}
    assert names <= {".bin", ".idx", ".jsonl", ".md"}
