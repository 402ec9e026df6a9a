"""Input formats for tokenization, read as a stream of small batches.

Supported inputs: JSONL (``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``/``.zst``/``.xz``),
plain text (``.txt`` or no suffix at all: the whole file is one document under the key ``text``, as lm_dataformat
reads it), Parquet, a dataset directory saved with ``datasets.save_to_disk``, and a Hugging Face
Hub dataset name (streamed).

JSONL lines travel to the tokenizer workers as raw bytes and are parsed there, so parsing scales
with the workers; every record keeps its file and line (or row) for error messages. Nothing here
holds more than one batch in memory.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from neoxt.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".xz")


@dataclass(frozen=True)
class Batch:
    """Consecutive records of one source; record ``i`` sits at line/row ``first + i``.

    ``payloads`` are raw JSONL lines (bytes; blank lines included so numbering stays exact) when
    ``kind == "jsonl"``, else already-decoded rows (dicts).
    """

    source: str
    first: int
    kind: str  # "jsonl" | "rows"
    payloads: list[Any]

    def location(self, i: int) -> str:
        if self.kind == "jsonl":
            return f"{self.source}:{self.first + i}"
        return f"{self.source}: row {self.first + i}"


def expand_inputs(spec: str | Sequence[str]) -> list[str]:
    """Comma lists, several arguments and globs, expanded in the order given (globs sorted)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        for item in (p.strip() for p in part.split(",")):
            if not item:
                continue
            if glob.has_magic(item):
                matches = sorted(glob.glob(os.path.expanduser(item)))
                if not matches:
                    raise DataError(f"{item}: no input file matches this pattern")
                out.extend(matches)
            else:
                out.append(os.path.expanduser(item))
    if not out:
        raise DataError("no input given")
    return out


def _strip_compression(path: str) -> tuple[str, str]:
    for suffix in COMPRESSION_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)], suffix
    return path, ""


def input_kind(path: str) -> str:
    """``jsonl``, ``text``, ``parquet``, ``hf_disk`` or ``hub`` — decided from the name and the disk."""
    if os.path.isdir(path):
        return "hf_disk"
    base, _ = _strip_compression(path.lower())
    kind = None
    if base.endswith(JSONL_SUFFIXES):
        kind = "jsonl"
    elif base.endswith(".txt"):
        kind = "text"
    elif path.lower().endswith((".parquet", ".pq")):
        kind = "parquet"
    if kind is not None or path.startswith(("/", ".", "~")) or path.count("/") > 1:
        if not os.path.exists(path):
            raise DataError(f"{path}: input file not found")
    if kind is not None:
        return kind
    if os.path.isfile(path) and "." not in os.path.basename(base):
        return "text"  # a file without any suffix (enwik8, as unzipped) is one plain-text document
    if os.path.exists(path):
        raise DataError(f"{path}: unknown input format (use .jsonl[.gz|.zst|.xz], .txt, .parquet or a "
                        "dataset directory saved with datasets.save_to_disk)")
    return "hub"


def _open_binary(path: str) -> io.BufferedIOBase:
    _, comp = _strip_compression(path.lower())
    if comp == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if comp == ".xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if comp in (".zst", ".zstd"):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 -- owned by the stream reader (closefd)
        # Archives are often several zstd frames back to back: read through all of them.
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True, read_across_frames=True)
        return io.BufferedReader(reader)
    return open(path, "rb")  # noqa: SIM115


# A batch is cut at this many bytes too, so long documents do not make batches (and memory) huge.
MAX_BATCH_BYTES = 8 << 20


def _jsonl_batches(path: str, batch_size: int) -> Iterator[Batch]:
    try:
        with _open_binary(path) as f:
            first, lines, nbytes = 1, [], 0
            for lineno, line in enumerate(f, start=1):
                lines.append(line)
                nbytes += len(line)
                if len(lines) >= batch_size or nbytes >= MAX_BATCH_BYTES:
                    yield Batch(path, first, "jsonl", lines)
                    first, lines, nbytes = lineno + 1, [], 0
            if lines:
                yield Batch(path, first, "jsonl", lines)
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    except Exception as err:  # zstandard.ZstdError and friends
        if type(err).__module__.startswith("zstandard"):
            raise DataError(f"{path}: cannot decompress ({err})") from err
        raise


def _text_batches(path: str) -> Iterator[Batch]:
    try:
        with _open_binary(path) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as UTF-8 text ({err})") from err
    yield Batch(path, 1, "rows", [{"text": text}])


def _check_columns(source: str, have: Sequence[str], need: Sequence[str]) -> None:
    missing = [k for k in need if k not in have]
    if missing:
        raise DataError(f"{source}: no column {missing[0]!r} (columns: {', '.join(have)}); "
                        "choose the key with --jsonl-keys")


def _parquet_batches(path: str, columns: Sequence[str], batch_size: int) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    _check_columns(path, pf.schema_arrow.names, columns)
    first = 1
    try:
        for rb in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
            rows = rb.to_pylist()
            yield Batch(path, first, "rows", rows)
            first += len(rows)
    except OSError as err:
        raise DataError(f"{path}: cannot read row group ({err})") from err


def _table_batches(source: str, ds: Any, columns: Sequence[str], batch_size: int) -> Iterator[Batch]:
    _check_columns(source, list(ds.column_names), columns)
    ds = ds.select_columns(list(columns))
    first = 1
    for cols in ds.iter(batch_size=batch_size):
        n = len(cols[columns[0]]) if columns else 0
        rows = [{k: cols[k][i] for k in columns} for i in range(n)]
        yield Batch(source, first, "rows", rows)
        first += n


def _pick_split(source: str, dsdict: Any, split: str | None) -> Any:
    names = list(dsdict.keys())
    if split is None:
        if len(names) == 1:
            return dsdict[names[0]]
        split = "train"
    if split not in dsdict:
        raise DataError(f"{source}: no split {split!r} (splits: {', '.join(names)}); pass --split")
    return dsdict[split]


def open_hf_dataset(path: str, split: str | None = None, subset: str | None = None,
                    streaming: bool = False) -> Any:
    """A saved dataset directory (``load_from_disk``) or a Hub dataset (needs network)."""
    import datasets

    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as err:
            raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk ({err})") from err
    else:
        try:
            ds = datasets.load_dataset(path, subset, split=split, streaming=streaming)
        except Exception as err:
            raise DataError(f"{path}: cannot load Hub dataset ({type(err).__name__}: {err})") from err
    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):
        ds = _pick_split(path, ds, split)
    return ds


def _hub_batches(name: str, columns: Sequence[str], batch_size: int, split: str | None,
                 subset: str | None) -> Iterator[Batch]:
    ds = open_hf_dataset(name, split or "train", subset, streaming=True)
    names = getattr(ds, "column_names", None)
    if names:
        _check_columns(name, names, columns)
    first, rows = 1, []
    for row in ds:
        rows.append({k: row[k] for k in columns if k in row} if columns else row)
        if len(rows) >= batch_size:
            yield Batch(name, first, "rows", rows)
            first, rows = first + len(rows), []
    if rows:
        yield Batch(name, first, "rows", rows)


def iter_batches(
    inputs: Sequence[str],
    columns: Sequence[str],
    batch_size: int = 256,
    split: str | None = None,
    subset: str | None = None,
) -> Iterator[Batch]:
    """Batches of every input in order. ``columns`` are the keys tokenization needs (column projection)."""
    for path in inputs:
        kind = input_kind(path)
        if kind == "jsonl":
            yield from _jsonl_batches(path, batch_size)
        elif kind == "text":
            yield from _text_batches(path)
        elif kind == "parquet":
            yield from _parquet_batches(path, columns, batch_size)
        elif kind == "hf_disk":
            yield from _table_batches(path, open_hf_dataset(path, split), columns, batch_size)
        else:
            yield from _hub_batches(path, columns, batch_size, split, subset)


def decode_payload(batch: Batch, i: int) -> dict[str, Any] | None:
    """Record ``i`` of a batch as a dict; None for a blank JSONL line. Malformed JSON -> DataError."""
    payload = batch.payloads[i]
    if batch.kind != "jsonl":
        return payload
    if not payload.strip():
        return None
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        hint = ""
        if batch.first + i == 1 and payload.lstrip()[:1] == b"[":
            hint = "; the file looks like one JSON array, but JSON Lines (one object per line) is needed"
        raise DataError(f"{batch.location(i)}: malformed JSON ({err}){hint}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{batch.location(i)}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl_records(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank JSONL line; a bad line names the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        records.append((number, record))
    return records
