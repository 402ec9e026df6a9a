"""The index maps of GPT-NeoX's sample order: what names them, what they hold, how one sample is found.

A run imported from GPT-NeoX must keep drawing the samples it would have drawn there, so the maps are
upstream's (``megatron/data/gpt2_dataset.py``): ``doc_idx`` (document order), ``sample_idx`` (where
each sample starts) and ``shuffle_idx`` (the order samples are drawn), with upstream's ``__len__``
(the last shuffled sample is never drawn directly) and its modulo fallback for out-of-range indices.
``IndexSpec`` names the cache files exactly as upstream, so either stack can reuse the other's.
They are built by ``neoxt.data.packed_index`` (``packed``) and ``neoxt.data.document_index``
(``pack_until_overflow``, ``unpacked``), chosen and cached by ``neoxt.data.index_builder``, and read
as samples by ``neoxt.data.sampling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from neoxt.errors import DataError

PackImpl = Literal["packed", "pack_until_overflow", "unpacked"]
PACK_IMPLS: tuple[str, ...] = ("packed", "pack_until_overflow", "unpacked")
LABEL_PAD = -100
TEXT_PAD = 0


class TokenSource(Protocol):
    """What sampling needs from an indexed dataset (``neoxt.data.indexed.IndexedDataset`` fits)."""

    @property
    def sizes(self) -> np.ndarray: ...

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class IndexSpec:
    """The parameters an index map depends on; they also name its cache files."""

    name: str
    num_samples: int
    seq_length: int
    seed: int
    pack_impl: str = "packed"
    allow_chopped: bool = True
    # Preference pairs (upstream's pairwise_dataset.py): chosen/rejected documents share one index.
    pairwise: bool = False

    def stem(self, prefix: str) -> str:
        """Upstream's cache file stem for a dataset at ``prefix`` (without ``_doc_idx.npy`` etc.)."""
        stem = (
            f"{prefix}_{self.name}_indexmap_{self.num_samples}ns_{self.seq_length}sl"
            f"_{self.seed}s_{self.pack_impl}pi"
        )
        # Upstream's pairwise datasets never add the allow_chopped suffix.
        return stem + "_ac" if self.allow_chopped and not self.pairwise else stem


@dataclass(frozen=True, eq=False)
class IndexMaps:
    """doc_idx: document order; sample_idx [N+1, 2]: (doc_idx position, token offset) where each sample
    starts (the next row is where it ends, inclusive); shuffle_idx: the order samples are drawn."""

    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray

    def __len__(self) -> int:
        # Upstream's __len__: min(len(shuffle) - 1, len(sample_idx) - 1); the last shuffled sample is
        # reachable only through the modulo fallback of out-of-range indices.
        return max(0, min(self.shuffle_idx.shape[0] - 1, self.sample_idx.shape[0] - 1))

    def resolve(self, idx: int) -> int:
        """The sample_idx row drawn for index ``idx``, with upstream's IndexError → modulo fallback.

        Upstream catches IndexError anywhere in ``__getitem__`` and retries with ``idx % len``, where
        ``idx`` is already the shuffled value when the shuffle lookup itself succeeded. (The only
        unreadable row is pack_until_overflow's last one, which lacks the next sample's first
        document.) Where that retry would cycle forever (upstream: RecursionError) the unreadable row
        is returned and read without its carried token.
        """
        n = len(self)
        shuffle_len, rows, docs = self.shuffle_idx.shape[0], self.sample_idx.shape[0], self.doc_idx.shape[0]
        if n == 0:
            raise DataError("no samples: the index maps are empty")
        row = -1
        for _ in range(4):
            if idx < 0 or idx >= shuffle_len:
                idx = idx % n
                continue
            row = int(self.shuffle_idx[idx])
            if row + 1 < rows and max(int(self.sample_idx[row, 0]), int(self.sample_idx[row + 1, 0])) < docs:
                return row
            idx = row % n
        if 0 <= row < rows - 1:
            return row
        raise DataError(f"sample {idx} cannot be read (index maps are inconsistent)")

    def pieces(self, row: int, sizes: np.ndarray) -> list[tuple[int, int, int]]:
        """(document, offset, length) pieces of sample ``row``: the first from its offset, whole documents
        in between, and the last up to its end offset inclusive (as upstream's ``__getitem__``)."""
        f, off_f = int(self.sample_idx[row, 0]), int(self.sample_idx[row, 1])
        e, off_e = int(self.sample_idx[row + 1, 0]), int(self.sample_idx[row + 1, 1])
        if f == e:
            return [(int(self.doc_idx[f]), off_f, off_e - off_f + 1)]
        first = int(self.doc_idx[f])
        out = [(first, off_f, int(sizes[first]) - off_f)]
        out.extend((int(self.doc_idx[k]), 0, int(sizes[int(self.doc_idx[k])])) for k in range(f + 1, e))
        if e >= self.doc_idx.shape[0]:  # pack_until_overflow's last sample: no next document
            return out
        last = int(self.doc_idx[e])
        # Non-packed spans end at offset 0 of the next document; an empty one has no token to give.
        out.append((last, 0, min(off_e + 1, int(sizes[last]))))
        return out
