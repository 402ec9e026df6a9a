"""``neoxt data merge OUT PREFIX...``: many ``.bin/.idx`` shards into one, as upstream's merge_datasets.py.

Upstream (tools/datasets/merge_datasets.py + MMapIndexedDatasetBuilder.merge_file_) appends each
shard's ``.bin`` bytes and item sizes, recomputes the pointers from the sizes, and keeps the
document index at ``[0]``: the merged index records no document boundaries. GPT-NeoX trains on it
anyway (its datasets index items through ``sizes``, and so does ours), and the default here writes
exactly those bytes. ``keep_documents=True`` writes the shards' document boundaries instead (what
Megatron-LM's later merge does); the ``.bin`` and item table are the same either way.

Streamed: the ``.bin`` files are copied in chunks and the index is written from each shard's mapped
sizes, so memory stays flat for any number of shards. Atomic: both files are written under names
unique to this process, holding ``OUT.lock`` (a concurrent merge or preprocess into OUT fails at once),
and renamed into place only at the end; on any error (a full disk included, reported in one line),
Ctrl-C or SIGTERM they are removed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from neoxt.data.count import expand_prefixes
from neoxt.data.indexed import (
    _HEADER,
    HEADER_MAGIC,
    VERSION,
    IndexedDataset,
    data_file_path,
    dtype_code,
    index_file_path,
)
from neoxt.data.outputs import check_output_prefix, claim_output, writing
from neoxt.errors import DataError
from neoxt.io import unique_temp_path
from neoxt.progress import Progress

_CHUNK_ITEMS = 1 << 22


def upstream_dir_prefixes(directory: str) -> list[str]:
    """Upstream's ``--input DIR``: every ``<name>.bin``/``<name>.idx`` pair in the directory, sorted by name."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory")
    names = set()
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        stem, ext = os.path.splitext(entry)
        if not os.path.isfile(path) or ext not in (".bin", ".idx"):
            continue
        other = os.path.join(directory, stem) + (".bin" if ext == ".idx" else ".idx")
        if not os.path.isfile(other):
            raise DataError(f"{path}: its {os.path.splitext(other)[1]} file is missing")
        names.add(stem)
    if not names:
        raise DataError(f"{directory}: no .bin/.idx pairs to merge")
    return [os.path.join(directory, n) for n in sorted(names)]


def _open_shards(prefixes: Sequence[str]) -> list[IndexedDataset]:
    shards = [IndexedDataset(p) for p in prefixes]
    for s in shards:  # the merged pointers are recomputed from sizes, so each .bin must be exactly its items
        bin_size = os.path.getsize(data_file_path(s.prefix))
        if bin_size != s.num_tokens * s.dtype.itemsize:
            raise DataError(f"{data_file_path(s.prefix)}: {bin_size} bytes, but its index describes "
                            f"{s.num_tokens * s.dtype.itemsize}; merging would misalign every later item")
    dtype = shards[0].dtype
    for s in shards[1:]:
        if s.dtype != dtype:
            raise DataError(f"{s.prefix}: dtype {s.dtype.name} differs from {shards[0].prefix} ({dtype.name}); "
                            "shards must share one dtype (tokenize them with the same tokenizer)")
    return shards


def _write_index(path: str, shards: list[IndexedDataset], keep_documents: bool) -> None:
    dtype = shards[0].dtype
    n_items = sum(len(s) for s in shards)
    doc_count = 1 + sum(s.num_documents for s in shards) if keep_documents else 1
    with open(path, "wb") as out:
        out.write(_HEADER.pack(HEADER_MAGIC, VERSION, dtype_code(dtype), n_items, doc_count))
        for s in shards:
            out.write(np.ascontiguousarray(s.sizes, dtype="<i4").tobytes())
        offset = 0  # in items' bytes: upstream recomputes pointers from the sizes
        for s in shards:
            for start in range(0, len(s), _CHUNK_ITEMS):
                sizes = s.sizes[start : start + _CHUNK_ITEMS].astype(np.int64) * dtype.itemsize
                ends = np.cumsum(sizes)
                out.write((ends - sizes + offset).astype("<i8").tobytes())
                offset += int(ends[-1]) if len(ends) else 0
        out.write(np.zeros(1, dtype="<i8").tobytes())
        if keep_documents:
            base = 0
            for s in shards:
                out.write((s.doc_idx[1:].astype(np.int64) + base).astype("<i8").tobytes())
                base += len(s)


def merge_datasets(output_prefix: str, prefixes: Sequence[str], keep_documents: bool = False) -> dict[str, int]:
    """Concatenate ``prefixes`` (in the order given) into ``output_prefix``; returns counts."""
    from neoxt.data.tokenize import _raise_on_sigterm

    prefixes = expand_prefixes(prefixes)
    out_bin, out_idx = data_file_path(output_prefix), index_file_path(output_prefix)
    if any(os.path.abspath(p) == os.path.abspath(output_prefix) for p in prefixes):
        raise DataError(f"{output_prefix}: the output is also one of the inputs")
    check_output_prefix(output_prefix, create=False)  # before reading any shard
    shards = _open_shards(prefixes)
    check_output_prefix(output_prefix)
    tmp_bin, tmp_idx = os.fspath(unique_temp_path(out_bin)), os.fspath(unique_temp_path(out_idx))
    lock = claim_output(output_prefix)  # a second merge (or preprocess) into OUT fails here, touching nothing
    previous = _raise_on_sigterm()
    try:
        total = sum(os.path.getsize(data_file_path(s.prefix)) for s in shards)
        with writing(out_bin), open(tmp_bin, "wb") as out, Progress(total, "merging", unit="B") as bar:
            for s in shards:
                with open(data_file_path(s.prefix), "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):  # noqa: B023 -- f is used at once
                        out.write(block)
                        bar.update(len(block))
        with writing(out_idx):
            _write_index(tmp_idx, shards, keep_documents)
            if os.path.exists(out_idx):  # never a final-named .idx describing another .bin
                os.remove(out_idx)
            os.replace(tmp_bin, out_bin)
            os.replace(tmp_idx, out_idx)
    except BaseException:
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        raise
    finally:
        lock.release()
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
    return {"shards": len(shards), "items": sum(len(s) for s in shards),
            "tokens": sum(s.num_tokens for s in shards), "bytes": os.path.getsize(out_bin)}

