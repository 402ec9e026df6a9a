"""Reader and writer of the Megatron / GPT-NeoX memory-mapped indexed dataset (``.bin`` + ``.idx``).

Users hold terabytes of these files and keep running old tooling on them, so the format is
reproduced byte for byte (upstream: megatron/data/indexed_dataset.py, MMapIndexedDataset):

``.idx`` (little-endian, no padding)::

    magic     9 bytes  b"MMIDIDX\\x00\\x00"
    version   <Q       1
    dtype     <B       code from DTYPE_CODES
    len       <Q       number of items (sequences)
    doc_count <Q       number of document-index entries (documents + 1)
    sizes     int32[len]        tokens per item
    pointers  int64[len]        byte offset of each item in the .bin
    doc_idx   int64[doc_count]  item index where each document starts; last entry = len

``.bin`` is the items' tokens back to back in ``dtype``. A *prefix* names both files.

The reader memory-maps both files (nothing is copied) and checks the header and that every item
lies inside the ``.bin`` up front, so a truncated or mismatched pair fails when opened, naming the
file, instead of returning garbage deep inside training.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
from array import array
from collections.abc import Iterable, Iterator

import numpy as np

from neoxt.data.outputs import check_output_prefix, claim_output, output_error, writing
from neoxt.errors import DataError
from neoxt.io import unique_temp_path

HEADER_MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Upstream's dtype codes (indexed_dataset.dtypes); a file's third header field is one of these keys.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float32),
    7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, len, doc_count
HEADER_SIZE = _HEADER.size  # 34 bytes
# Items checked per step when validating pointers against the .bin size (bounds temporary memory).
_CHECK_CHUNK = 1 << 22


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
    """Upstream's choice (``__best_fitting_dtype``): uint16 below 65500 tokens, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def dtype_code(dtype: np.dtype | type) -> int:
    dt = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if known == dt:
            return code
    raise DataError(f"dtype {dt} cannot be stored in an indexed dataset (supported: "
                    f"{', '.join(str(d) for d in DTYPE_CODES.values())})")


def index_file_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".idx"


def data_file_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".bin"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def _strip_suffix(prefix: str | os.PathLike) -> str:
    """Accept ``foo``, ``foo.bin`` or ``foo.idx`` for the prefix ``foo`` (users paste either)."""
    p = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if p.endswith(suffix) and os.path.isfile(p[: -len(suffix)] + ".idx"):
            return p[: -len(suffix)]
    return p


class IndexedDataset:
    """Read-only view of one ``.bin``/``.idx`` pair; items are numpy views into the mapped ``.bin``.

    Picklable (it pickles only its prefix), so DataLoader workers re-map the files themselves.
    """

    def __init__(self, prefix: str | os.PathLike):
        self._open(_strip_suffix(prefix))

    def _open(self, prefix: str) -> None:
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DataError(f"{path}: indexed dataset file not found (prefix {prefix!r} needs "
                                f"both {os.path.basename(idx_path)} and {os.path.basename(bin_path)})")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < 9 or head[:9] != HEADER_MAGIC:
            hint = " (legacy 'cached' TNTIDX format is not supported)" if head[:6] == b"TNTIDX" else ""
            raise DataError(f"{idx_path}: not a GPT-NeoX/Megatron mmap index (bad magic {head[:9]!r}){hint}")
        if len(head) < HEADER_SIZE:
            raise DataError(f"{idx_path}: truncated header ({idx_size} bytes, need {HEADER_SIZE})")
        _, version, code, length, doc_count = _HEADER.unpack(head)
        if version != VERSION:
            raise DataError(f"{idx_path}: unsupported index version {version} (only version {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self._dtype = DTYPE_CODES[code]
        expected = HEADER_SIZE + length * 4 + length * 8 + doc_count * 8
        if idx_size != expected:
            raise DataError(f"{idx_path}: size {idx_size} bytes does not match its header "
                            f"({length} items, {doc_count} document entries need {expected} bytes); "
                            "the file is truncated or corrupt")
        idx_map = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self._idx_map = idx_map
        self._sizes = np.frombuffer(idx_map, dtype=np.int32, count=length, offset=HEADER_SIZE)
        self._pointers = np.frombuffer(idx_map, dtype=np.int64, count=length, offset=HEADER_SIZE + 4 * length)
        self._doc_idx = np.frombuffer(idx_map, dtype=np.int64, count=doc_count,
                                      offset=HEADER_SIZE + 12 * length)
        bin_size = os.path.getsize(bin_path)
        self._check_bounds(idx_path, bin_path, bin_size)
        # np.memmap refuses empty files; an empty dataset has nothing to map.
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.empty(0, np.uint8)

    def _check_bounds(self, idx_path: str, bin_path: str, bin_size: int) -> None:
        itemsize = self._dtype.itemsize
        n = len(self._sizes)
        for start in range(0, n, _CHECK_CHUNK):
            sizes = self._sizes[start : start + _CHECK_CHUNK].astype(np.int64)
            pointers = self._pointers[start : start + _CHECK_CHUNK]
            if sizes.size and (sizes.min() < 0 or pointers.min() < 0):
                bad = start + int(np.argmax((sizes < 0) | (pointers < 0)))
                raise DataError(f"{idx_path}: item {bad} has a negative size or pointer; the index is corrupt")
            ends = pointers + sizes * itemsize
            if ends.size and ends.max() > bin_size:
                bad = start + int(np.argmax(ends > bin_size))
                raise DataError(
                    f"{bin_path}: item {bad} runs to byte {int(ends[bad - start])} but the file has "
                    f"{bin_size} bytes; the .bin is truncated or does not belong to {idx_path}")
        doc_idx = self._doc_idx
        if doc_idx.size and (doc_idx[0] != 0 or doc_idx.min() < 0 or doc_idx.max() > n
                             or np.any(np.diff(doc_idx) < 0)):
            raise DataError(f"{idx_path}: document index is not a non-decreasing list of item "
                            f"indices in [0, {n}]; the index is corrupt")

    def __getstate__(self) -> str:
        return self.prefix

    def __setstate__(self, state: str) -> None:
        self._open(state)

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an indexed dataset must be contiguous")
            return [self.get(i) for i in range(start, stop)]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Item ``idx`` from token ``offset`` on, ``length`` tokens (default: to the end of the item)."""
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {idx} out of range for {self.prefix} ({n} items)")
        size = int(self._sizes[i])
        if offset < 0 or offset > size:
            raise IndexError(f"offset {offset} out of range for item {i} of size {size}")
        if length is None:
            length = size - offset
        if length < 0 or offset + length > size:
            raise IndexError(f"length {length} at offset {offset} runs past item {i} of size {size}")
        ptr = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin, dtype=self._dtype, count=length, offset=ptr)

    def document(self, doc: int) -> list[np.ndarray]:
        """The items of document ``doc`` (one item per document in everything preprocess writes)."""
        num_docs = self.num_documents
        d = doc + num_docs if doc < 0 else doc
        if not 0 <= d < num_docs:
            raise IndexError(f"document {doc} out of range for {self.prefix} ({num_docs} documents)")
        return [self.get(i) for i in range(int(self._doc_idx[d]), int(self._doc_idx[d + 1]))]

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_documents(self) -> int:
        return max(len(self._doc_idx) - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self._sizes.sum(dtype=np.int64))


class IndexedDatasetWriter:
    """Appends items to ``<prefix>.bin``/``.idx`` exactly as upstream's MMapIndexedDatasetBuilder.

    The writer holds ``<prefix>.lock`` from construction to commit/discard, so a second writer of the
    same prefix (another job) fails at once with a DataError and changes nothing. Writes go to
    temporary names unique to this process (``<file>.tmp.<pid>.<random>``); ``finalize`` writes the
    index and renames both into place, so an interrupted run never leaves a half-written dataset
    under the final names. A full or read-only disk is a one-line DataError, after the temporary
    files are removed. As a context manager it finalizes on success and discards on an exception.

    Memory stays flat however many items are written: item sizes and document boundaries are
    buffered in small chunks and spilled to side files next to the temporary ``.idx``, which ``finalize``
    streams into the index (the header needs the counts first, so the index is written last).
    """

    _SPILL = 1 << 20  # entries buffered before spilling to the side files

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._bin_path = data_file_path(self.prefix)
        self._idx_path = index_file_path(self.prefix)
        # Unique per process and call: a run that fails or loses a race removes only its own files.
        self._bin_tmp = os.fspath(unique_temp_path(self._bin_path))
        self._idx_tmp = os.fspath(unique_temp_path(self._idx_path))
        self._sizes_tmp = os.fspath(unique_temp_path(self._idx_path, "tmp-sizes"))
        self._docs_tmp = os.fspath(unique_temp_path(self._idx_path, "tmp-docs"))
        self._done = False
        self._indexed = False
        self._files = []
        check_output_prefix(self.prefix)
        # One writer per prefix at a time (DataError for the second); released by commit/discard.
        self._lock = claim_output(self.prefix)
        try:
            with writing(self._bin_tmp):
                # closed in finalize/discard
                self._file = open(self._bin_tmp, "wb")  # noqa: SIM115
                self._files.append(self._file)
                self._sizes_file = open(self._sizes_tmp, "wb")  # noqa: SIM115
                self._files.append(self._sizes_file)
                self._docs_file = open(self._docs_tmp, "wb")  # noqa: SIM115
                self._files.append(self._docs_file)
        except BaseException:
            self.discard()
            raise
        self._sizes = array("i")
        self._doc_idx = array("q", [0])
        self._num_items = 0  # items already spilled to the side file
        self._num_docs = 0  # document-index entries already spilled
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self._range: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._range = None

    def _convert(self, tokens: np.ndarray | Iterable[int]) -> np.ndarray:
        """Tokens in the writer's dtype; a value that would wrap around is an error, not silent garbage."""
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and self._range is not None and arr.dtype.kind in "iub":
                lo, hi = int(arr.min()), int(arr.max())
                if lo < self._range[0] or hi > self._range[1]:
                    raise DataError(f"{self._bin_path}: value {lo if lo < self._range[0] else hi} does "
                                    f"not fit dtype {self.dtype}")
            arr = arr.astype(self.dtype)
        return arr

    def _check_open(self) -> None:
        if self._done or self._indexed:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or discarded")

    def _write(self, f: io.BufferedWriter, data: bytes) -> None:
        """Every append goes here: a full or read-only disk discards the run and is one DataError."""
        try:
            f.write(data)
        except OSError as err:
            self.discard()
            raise output_error(self._bin_path, err) from err

    def _spill(self, force: bool = False) -> None:
        if force or len(self._sizes) >= self._SPILL:
            self._write(self._sizes_file, self._sizes.tobytes())
            self._num_items += len(self._sizes)
            self._sizes = array("i")
        if force or len(self._doc_idx) >= self._SPILL:
            self._write(self._docs_file, self._doc_idx.tobytes())
            self._num_docs += len(self._doc_idx)
            self._doc_idx = array("q")

    def add_item(self, tokens: np.ndarray | Iterable[int]) -> None:
        """Append one item (a sequence); values must fit the writer's dtype (checked, never wrapped)."""
        self._check_open()
        arr = self._convert(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size > np.iinfo(np.int32).max:
            raise DataError(f"{self._bin_path}: item of {arr.size} tokens exceeds the format's int32 size field")
        self._write(self._file, arr.tobytes(order="C"))
        self._sizes.append(arr.size)
        self._spill()

    def end_document(self) -> None:
        self._check_open()
        self._doc_idx.append(self.num_items)
        self._spill()

    def add_document(self, tokens: np.ndarray | Iterable[int]) -> None:
        """One item that is a whole document (what preprocess writes)."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many one-item documents at once: ``tokens`` is their concatenation (one write, no per-item loop)."""
        self._check_open()
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise DataError(f"{self._bin_path}: an item exceeds the format's int32 size field")
        arr = self._convert(tokens)
        self._write(self._file, arr.tobytes(order="C"))
        start = self.num_items
        self._sizes.frombytes(lengths.astype(np.int32).tobytes())
        self._doc_idx.frombytes(np.arange(start + 1, start + 1 + lengths.size, dtype=np.int64).tobytes())
        self._spill()

    @property
    def num_items(self) -> int:
        return self._num_items + len(self._sizes)

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        self.write_index()
        self.commit()

    def write_index(self) -> None:
        """First half of ``finalize``: the complete index, still under its temporary name.

        Several datasets written together (tokens + labels) call this on each, then ``commit`` on
        each, so a failure while writing any index leaves none of them under a final name.
        """
        self._check_open()
        try:
            self._spill(force=True)
            for f in self._files:
                f.close()
            n, n_docs = self._num_items, self._num_docs
            with open(self._idx_tmp, "wb") as out:
                out.write(_HEADER.pack(HEADER_MAGIC, VERSION, self._code, n, n_docs))
                _copy_file(self._sizes_tmp, out)
                # pointers = byte offset of each item = running sum of sizes x itemsize, chunk by chunk
                offset = 0
                for chunk in _read_chunks(self._sizes_tmp, np.int32):
                    ends = np.cumsum(chunk, dtype=np.int64)
                    out.write(((ends - chunk + offset) * self.dtype.itemsize).astype("<i8").tobytes())
                    offset += int(ends[-1])
                _copy_file(self._docs_tmp, out)
        except OSError as err:
            self.discard()
            raise output_error(self._idx_path, err) from err
        except BaseException:
            self.discard()
            raise
        self._indexed = True

    def commit(self) -> None:
        """Second half of ``finalize``: rename both files into place (only renames, nothing to fail midway)."""
        if not self._indexed or self._done:
            raise RuntimeError(f"writer for {self.prefix}: commit needs write_index first, once")
        try:
            # Remove a stale index first: at no moment does a final-named .idx describe another .bin.
            if os.path.exists(self._idx_path):
                os.remove(self._idx_path)
            os.replace(self._bin_tmp, self._bin_path)
            os.replace(self._idx_tmp, self._idx_path)
        except OSError as err:
            self.discard()
            raise output_error(self._idx_path, err, "cannot rename into place") from err
        except BaseException:
            self.discard()
            raise
        self._done = True
        self._remove(self._sizes_tmp, self._docs_tmp)
        self._lock.release()

    def discard(self) -> None:
        """Drop everything written so far; the final names are left untouched."""
        self._done = True
        for f in self._files:
            if not f.closed:
                f.close()
        self._remove(self._bin_tmp, self._idx_tmp, self._sizes_tmp, self._docs_tmp)
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    @staticmethod
    def _remove(*paths: str) -> None:
        for path in paths:
            if os.path.exists(path):
                with contextlib.suppress(OSError):
                    os.remove(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._done:
            self.commit() if self._indexed else self.finalize()


def _read_chunks(path: str, dtype: type, count: int = 1 << 22) -> Iterator[np.ndarray]:
    with open(path, "rb") as f:
        while True:
            chunk = np.fromfile(f, dtype=dtype, count=count)
            if not chunk.size:
                return
            yield chunk


def _copy_file(path: str, out: io.BufferedWriter) -> None:
    with open(path, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 22)
