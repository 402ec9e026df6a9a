"""GPT-NeoX sample construction: the same samples in the same order as upstream, packing rules, cache.

``Upstream*`` below is a deliberately plain, loop-based re-derivation of upstream's procedure
(megatron/data/gpt2_dataset.py and the C++ build_sample_idx), written from reading it and sharing no
code with neoxt.data's index builders and sampling, so the two can disagree.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from neoxt.data.index_builder import build_index_maps, load_or_build_index_maps
from neoxt.data.index_cache import cache_paths
from neoxt.data.index_maps import IndexSpec
from neoxt.data.indexed import IndexedDataset, IndexedDatasetWriter
from neoxt.data.sampling import GPTDataset, build_gpt_dataset
from neoxt.errors import DataError

# --------------------------------------------------------------------------------------------------
# Independent reference (loops, no vectorisation).


class MemDocs:
    """Documents held in memory with the indexed dataset's ``sizes`` / ``get``."""

    def __init__(self, docs, dtype=np.int64):
        self.docs = [np.asarray(d, dtype=dtype) for d in docs]
        self.sizes = np.array([len(d) for d in self.docs], dtype=np.int32)

    def get(self, idx, offset=0, length=None):
        doc = self.docs[int(idx)]
        if length is None:
            length = len(doc) - offset
        return doc[offset : offset + length]


def upstream_packed(sizes, documents, num_samples, seq_length, seed):
    """Returns (doc_idx, sample_idx as list of pairs, shuffle_idx) the way upstream builds them."""
    tokens_per_epoch = sum(int(sizes[d]) for d in documents)
    num_epochs = 0
    total = 0
    while True:
        num_epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            break
    rng = np.random.RandomState(seed=seed)
    doc_idx = []
    for _ in range(num_epochs):
        doc_idx.extend(int(d) for d in documents)
    doc_idx = np.array(doc_idx, dtype=np.int32)
    rng.shuffle(doc_idx)
    n = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = [(0, 0)]
    di, off = 0, 0
    while len(sample_idx) <= n:
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[di]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - 1
                remaining = 0
            else:
                di += 1
                off = 0
        sample_idx.append((di, off))
    shuffle_idx = np.arange(len(sample_idx) - 1, dtype=np.uint32)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


def upstream_item(docs, doc_idx, sample_idx, shuffle_idx, idx, seq_length, labels=None):
    """``GPT2Dataset.__getitem__`` including the IndexError -> modulo fallback."""
    length = min(len(shuffle_idx) - 1, len(sample_idx) - 1)

    def read(source, idx):
        j = int(shuffle_idx[idx])
        f, of = sample_idx[j]
        e, oe = sample_idx[j + 1]
        if f == e:
            return list(source[doc_idx[f]][of : oe + 1])
        out = list(source[doc_idx[f]][of:])
        for k in range(f + 1, e):
            out += list(source[doc_idx[k]])
        out += list(source[doc_idx[e]][: oe + 1])  # raises IndexError past the end of doc_idx
        return out

    while True:
        try:
            if idx >= len(shuffle_idx):
                raise IndexError
            text = read(docs, idx)
            label = read(labels, idx) if labels is not None else None
            break
        except IndexError:
            idx = (int(shuffle_idx[idx]) if idx < len(shuffle_idx) else idx) % length
    text = (text + [0] * (seq_length + 1))[: seq_length + 1]
    if label is None:
        return text, None
    return text, (label + [-100] * (seq_length + 1))[: seq_length + 1]


def upstream_pack_until_overflow(docs, num_samples, seq_length, seed, allow_chopped, labels=None):
    rng = np.random.RandomState(seed=seed)
    shuffle_idx = np.arange(num_samples)
    rng.shuffle(shuffle_idx)
    sample_idx, doc_idx = [], []
    order = np.arange(len(docs))
    rng.shuffle(order)
    running, cur = 0, 0
    while len(sample_idx) < num_samples:
        if cur == len(docs):  # upstream raises IndexError when a pass ends on a skipped doc; neoxt wraps
            cur = 0
            rng.shuffle(order)
        d = int(order[cur])
        if not allow_chopped and len(docs[d]) > seq_length + 1:
            cur += 1
            continue
        if labels is not None and all(x == -100 for x in labels[d][: seq_length + 1]):
            cur += 1
            continue
        if running == 0:
            sample_idx.append((len(doc_idx), 0))
            doc_idx.append(d)
            running += len(docs[d])
        else:
            if running + len(docs[d]) > seq_length + 1:
                running = len(docs[d])
                sample_idx.append((len(doc_idx), 0))
            else:
                running += len(docs[d])
            doc_idx.append(d)
        cur += 1
        if cur == len(docs):
            cur = 0
            rng.shuffle(order)
    sample_idx.append((len(doc_idx), 0))
    return doc_idx, sample_idx, shuffle_idx


def upstream_unpacked(docs, num_samples, seq_length, seed, allow_chopped, labels):
    rng = np.random.RandomState(seed=seed)
    shuffle_idx = np.arange(num_samples)
    rng.shuffle(shuffle_idx)
    sample_idx = [(i, 0) for i in range(num_samples + 1)]
    doc_idx, i = [], 0
    while len(doc_idx) <= num_samples:
        if not allow_chopped and len(docs[i]) > seq_length + 1:
            i = (i + 1) % len(docs)
            continue
        if all(x == -100 for x in labels[i][:seq_length]):
            i = (i + 1) % len(docs)
            continue
        doc_idx.append(i)
        i = (i + 1) % len(docs)
    return doc_idx, sample_idx, shuffle_idx


# --------------------------------------------------------------------------------------------------
# Helpers.


def unique_docs(sizes):
    """Documents whose tokens are all distinct: token = 1 + global position (0 is the pad value)."""
    docs, pos = [], 1
    for n in sizes:
        docs.append(list(range(pos, pos + n)))
        pos += n
    return docs


def mem_dataset(docs, spec, labels=None):
    text = MemDocs(docs)
    label = MemDocs(labels) if labels is not None else None
    maps = build_index_maps(np.arange(len(docs), dtype=np.int32), text.sizes, spec, label)
    return GPTDataset(spec.name, "<mem>", text, maps, spec.seq_length, label, "<mem-label>" if labels else None)


def write_indexed(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(np.asarray(d))
    w.finalize()
    return IndexedDataset(str(prefix))


# --------------------------------------------------------------------------------------------------
# Packed: identical to upstream.


@pytest.mark.parametrize(
    ("seed", "seq_length", "num_samples", "sizes"),
    [
        (1234, 8, 40, [5, 1, 17, 8, 9, 3, 30, 2, 7, 9]),  # several epochs, docs longer than a sample
        (7, 16, 3, [16, 16, 16, 1, 33]),  # exact multiples of seq_length
        (0, 4, 25, [0, 3, 0, 5, 4, 0, 9]),  # empty documents
        (99, 32, 500, list(np.random.RandomState(5).randint(1, 90, size=60))),
    ],
)
def test_packed_matches_upstream_loop(seed, seq_length, num_samples, sizes):
    docs = unique_docs(sizes)
    spec = IndexSpec("train", num_samples, seq_length, seed, "packed", True)
    ds = mem_dataset(docs, spec)
    doc_idx, sample_idx, shuffle_idx = upstream_packed(np.array(sizes), np.arange(len(sizes)), num_samples, seq_length, seed)
    assert ds.maps.doc_idx.dtype == np.int32 and np.array_equal(ds.maps.doc_idx, doc_idx)
    assert [tuple(map(int, r)) for r in ds.maps.sample_idx] == sample_idx
    assert ds.maps.shuffle_idx.dtype == np.uint32 and np.array_equal(ds.maps.shuffle_idx, shuffle_idx)
    assert len(ds) == len(sample_idx) - 2  # upstream __len__ quirk
    # Every index the loader can ask for, including ones past len (the modulo fallback).
    for i in list(range(len(ds) + 1)) + [len(ds) + 1, 3 * len(ds) + 2]:
        want, _ = upstream_item(docs, doc_idx, sample_idx, shuffle_idx, i, seq_length)
        got = ds[i]["text"]
        assert got.dtype == np.int64 and got.shape == (seq_length + 1,)
        assert got.tolist() == want, i


def test_packed_covers_each_token_of_an_epoch_exactly_once():
    seq = 16
    sizes = [7, 30, 1, 12, 40, 3, 9, 18, 1]  # 121 tokens = 7 * 16 + 9 ... make it N*seq+1 below
    sizes[-1] += (seq - (sum(sizes) - 1) % seq) % seq
    total = sum(sizes)
    assert (total - 1) % seq == 0
    n = (total - 1) // seq
    docs = unique_docs(sizes)
    ds = mem_dataset(docs, IndexSpec("train", n, seq, 3, "packed", True))
    assert ds.maps.doc_idx.shape[0] == len(sizes)  # one epoch
    seen = []
    for i in range(n):  # i = n-1 is the sample __len__ hides; it is still drawn through shuffle_idx
        text = ds[i]["text"]
        assert text.shape == (seq + 1,)
        seen.extend(text[:-1].tolist())
    last = max(range(n), key=lambda i: int(ds.maps.shuffle_idx[i]))
    seen.append(int(ds[last]["text"][-1]))
    assert sorted(seen) == list(range(1, total + 1))
    # Consecutive (unshuffled) samples overlap by exactly one token: the last input is the next target.
    order = np.argsort(ds.maps.shuffle_idx[:n])
    for a, b in zip(order[:-1], order[1:]):
        assert ds[int(a)]["text"][-1] == ds[int(b)]["text"][0]


def test_same_seed_same_order_other_seed_other_order():
    sizes = list(np.random.RandomState(1).randint(1, 50, size=40))
    docs = unique_docs(sizes)
    for impl in ("packed", "pack_until_overflow", "unpacked"):
        a = mem_dataset(docs, IndexSpec("train", 30, 16, 11, impl, True), labels=docs)
        b = mem_dataset(docs, IndexSpec("train", 30, 16, 11, impl, True), labels=docs)
        c = mem_dataset(docs, IndexSpec("train", 30, 16, 12, impl, True), labels=docs)
        first = [a[i]["text"].tolist() for i in range(len(a))]
        assert first == [b[i]["text"].tolist() for i in range(len(b))], impl
        assert first != [c[i]["text"].tolist() for i in range(len(c))], impl


def test_packed_int64_labels_follow_text_and_pad():
    docs = unique_docs([5, 9, 4])
    labels = [[-100 if t % 3 == 0 else t for t in d] for d in docs]
    ds = mem_dataset(docs, IndexSpec("train", 6, 4, 1, "packed", True), labels=labels)
    doc_idx, sample_idx, shuffle_idx = upstream_packed(np.array([5, 9, 4]), np.arange(3), 6, 4, 1)
    for i in range(len(ds)):
        want_text, want_label = upstream_item(docs, doc_idx, sample_idx, shuffle_idx, i, 4, labels)
        item = ds[i]
        assert item["text"].tolist() == want_text
        assert item["label"].dtype == np.int64 and item["label"].tolist() == want_label


# --------------------------------------------------------------------------------------------------
# pack_until_overflow / unpacked.


@pytest.mark.parametrize("allow_chopped", [True, False])
def test_pack_until_overflow_matches_upstream(allow_chopped):
    sizes = [3, 9, 2, 14, 5, 5, 1, 20, 8, 4, 6]
    docs = unique_docs(sizes)
    labels = [list(d) for d in docs]
    labels[2] = [-100] * len(docs[2])  # fully masked: skipped
    seq, n = 10, 15
    ds = mem_dataset(docs, IndexSpec("train", n, seq, 5, "pack_until_overflow", allow_chopped), labels=labels)
    doc_idx, sample_idx, shuffle_idx = upstream_pack_until_overflow(docs, n, seq, 5, allow_chopped, labels)
    assert ds.maps.doc_idx.tolist() == doc_idx
    assert [tuple(map(int, r)) for r in ds.maps.sample_idx] == sample_idx
    assert ds.maps.shuffle_idx.tolist() == shuffle_idx.tolist()
    for i in range(len(ds) + 2):
        want_text, want_label = upstream_item(docs, doc_idx, sample_idx, shuffle_idx, i, seq, labels)
        assert ds[i]["text"].tolist() == want_text
        assert ds[i]["label"].tolist() == want_label


@pytest.mark.parametrize("allow_chopped", [True, False])
def test_unpacked_matches_upstream(allow_chopped):
    sizes = [3, 19, 2, 14, 5, 5, 1, 20, 8]
    docs = unique_docs(sizes)
    labels = [list(d) for d in docs]
    labels[4] = [-100] * 5
    seq, n = 10, 12
    ds = mem_dataset(docs, IndexSpec("train", n, seq, 9, "unpacked", allow_chopped), labels=labels)
    doc_idx, sample_idx, shuffle_idx = upstream_unpacked(docs, n, seq, 9, allow_chopped, labels)
    assert ds.maps.doc_idx.tolist() == doc_idx
    assert ds.maps.sample_idx.tolist() == [list(r) for r in sample_idx]
    for i in range(len(ds)):
        want_text, want_label = upstream_item(docs, doc_idx, sample_idx, shuffle_idx, i, seq, labels)
        assert ds[i]["text"].tolist() == want_text
        assert ds[i]["label"].tolist() == want_label


def _owner(token: int, sizes: list[int]) -> tuple[int, int]:
    """(document, offset) of a token written by unique_docs."""
    start = 1
    for d, n in enumerate(sizes):
        if token < start + n:
            return d, token - start
        start += n
    raise AssertionError(token)


@pytest.mark.parametrize("impl", ["pack_until_overflow", "unpacked"])
def test_non_packed_modes_never_cut_a_document_unless_allow_chopped(impl):
    seq = 12
    sizes = list(np.random.RandomState(3).randint(1, 30, size=50))  # many docs longer than seq+1
    docs = unique_docs(sizes)
    for allow_chopped in (False, True):
        ds = mem_dataset(docs, IndexSpec("train", 60, seq, 2, impl, allow_chopped))
        chopped = False
        for i in range(len(ds)):
            text = ds[i]["text"].tolist()
            assert len(text) == seq + 1
            body = [t for t in text if t != 0]
            pieces: list[tuple[int, list[int]]] = []
            for t in body:
                d, off = _owner(t, sizes)
                if pieces and pieces[-1][0] == d:
                    pieces[-1][1].append(off)
                else:
                    pieces.append((d, [off]))
            # The documents of the sample are whole; what follows is upstream's carried first token
            # of the next sample's document (offset 0), never a middle piece.
            *whole, tail = pieces
            for d, offs in whole:
                if offs != list(range(sizes[d])):
                    chopped = True
                    assert allow_chopped, (impl, i, d)
            if tail[1] != list(range(sizes[tail[0]])):
                if tail[1][0] != 0 or (len(whole) == 0 and len(tail[1]) == seq + 1):
                    chopped = True
                    assert allow_chopped, (impl, i, tail)
                else:
                    assert tail[1] == [0], (impl, i, tail)  # one carried token
        if not allow_chopped:
            used = {int(ds.maps.doc_idx[k]) for k in range(len(ds.maps.doc_idx))}
            assert all(sizes[d] <= seq + 1 for d in used)
        else:
            assert chopped  # long documents do get truncated when allowed


def test_unpacked_without_labels_and_nothing_fits():
    docs = unique_docs([30, 40])
    ds = mem_dataset(docs, IndexSpec("train", 4, 8, 1, "unpacked", True))
    assert all(ds[i]["text"].shape == (9,) for i in range(len(ds)))
    for impl in ("unpacked", "pack_until_overflow"):
        with pytest.raises(DataError, match="every document is skipped"):
            mem_dataset(docs, IndexSpec("train", 4, 8, 1, impl, False))


# --------------------------------------------------------------------------------------------------
# Files: label alignment and the cache.


def test_label_file_with_other_sizes_is_a_clear_error(tmp_path):
    text = write_indexed(tmp_path / "chat_text_document", [[1, 2, 3], [4, 5]], np.int32)
    label = write_indexed(tmp_path / "chat_label_document", [[1, 2, 3], [4, 5, 6]], np.int32)
    spec = IndexSpec("train_0", 4, 2, 1)
    with pytest.raises(DataError) as err:
        build_gpt_dataset("train_0", text.prefix, text, np.arange(2, dtype=np.int32), spec, label, label.prefix)
    msg = str(err.value)
    assert "chat_text_document" in msg and "chat_label_document" in msg and "document 1" in msg
    short = write_indexed(tmp_path / "short_label_document", [[1, 2, 3]], np.int32)
    with pytest.raises(DataError, match="short_label_document.*1 documents.*chat_text_document.*2"):
        build_gpt_dataset("train_0", text.prefix, text, np.arange(2, dtype=np.int32), spec, short, short.prefix)
    assert not list(tmp_path.glob("*.npy"))


def test_cache_uses_upstream_names_and_is_reused(tmp_path):
    sizes = [5, 9, 14, 3, 7]
    text = write_indexed(tmp_path / "corpus_text_document", unique_docs(sizes))
    spec = IndexSpec("train", 12, 8, 1234, "packed", True)
    docs = np.arange(5, dtype=np.int32)
    ds = build_gpt_dataset("train", text.prefix, text, docs, spec)
    names = sorted(p.name for p in tmp_path.glob("*.npy"))
    stem = "corpus_text_document_train_indexmap_12ns_8sl_1234s_packedpi_ac"
    assert names == [f"{stem}_{p}.npy" for p in ("doc_idx", "sample_idx", "shuffle_idx")]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # Loadable the way upstream loads them, with upstream's dtypes (int32 doc/sample idx, uint32 shuffle).
    loaded = {p: np.load(tmp_path / f"{stem}_{p}.npy", allow_pickle=True, mmap_mode="r") for p in ("doc_idx", "sample_idx", "shuffle_idx")}
    assert (loaded["doc_idx"].dtype, loaded["sample_idx"].dtype, loaded["shuffle_idx"].dtype) == (np.int32, np.int32, np.uint32)
    assert loaded["sample_idx"].shape[1] == 2
    first = [ds[i]["text"].tolist() for i in range(len(ds))]
    # A second build loads the files (memory-mapped) instead of rebuilding.
    again = load_or_build_index_maps(text.prefix, docs, text.sizes, spec)
    assert not again.doc_idx.flags.owndata and not again.sample_idx.flags.owndata  # views of the mapped files
    ds2 = build_gpt_dataset("train", text.prefix, text, docs, spec)
    assert [ds2[i]["text"].tolist() for i in range(len(ds2))] == first
    # No _ac suffix without allow_chopped; an explicit cache dir holds them instead of the data dir.
    cache = tmp_path / "cache"
    paths = cache_paths(text.prefix, IndexSpec("valid", 3, 8, 1, "unpacked", False), str(cache))
    assert paths["doc_idx"] == str(cache / "corpus_text_document_valid_indexmap_3ns_8sl_1s_unpackedpi_doc_idx.npy")


def test_stale_cache_is_rebuilt(tmp_path):
    text = write_indexed(tmp_path / "a_text_document", unique_docs([5, 9, 14]))
    spec = IndexSpec("train", 6, 4, 1)
    build_gpt_dataset("train", text.prefix, text, np.arange(3, dtype=np.int32), spec)
    # Same name, different data (the cache name does not record the data): detected and rebuilt.
    text2 = write_indexed(tmp_path / "a_text_document", unique_docs([50, 9, 14, 2]))
    ds = build_gpt_dataset("train", text2.prefix, text2, np.arange(4, dtype=np.int32), spec)
    assert ds.maps.doc_idx.shape[0] == 4


def test_cache_never_half_written(tmp_path, monkeypatch):
    text = write_indexed(tmp_path / "b_text_document", unique_docs([5, 9, 14]))
    spec = IndexSpec("train", 6, 4, 1)
    real_save = np.save
    calls = {"n": 0}

    def failing_save(file, arr, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(DataError, match="cannot write index cache.*No space left"):
        build_gpt_dataset("train", text.prefix, text, np.arange(3, dtype=np.int32), spec)
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".npy") or p.endswith(".tmp")]
    assert leftovers == []
    monkeypatch.setattr(np, "save", real_save)
    ds = build_gpt_dataset("train", text.prefix, text, np.arange(3, dtype=np.int32), spec)
    assert len(ds) > 0 and len(list(tmp_path.glob("*.npy"))) == 3


def test_packed_index_for_ten_million_documents_is_fast():
    import time

    sizes = np.random.RandomState(0).randint(1, 2000, size=10_000_000).astype(np.int32)
    spec = IndexSpec("train", 2_000_000, 2048, 1, "packed", True)
    t0 = time.perf_counter()
    maps = build_index_maps(np.arange(len(sizes), dtype=np.int32), sizes, spec)
    assert time.perf_counter() - t0 < 30
    assert len(maps) >= 2_000_000 - 1


# --------------------------------------------------------------------------------------------------
# Preference pairs (upstream pairwise_dataset.py).


def upstream_pairwise_unpacked(pos, neg, num_samples, seq_length, seed, allow_chopped, pos_labels, neg_labels):
    rng = np.random.RandomState(seed=seed)
    shuffle_idx = np.array([i % len(pos) for i in range(num_samples)])
    rng.shuffle(shuffle_idx)
    sample_idx = [(i, 0) for i in range(num_samples + 1)]
    doc_idx, i = [], 0
    while len(doc_idx) <= num_samples:
        skip = not allow_chopped and (len(pos[i]) > seq_length + 1 or len(neg[i]) > seq_length + 1)
        skip = skip or all(x == -100 for x in pos_labels[i][:seq_length])
        skip = skip or all(x == -100 for x in neg_labels[i][:seq_length])
        if not skip:
            doc_idx.append(i)
        i = (i + 1) % len(pos)
    return doc_idx, sample_idx, shuffle_idx


def upstream_pairwise_pack_until_overflow(pos, neg, num_samples, seq_length, seed, allow_chopped):
    # Upstream skips pairs *shorter* than seq_length+1 when allow_chopped is false (an inverted test);
    # neoxt skips the longer ones, as the GPT dataset does. This reference follows neoxt there.
    rng = np.random.RandomState(seed=seed)
    shuffle_idx = np.arange(num_samples)
    rng.shuffle(shuffle_idx)
    order = np.arange(len(pos))
    rng.shuffle(order)
    sample_idx, doc_idx, running, cur = [], [], 0, 0
    while len(sample_idx) < num_samples:
        d = int(order[cur])
        if not allow_chopped and (len(pos[d]) > seq_length + 1 or len(neg[d]) > seq_length + 1):
            cur += 1
            if cur == len(pos):
                cur = 0
                rng.shuffle(order)
            continue
        length = max(len(pos[d]), len(neg[d]))
        if running == 0:
            sample_idx.append((len(doc_idx), 0))
            running = length
        elif running + length > seq_length + 1:
            sample_idx.append((len(doc_idx), 0))
            running = length
        else:
            running += length
        doc_idx.append(d)
        cur += 1
        if cur == len(pos):
            cur = 0
            rng.shuffle(order)
    sample_idx.append((len(doc_idx), 0))
    return doc_idx, sample_idx, shuffle_idx


def test_pairwise_unpacked_matches_upstream(tmp_path):
    from neoxt.data.sampling import build_pairwise_dataset

    rs = np.random.RandomState(8)
    pos = unique_docs(list(rs.randint(2, 20, size=12)))
    neg = [[t + 100_000 for t in d[: max(1, len(d) - 3)]] for d in unique_docs(list(rs.randint(2, 20, size=12)))]
    pos_labels = [[-100] + d[1:] for d in pos]
    neg_labels = [[-100] + d[1:] for d in neg]
    pos_labels[3] = [-100] * len(pos[3])
    seq, n = 12, 20
    ds = build_pairwise_dataset(
        "train_0", str(tmp_path / "pos_document"), MemDocs(pos), str(tmp_path / "neg_document"), MemDocs(neg),
        np.arange(12, dtype=np.int32), IndexSpec("train_0", n, seq, 3, "unpacked", False),
        labels=(MemDocs(pos_labels), MemDocs(neg_labels)), cache_dir=str(tmp_path),
    )
    # Cached under the chosen prefix, without the _ac suffix (upstream's pairwise naming).
    assert sorted(p.name for p in tmp_path.glob("*.npy"))[0] == "pos_document_train_0_indexmap_20ns_12sl_3s_unpackedpi_doc_idx.npy"
    doc_idx, sample_idx, shuffle_idx = upstream_pairwise_unpacked(pos, neg, n, seq, 3, False, pos_labels, neg_labels)
    assert ds.maps.doc_idx.tolist() == doc_idx
    assert ds.maps.shuffle_idx.tolist() == shuffle_idx.tolist()
    for i in range(len(ds)):
        for side, docs, labels in (("pos", pos, pos_labels), ("neg", neg, neg_labels)):
            want_text, want_label = upstream_item(docs, doc_idx, sample_idx, shuffle_idx, i, seq, labels)
            assert ds[i][side].tolist() == want_text, (i, side)
            assert ds[i][f"{side}_label"].tolist() == want_label, (i, side)


def test_pairwise_pack_until_overflow_shares_one_index():
    from neoxt.data.sampling import build_pairwise_dataset

    pos = unique_docs([3, 9, 2, 14, 5, 5, 1, 20])
    neg = [[t + 100_000 for t in d] + [7] * (k % 3) for k, d in enumerate(pos)]
    seq, n = 10, 9
    for chopped in (True, False):
        spec = IndexSpec("t", n, seq, 4, "pack_until_overflow", chopped, pairwise=True)
        maps = build_index_maps(np.arange(8, dtype=np.int32), MemDocs(pos).sizes, spec, pair_sizes=MemDocs(neg).sizes)
        doc_idx, sample_idx, shuffle_idx = upstream_pairwise_pack_until_overflow(pos, neg, n, seq, 4, chopped)
        assert maps.doc_idx.tolist() == doc_idx
        assert [tuple(map(int, r)) for r in maps.sample_idx] == sample_idx
    with pytest.raises(DataError, match="pairwise.*unpacked or pack_until_overflow"):
        build_index_maps(np.arange(8), MemDocs(pos).sizes, IndexSpec("t", 4, 8, 1, "packed", pairwise=True))
    with pytest.raises(DataError, match="pair up one to one"):
        build_pairwise_dataset("t", "<pos>", MemDocs(pos), "<neg>", MemDocs(neg[:-1]), np.arange(8),
                               IndexSpec("t", 4, 8, 1, "unpacked"))


def test_reward_and_reference_values_follow_the_text():
    docs = unique_docs([4, 7, 3, 9])
    rewards = MemDocs([[1], [-1], [1], [-1]])
    refs = MemDocs([[float(t) / 10 for t in d] for d in docs], np.float32)
    text = MemDocs(docs)
    spec = IndexSpec("train", 5, 8, 2, "unpacked", True)
    maps = build_index_maps(np.arange(4, dtype=np.int32), text.sizes, spec)
    ds = GPTDataset("train", "<mem>", text, maps, 8, reward=rewards, ref=refs)
    for i in range(len(ds)):
        item = ds[i]
        body = [t for t in item["text"].tolist() if t]
        owners = [_owner(t, [4, 7, 3, 9])[0] for t in body]
        want_reward = [float(rewards.docs[d][0]) for d in owners] + [0.0] * (9 - len(body))
        assert item["reward"].dtype == np.float32 and item["reward"].tolist() == want_reward
        assert item["ref"].tolist() == pytest.approx([t / 10 for t in body] + [0.0] * (9 - len(body)))


def test_pack_until_overflow_last_sample_never_recurses():
    """Upstream retries an unreadable sample at ``shuffled % len``; when that lands on itself (the last
    sample drawn first) upstream recurses forever. neoxt reads it without the carried token."""
    docs = unique_docs([3, 5, 2, 6, 4, 3, 5])
    n, seq = 6, 8
    seed = next(s for s in range(1000) if np.random.RandomState(s).permutation(n)[0] == n - 1)
    ds = mem_dataset(docs, IndexSpec("train", n, seq, seed, "pack_until_overflow", True))
    assert int(ds.maps.shuffle_idx[0]) == n - 1
    last_start = int(ds.maps.sample_idx[n - 1, 0])
    want = [t for k in range(last_start, len(ds.maps.doc_idx)) for t in docs[int(ds.maps.doc_idx[k])]]
    assert ds[0]["text"].tolist() == (want + [0] * (seq + 1))[: seq + 1]
    # Every other index still follows upstream's modulo rule.
    doc_idx, sample_idx, shuffle_idx = upstream_pack_until_overflow(docs, n, seq, seed, True)
    for i in range(1, len(ds)):
        assert ds[i]["text"].tolist() == upstream_item(docs, doc_idx, sample_idx, shuffle_idx, i, seq)[0]


def test_cache_of_another_split_range_is_not_reused(tmp_path):
    text = write_indexed(tmp_path / "s_text_document", unique_docs([4] * 8))
    spec = IndexSpec("valid", 4, 4, 1)
    a = build_gpt_dataset("valid", text.prefix, text, np.arange(2, 5, dtype=np.int32), spec)
    assert set(np.asarray(a.maps.doc_idx).tolist()) == {2, 3, 4}
    # Same cache name and same shapes (the split string changed, the range's sizes did not): rebuilt.
    b = build_gpt_dataset("valid", text.prefix, text, np.arange(5, 8, dtype=np.int32), spec)
    assert set(np.asarray(b.maps.doc_idx).tolist()) == {5, 6, 7}
