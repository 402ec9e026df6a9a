"""The packed index (upstream's default ``pack_impl``), vectorised.

The documents, tiled ``num_epochs`` times and shuffled as one array, form one token stream; sample
``j`` is tokens ``[j*seq_length, (j+1)*seq_length]`` of that stream (``seq_length+1`` tokens,
overlapping the next sample by one token); the samples are then shuffled. The same
``np.random.RandomState(seed)`` draws in the same order as upstream's ``gpt2_dataset.py`` (and its C++
``build_sample_idx``), the same ``num_epochs`` rule and the same dtypes, so the cached ``.npy`` files
are byte-identical to upstream's.
"""

from __future__ import annotations

import numpy as np

from neoxt.data.index_maps import IndexMaps, IndexSpec
from neoxt.errors import DataError


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest ``e >= 1`` with ``(e * tokens_per_epoch - 1) // seq_length >= num_samples``."""
    if tokens_per_epoch <= 0:
        raise DataError("dataset has no tokens: cannot build samples from empty documents")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """All documents tiled ``num_epochs`` times, as int32, shuffled as one array (not per epoch)."""
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int, tokens_per_epoch: int
) -> np.ndarray:
    """Where each packed sample starts, as upstream's C++ ``build_sample_idx``.

    Sample ``j`` covers stream tokens ``[j*seq_length, (j+1)*seq_length]``; row ``j`` holds the
    position in ``doc_idx`` of the document containing stream token ``j*seq_length`` and the offset
    of that token in it. A searchsorted over the cumulative document lengths finds them all at once.
    """
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    # Upstream picks the dtype with a float division; keep the same rule so cache files match.
    wide = not 2 * ((num_epochs * tokens_per_epoch - 1) / seq_length + 1) < np.iinfo(np.int32).max
    dtype = np.int64 if wide else np.int32
    doc_sizes = np.asarray(sizes)[doc_idx].astype(np.int64)
    ends = np.cumsum(doc_sizes)
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[0] = (0, 0)
    chunk = 1 << 22
    for lo in range(1, num_samples + 1, chunk):
        positions = np.arange(lo, min(lo + chunk, num_samples + 1), dtype=np.int64) * seq_length
        # First document whose end lies past the position: the (non-empty) one containing it.
        where = np.searchsorted(ends, positions, side="right")
        out[lo : lo + len(positions), 0] = where
        out[lo : lo + len(positions), 1] = positions - (ends[where] - doc_sizes[where])
    return out


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.int64 if size >= np.iinfo(np.uint32).max - 1 else np.uint32
    shuffle_idx = np.arange(size, dtype=dtype)
    rng.shuffle(shuffle_idx)
    return shuffle_idx


def build_packed(documents: np.ndarray, sizes: np.ndarray, spec: IndexSpec) -> IndexMaps:
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, spec.seq_length, spec.num_samples)
    rng = np.random.RandomState(seed=spec.seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, spec.seq_length, num_epochs, tokens_per_epoch)
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    return IndexMaps(doc_idx, sample_idx, shuffle_idx)
