"""The .bin/.idx format, checked against bytes built from the format description alone."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from neoxt.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    best_fitting_dtype,
    data_file_path,
    index_file_path,
)
from neoxt.errors import DataError

DOCS = [[5, 6, 7], [1], [300, 2, 9, 65000], [42, 42]]
LABEL_DOCS = [[-100, 6, 7], [-100], [-100, -100, 9, 70000], [42, -100]]


def spec_bytes(docs: list[list[int]], fmt: str, code: int) -> tuple[bytes, bytes]:
    """(.idx, .bin) bytes written straight from the Megatron mmap format description."""
    itemsize = struct.calcsize("<" + fmt)
    data = b"".join(struct.pack(f"<{len(d)}{fmt}", *d) for d in docs)
    sizes = [len(d) for d in docs]
    pointers, pos = [], 0
    for s in sizes:
        pointers.append(pos)
        pos += s * itemsize
    doc_idx = list(range(len(docs) + 1))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    idx += struct.pack(f"<{len(sizes)}i", *sizes)
    idx += struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    return idx, data


@pytest.mark.parametrize(
    ("docs", "fmt", "code", "dtype"),
    [(DOCS, "H", 8, np.uint16), (LABEL_DOCS, "i", 4, np.int32)],
    ids=["uint16", "int32"],
)
def test_spec_files_read_back_and_writer_matches_bytes(tmp_path, docs, fmt, code, dtype):
    idx_bytes, bin_bytes = spec_bytes(docs, fmt, code)
    spec = tmp_path / "spec"
    (tmp_path / "spec.idx").write_bytes(idx_bytes)
    (tmp_path / "spec.bin").write_bytes(bin_bytes)

    ds = IndexedDataset(spec)
    assert len(ds) == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.num_documents == len(docs)
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.doc_idx.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
        assert ds.get(i, offset=1).tolist() == d[1:]
        assert ds.get(i, offset=0, length=1).tolist() == d[:1]
    assert ds[-1].tolist() == docs[-1]
    assert [a.tolist() for a in ds[1:3]] == docs[1:3]

    out = tmp_path / "ours"
    with IndexedDatasetWriter(out, dtype) as w:
        for d in docs:
            w.add_item(np.array(d, dtype=np.int64))
            w.end_document()
    assert (tmp_path / "ours.idx").read_bytes() == idx_bytes
    assert (tmp_path / "ours.bin").read_bytes() == bin_bytes


def test_multi_item_documents_and_empty_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "multi", np.uint16) as w:
        w.add_item([1, 2])
        w.add_item([3])
        w.end_document()
        w.add_item([4, 5, 6])
        w.end_document()
    ds = IndexedDataset(tmp_path / "multi")
    assert len(ds) == 3 and ds.num_documents == 2
    assert ds.doc_idx.tolist() == [0, 2, 3]
    assert ds.pointers.tolist() == [0, 4, 6]
    assert [a.tolist() for a in ds.document(0)] == [[1, 2], [3]]

    IndexedDatasetWriter(tmp_path / "empty", np.uint16).finalize()
    empty = IndexedDataset(tmp_path / "empty")
    assert len(empty) == 0 and empty.num_tokens == 0 and empty.doc_idx.tolist() == [0]
    assert (tmp_path / "empty.idx").read_bytes() == spec_bytes([], "H", 8)[0]


def test_best_fitting_dtype_matches_upstream():
    assert best_fitting_dtype(50277) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(128256) == np.int32
    assert best_fitting_dtype(None) == np.int32


def test_reader_is_memory_mapped_and_picklable(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for d in DOCS:
            w.add_document(d)
    ds = IndexedDataset(tmp_path / "d")
    item = ds[2]
    assert not item.flags.owndata and not item.flags.writeable  # a view of the mapped file
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2].tolist() == DOCS[2]
    assert len(pickle.dumps(ds)) < 200  # only the prefix travels
    # a user may pass the .bin path instead of the prefix
    assert IndexedDataset(str(tmp_path / "d.bin"))[0].tolist() == DOCS[0]
    with pytest.raises(IndexError):
        ds[len(DOCS)]
    with pytest.raises(IndexError):
        ds.get(0, offset=1, length=5)


def test_writer_refuses_values_outside_dtype(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    with pytest.raises(DataError, match="does not fit"):
        w.add_item(np.array([-100, 3], dtype=np.int64))
    with pytest.raises(DataError, match="does not fit"):
        w.add_item(np.array([70000], dtype=np.int64))
    w.discard()
    assert list(tmp_path.iterdir()) == []


def test_unfinished_or_failed_writer_leaves_no_final_files(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "a", np.uint16)
    w.add_document([1, 2, 3])
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.idx").exists()
    w.discard()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_previous_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "r", np.uint16) as w:
        w.add_document([1, 2, 3, 4])
    with IndexedDatasetWriter(tmp_path / "r", np.uint16) as w:
        w.add_document([9])
    assert IndexedDataset(tmp_path / "r")[0].tolist() == [9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.bin", "r.idx"]


def _write(tmp_path, name="d"):
    with IndexedDatasetWriter(tmp_path / name, np.uint16) as w:
        for d in DOCS:
            w.add_document(d)
    return tmp_path / name


def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx: indexed dataset file not found"):
        IndexedDataset(tmp_path / "nope")
    prefix = _write(tmp_path)
    (tmp_path / "d.bin").unlink()
    with pytest.raises(DataError, match=r"d\.bin: indexed dataset file not found"):
        IndexedDataset(prefix)


def test_bad_magic_version_dtype(tmp_path):
    prefix = _write(tmp_path)
    good = (tmp_path / "d.idx").read_bytes()

    (tmp_path / "d.idx").write_bytes(b"XXIDIDX\x00\x00" + good[9:])
    with pytest.raises(DataError, match=r"d\.idx: not a GPT-NeoX/Megatron mmap index"):
        IndexedDataset(prefix)

    (tmp_path / "d.idx").write_bytes(good[:9] + struct.pack("<Q", 2) + good[17:])
    with pytest.raises(DataError, match=r"d\.idx: unsupported index version 2"):
        IndexedDataset(prefix)

    (tmp_path / "d.idx").write_bytes(good[:17] + struct.pack("<B", 9) + good[18:])
    with pytest.raises(DataError, match=r"d\.idx: unknown dtype code 9"):
        IndexedDataset(prefix)

    (tmp_path / "d.idx").write_bytes(good[:-8])
    with pytest.raises(DataError, match=r"d\.idx: size .* does not match its header"):
        IndexedDataset(prefix)


def test_truncated_bin_is_detected_on_open(tmp_path):
    prefix = _write(tmp_path)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"d\.bin: item 3 runs to byte .* truncated"):
        IndexedDataset(prefix)


def test_pointer_past_bin_is_detected(tmp_path):
    prefix = _write(tmp_path)
    idx = bytearray((tmp_path / "d.idx").read_bytes())
    n = len(DOCS)
    ptr_off = 34 + 4 * n
    idx[ptr_off + 8 : ptr_off + 16] = struct.pack("<q", 10_000)  # item 1 points far past the end
    (tmp_path / "d.idx").write_bytes(bytes(idx))
    with pytest.raises(DataError, match=r"d\.bin: item 1 runs to byte 10002"):
        IndexedDataset(prefix)


def test_paths():
    assert index_file_path("a/b") == "a/b.idx"
    assert data_file_path("a/b") == "a/b.bin"


def test_add_documents_equals_item_by_item(tmp_path):
    flat = np.array([d for doc in DOCS for d in doc], dtype=np.int64)
    lengths = np.array([len(d) for d in DOCS])
    with IndexedDatasetWriter(tmp_path / "batch", np.uint16) as w:
        w.add_documents(flat[:4], lengths[:2])
        w.add_documents(flat[4:], lengths[2:])
    with IndexedDatasetWriter(tmp_path / "single", np.uint16) as w:
        for d in DOCS:
            w.add_document(d)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"batch.{ext}").read_bytes() == (tmp_path / f"single.{ext}").read_bytes()
    w = IndexedDatasetWriter(tmp_path / "bad", np.uint16)
    with pytest.raises(ValueError, match="lengths sum to"):
        w.add_documents(flat, lengths[:2])
    w.discard()


def test_spilled_index_is_identical(tmp_path, monkeypatch):
    """Sizes and document boundaries spilled to side files in small chunks give the same bytes."""
    monkeypatch.setattr(IndexedDatasetWriter, "_SPILL", 3)
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, 60000, size=rng.randint(1, 9)).tolist() for _ in range(23)]
    with IndexedDatasetWriter(tmp_path / "s", np.uint16) as w:
        for d in docs[:10]:
            w.add_document(d)
        flat = np.array([t for d in docs[10:] for t in d])
        w.add_documents(flat, [len(d) for d in docs[10:]])
    idx, data = spec_bytes(docs, "H", 8)
    assert (tmp_path / "s.idx").read_bytes() == idx
    assert (tmp_path / "s.bin").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]
