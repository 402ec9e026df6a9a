"""Two jobs on one dataset output: one wins with its own complete output, the other changes nothing.

The race is real (two ``neoxt preprocess`` processes started together, contending for the output),
and made deterministic by feeding each its input through a FIFO: whichever takes the output first
blocks reading its input while holding it, so the other must meet it. The test then checks that the
loser exited 2 with one line and left the previous dataset byte for byte, feeds the winner, and checks
the committed .bin/.idx pair holds exactly the winner's documents.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neoxt.data.indexed import IndexedDataset, IndexedDatasetWriter
from neoxt.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _docs(letter: str, n: int) -> list[str]:
    return [letter * (3 + i % 7) for i in range(n)]


def _preprocess(fifo: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen(
        [sys.executable, "-m", "neoxt.cli", "preprocess", "--input", str(fifo), "--output-prefix", str(out),
         "--tokenizer-type", "CharLevelTokenizer"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _race_once(root: Path) -> None:
    root.mkdir()
    out = root / "out"
    prefix = Path(f"{out}_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as w:  # what an earlier run left: must survive the loser
        w.add_document([99, 99, 99])
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    docs = {0: _docs("a", 40), 1: _docs("b", 25)}
    fifos = {i: root / f"in{i}.jsonl" for i in docs}
    for f in fifos.values():
        os.mkfifo(f)
    procs = {i: _preprocess(fifos[i], out) for i in docs}
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs.values()):
            assert time.monotonic() < deadline, "neither run finished: both are waiting"
            time.sleep(0.02)
        loser = next(i for i, p in procs.items() if p.poll() is not None)
        winner = 1 - loser
        _, err = procs[loser].communicate()
        assert procs[loser].returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("neoxt: ") and "another run is writing" in lines[0], err
        assert "Traceback" not in err
        # The loser changed nothing: the earlier dataset is intact while the winner still works.
        assert {p.name: p.read_bytes() for p in root.iterdir() if p.name in before} == before
        with open(fifos[winner], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[winner])
        _, err = procs[winner].communicate(timeout=120)
        assert procs[winner].returncode == 0, err
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    ds = IndexedDataset(prefix)  # .bin and .idx of one run: the winner's documents, all of them
    assert [bytes(ds[i].tolist()).decode() for i in range(len(ds))] == docs[winner]
    leftovers = sorted(p.name for p in root.iterdir() if not p.name.startswith("in"))
    assert leftovers == ["out_text_document.bin", "out_text_document.idx"]


def test_concurrent_preprocess_one_wins_other_changes_nothing(tmp_path):
    for rep in range(3):
        _race_once(tmp_path / f"rep{rep}")


@pytest.mark.slow
def test_concurrent_preprocess_twenty_repetitions(tmp_path):
    for rep in range(20):
        _race_once(tmp_path / f"rep{rep}")


# --- the lock, in-process ---------------------------------------------------------------------------


def test_second_writer_fails_at_once_and_leaves_the_first_alone(tmp_path):
    prefix = tmp_path / "d"
    first = IndexedDatasetWriter(prefix, np.uint16)
    first.add_document([1, 2, 3])
    with pytest.raises(DataError, match="another run is writing this output") as info:
        IndexedDatasetWriter(prefix, np.uint16)
    assert "\n" not in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    first.add_document([4, 5])
    first.finalize()
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4, 5]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # lock released and removed
    IndexedDatasetWriter(prefix, np.uint16).discard()  # and the output can be written again


def _dead_pid() -> int:
    proc = multiprocessing.get_context("spawn").Process(target=int)
    proc.start()
    proc.join()
    return proc.pid


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    import socket

    prefix = tmp_path / "d"
    dead = _dead_pid()
    Path(f"{prefix}.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": 1}))
    leftover = Path(f"{prefix}.bin.tmp.{dead}.abcd1234")  # what the killed run left
    leftover.write_bytes(b"junk")
    with caplog.at_level("INFO", logger="neoxt.data.outputs"):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([7])
    assert any("taking over" in r.message and str(dead) in r.message for r in caplog.records)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


def test_lock_file_of_another_host_is_refused_naming_the_host(tmp_path):
    prefix = tmp_path / "d"
    Path(f"{prefix}.lock").write_text(json.dumps({"pid": 4242, "host": "node-17", "started": 1}))
    with pytest.raises(DataError, match="node-17") as info:
        IndexedDatasetWriter(prefix, np.uint16)
    assert "delete the lock file" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.lock"]


def test_lock_without_flock_support_falls_back_to_exclusive_create(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    prefix = tmp_path / "d"
    first = IndexedDatasetWriter(prefix, np.uint16)
    with pytest.raises(DataError, match="another run is writing this output"):
        IndexedDatasetWriter(prefix, np.uint16)
    first.add_document([1])
    first.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


# --- index caches -------------------------------------------------------------------------------------


def _build_cache(args) -> tuple[bytes, ...]:
    prefix, cache_dir, start_at = args
    from neoxt.data.index_builder import load_or_build_index_maps
    from neoxt.data.index_maps import IndexSpec

    ds = IndexedDataset(prefix)
    spec = IndexSpec("train", 400, 8, 1234)
    while time.time() < start_at:  # both builders start together
        time.sleep(0.001)
    maps = load_or_build_index_maps(prefix, np.arange(len(ds.sizes), dtype=np.int32), ds.sizes, spec,
                                    cache_dir=cache_dir)
    return tuple(np.asarray(a).tobytes() for a in (maps.doc_idx, maps.sample_idx, maps.shuffle_idx))


def test_two_processes_building_one_index_cache_never_corrupt_it(tmp_path):
    from neoxt.data.index_builder import load_or_build_index_maps
    from neoxt.data.index_cache import cache_paths
    from neoxt.data.index_maps import IndexSpec

    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for i in range(60):
            w.add_document(list(range(1, 2 + i % 13)))
    ctx = multiprocessing.get_context("fork")
    for rep in range(4):
        cache_dir = str(tmp_path / f"cache{rep}")
        with ctx.Pool(2) as pool:
            built = pool.map(_build_cache, [(str(prefix), cache_dir, time.time() + 0.3)] * 2)
        assert built[0] == built[1]
        ds = IndexedDataset(prefix)
        spec = IndexSpec("train", 400, 8, 1234)
        paths = cache_paths(str(prefix), spec, cache_dir)
        assert sorted(os.listdir(cache_dir)) == sorted(os.path.basename(p) for p in paths.values())
        maps = load_or_build_index_maps(str(prefix), np.arange(len(ds.sizes), dtype=np.int32), ds.sizes, spec,
                                        cache_dir=cache_dir)
        assert (np.asarray(maps.doc_idx).tobytes(), np.asarray(maps.sample_idx).tobytes(),
                np.asarray(maps.shuffle_idx).tobytes()) == built[0]
