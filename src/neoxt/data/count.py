"""``neoxt data count``: tokens and documents of indexed datasets, from their ``.idx`` files alone.

Upstream's tools/datasets/dataset_token_count.py opens each dataset (mapping the ``.bin`` too);
counting needs only the index header and the item sizes, so thousands of shards take seconds. The
``.bin`` is only looked at with ``stat`` (it must exist and be long enough for the index), never read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxt.data.indexed import (
    _HEADER,
    DTYPE_CODES,
    HEADER_MAGIC,
    HEADER_SIZE,
    VERSION,
    data_file_path,
    index_file_path,
)
from neoxt.errors import DataError
from neoxt.progress import Progress


@dataclass(frozen=True)
class Count:
    prefix: str
    dtype: str
    items: int
    documents: int
    tokens: int


def _prefix(path: str) -> str:
    for suffix in (".idx", ".bin"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def expand_prefixes(paths: Iterable[str]) -> list[str]:
    """Prefixes, ``.bin``/``.idx`` paths, or directories (every ``.idx`` below, sorted)."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(str(f)[:-4] for f in Path(p).rglob("*.idx"))
            if not found:
                raise DataError(f"{p}: directory holds no .idx files")
            out.extend(found)
        else:
            out.append(_prefix(p))
    if not out:
        raise DataError("no dataset given")
    return out


def read_index_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """(dtype, items, document-index entries) from an ``.idx`` header; DataError naming the file if bad."""
    try:
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise DataError(f"{idx_path}: index file not found") from None
    if len(head) < HEADER_SIZE or head[:9] != HEADER_MAGIC:
        raise DataError(f"{idx_path}: not a GPT-NeoX/Megatron mmap index (bad or short header)")
    _, version, code, length, doc_count = _HEADER.unpack(head)
    if version != VERSION or code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unsupported index (version {version}, dtype code {code})")
    expected = HEADER_SIZE + 12 * length + 8 * doc_count
    if os.path.getsize(idx_path) != expected:
        raise DataError(f"{idx_path}: size does not match its header ({length} items need {expected} bytes); "
                        "the file is truncated or corrupt")
    return DTYPE_CODES[code], length, doc_count


def count_one(prefix: str) -> Count:
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    dtype, length, doc_count = read_index_header(idx_path)
    with open(idx_path, "rb") as f:
        f.seek(HEADER_SIZE)
        sizes = np.fromfile(f, dtype=np.int32, count=length)
    tokens = int(sizes.sum(dtype=np.int64))
    try:
        bin_size = os.stat(bin_path).st_size
    except FileNotFoundError:
        raise DataError(f"{bin_path}: data file not found (the index {idx_path} has no .bin beside it)") from None
    if bin_size < tokens * dtype.itemsize:
        raise DataError(f"{bin_path}: {bin_size} bytes but its index counts {tokens} tokens of {dtype.name}; "
                        "the .bin is truncated")
    return Count(prefix=prefix, dtype=dtype.name, items=length, documents=max(doc_count - 1, 0), tokens=tokens)


def count_datasets(paths: Sequence[str]) -> list[Count]:
    prefixes = expand_prefixes(paths)
    out = []
    with Progress(len(prefixes), "counting", unit="file") as bar:
        for prefix in prefixes:
            out.append(count_one(prefix))
            bar.update(1)
    return out


def format_counts(counts: Sequence[Count], totals_only: bool = False) -> str:
    lines = []
    if not totals_only:
        width = max(len(c.prefix) for c in counts)
        lines.append(f"{'dataset':<{width}}  {'documents':>12}  {'tokens':>16}  dtype")
        lines += [f"{c.prefix:<{width}}  {c.documents:>12,}  {c.tokens:>16,}  {c.dtype}" for c in counts]
    docs, tokens = sum(c.documents for c in counts), sum(c.tokens for c in counts)
    lines.append(f"total: {len(counts):,} dataset(s), {docs:,} documents, {tokens:,} tokens")
    bare = [c for c in counts if c.items and not c.documents]
    if bare:
        lines.append(f"note: {len(bare):,} dataset(s) have no document index (as upstream's merge_datasets.py "
                     f"writes); they hold {sum(c.items for c in bare):,} items")
    return "\n".join(lines)
