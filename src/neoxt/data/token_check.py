"""Token ids checked against the vocabulary before training reads them.

An id at or past the embedding's rows is an ``IndexError`` on CPU and a device-side assert on a GPU,
hours into a job and far from the file at fault; a negative id is the same. So when a dataset is
opened for training, every token file is scanned once (a vectorised min/max over the ``.bin``,
memory-mapped, in chunks) and a bad id is a one-line DataError naming the file, the document, the id
and the vocabulary size. Label files may hold -100 (masked), so only their maximum is checked.

The min/max of a file is cached in a small JSON sidecar keyed by the ``.bin``/``.idx`` sizes and
modification times — beside the index caches (``index_cache_dir``) when one is set, else beside the
data — so later runs (and the other ranks) pay nothing. A sidecar that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from neoxt.data.indexed import IndexedDataset, data_file_path, index_file_path
from neoxt.errors import DataError
from neoxt.io import write_text_atomic

if TYPE_CHECKING:
    from neoxt.config.schema import RunConfig

log = logging.getLogger(__name__)

_CHUNK = 1 << 25  # tokens per step of the scan (bounded temporary memory)
SIDECAR_VERSION = 1


def _contiguous(ds: IndexedDataset) -> bool:
    """Items stored back to back from byte 0 with nothing else in the .bin (what every writer produces)."""
    sizes = ds.sizes.astype(np.int64) * ds.dtype.itemsize
    if not len(sizes):
        return True
    starts = np.cumsum(sizes) - sizes
    return bool(np.array_equal(starts, ds.pointers)) and int(starts[-1] + sizes[-1]) == os.path.getsize(
        data_file_path(ds.prefix))


def _token_chunks(ds: IndexedDataset) -> Iterator[tuple[int, np.ndarray]]:
    """(position of the chunk's first token in item order, tokens) over every item's tokens."""
    if _contiguous(ds):
        n = ds.num_tokens
        data = np.memmap(data_file_path(ds.prefix), mode="r", dtype=ds.dtype) if n else np.empty(0, ds.dtype)
        for start in range(0, n, _CHUNK):
            yield start, np.asarray(data[start : start + _CHUNK])
        return
    position = 0
    for i in range(len(ds)):  # unusual layout (gaps or reordered items): item by item
        item = ds.get(i)
        yield position, item
        position += len(item)


def _sidecar_path(prefix: str, cache_dir: str | None) -> str:
    if cache_dir is None:
        return prefix + "_token_range.json"
    digest = hashlib.sha1(os.path.abspath(prefix).encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f"{os.path.basename(prefix)}_{digest}_token_range.json")


def _key(prefix: str) -> dict[str, int]:
    b, i = os.stat(data_file_path(prefix)), os.stat(index_file_path(prefix))
    return {"bin_size": b.st_size, "bin_mtime_ns": b.st_mtime_ns, "idx_size": i.st_size, "idx_mtime_ns": i.st_mtime_ns}


def scan_token_range(ds: IndexedDataset) -> tuple[int, int] | None:
    """(min, max) token id over every item, computed now (no cache); None for a dataset without tokens."""
    lo = hi = None
    for _, chunk in _token_chunks(ds):
        if chunk.size:
            cmin, cmax = int(chunk.min()), int(chunk.max())
            lo = cmin if lo is None else min(lo, cmin)
            hi = cmax if hi is None else max(hi, cmax)
    return None if lo is None or hi is None else (lo, hi)


def token_range(ds: IndexedDataset, cache_dir: str | None = None) -> tuple[int, int] | None:
    """(min, max) token id of the dataset (None when it holds no tokens), cached per file version."""
    key = _key(ds.prefix)
    sidecar = _sidecar_path(ds.prefix, cache_dir)
    try:
        with open(sidecar, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("version") == SIDECAR_VERSION and all(cached.get(k) == v for k, v in key.items()):
            return None if cached["min"] is None else (int(cached["min"]), int(cached["max"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    span = scan_token_range(ds)
    lo, hi = span if span is not None else (None, None)
    record = {"version": SIDECAR_VERSION, **key, "dtype": ds.dtype.name, "min": lo, "max": hi}
    try:
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
        write_text_atomic(sidecar, json.dumps(record) + "\n")
    except OSError as err:
        log.debug("token range of %s not cached (%s)", ds.prefix, err)
    return span


def _locate(ds: IndexedDataset, lo: int, hi: int) -> tuple[int, int]:
    """(document, id) of the first token outside [lo, hi], in item order."""
    ends = np.cumsum(ds.sizes.astype(np.int64))
    for position, chunk in _token_chunks(ds):
        mask = (chunk < lo) | (chunk > hi)
        if mask.any():
            j = int(np.argmax(mask))
            item = int(np.searchsorted(ends, position + j, side="right"))
            doc = int(np.searchsorted(ds.doc_idx, item, side="right")) - 1
            return max(doc, 0), int(chunk[j])
    raise AssertionError("token range and scan disagree")  # the cache is keyed by size and mtime


def check_token_ids(ds: IndexedDataset, vocab_size: int, cache_dir: str | None = None, labels: bool = False) -> None:
    """DataError naming file, document, id and ``vocab_size`` when an id is outside ``[0, vocab_size)``.

    ``labels``: a label file, where negative values (-100) mean "not trained" and only the top is checked."""
    if ds.dtype.kind not in "iu":
        return  # rewards / reference log-probs are not token ids
    problem = range_problem(ds, token_range(ds, cache_dir), vocab_size, labels)
    if problem is not None:
        raise DataError(problem)


def range_problem(ds: IndexedDataset, span: tuple[int, int] | None, vocab_size: int, labels: bool) -> str | None:
    """A one-line description of the first id outside the vocabulary, or None when all fit."""
    if span is None or ds.dtype.kind not in "iu":
        return None
    lo = int(np.iinfo(ds.dtype).min) if labels else 0
    if span[0] >= lo and span[1] < vocab_size:
        return None
    doc, value = _locate(ds, lo, vocab_size - 1)
    what = "label" if labels else "token id"
    return (f"{data_file_path(ds.prefix)}: document {doc} holds {what} {value}, outside the vocabulary of "
            f"{vocab_size} ids (0..{vocab_size - 1}); was it tokenized with another tokenizer?")


def _split_files(cfg: RunConfig, split: str) -> list[tuple[str, bool]]:
    """(prefix, is_label_file) of every token file the split reads."""
    d = cfg.data
    files: list[tuple[str, bool]] = []
    if d.dataset_impl == "pairwise":
        for side in ("pos", "neg"):
            files += [(p, False) for p in getattr(d, f"{side}_{split}_data_paths", ())]
            files += [(p, True) for p in getattr(d, f"{side}_{split}_label_data_paths", ())]
    elif getattr(d, f"{split}_data_paths", ()):
        files += [(p, False) for p in getattr(d, f"{split}_data_paths")]
        files += [(p, True) for p in getattr(d, f"{split}_label_data_paths", ())]
    elif d.data_path:
        files.append((d.data_path, False))
    return files


def check_split_token_ids(cfg: RunConfig, split: str, vocab_size: int, files: Sequence[tuple[str, bool]] = ()) -> None:
    """Every token (and label) file of ``split`` against ``vocab_size``; see ``check_token_ids``."""
    for prefix, labels in files or _split_files(cfg, split):
        check_token_ids(IndexedDataset(prefix), vocab_size, cfg.data.index_cache_dir, labels=labels)
