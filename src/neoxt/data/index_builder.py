"""Build or reuse the index maps for one dataset: check the spec, pick the ``pack_impl`` builder, cache.

Checked against upstream's own Python code (``gpt2_dataset.py`` / ``pairwise_dataset.py`` run with
stubbed torch.distributed) on hundreds of random corpora: identical maps wherever upstream runs.
The cache files themselves (names, concurrent writers) are ``neoxt.data.index_cache``.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from neoxt.data.document_index import DocRules, build_pack_until_overflow, build_unpacked
from neoxt.data.index_cache import cache_paths, check_cache_writable, load_cached_arrays, save_cached_arrays
from neoxt.data.index_maps import PACK_IMPLS, IndexMaps, IndexSpec, TokenSource
from neoxt.data.packed_index import build_packed, num_epochs_needed
from neoxt.errors import DataError

log = logging.getLogger(__name__)


def build_index_maps(
    documents: np.ndarray,
    sizes: np.ndarray,
    spec: IndexSpec,
    label: TokenSource | None = None,
    *,
    pair_sizes: np.ndarray | None = None,
    pair_label: TokenSource | None = None,
) -> IndexMaps:
    """Build (without caching) the index maps upstream would build for these documents.

    For preference data (``spec.pairwise``), ``sizes``/``label`` are the chosen side and
    ``pair_sizes``/``pair_label`` the rejected side; both sides share the maps.
    """
    if spec.pack_impl not in PACK_IMPLS:
        raise DataError(f"unknown pack_impl {spec.pack_impl!r} (expected one of {', '.join(PACK_IMPLS)})")
    if spec.seq_length < 2:
        raise DataError(f"seq_length must be at least 2, got {spec.seq_length}")
    if spec.num_samples < 0:
        raise DataError(f"{spec.name}: negative number of samples {spec.num_samples}")
    documents = np.asarray(documents)
    if len(documents) == 0:
        raise DataError(f"{spec.name}: no documents to build samples from")
    sizes = np.asarray(sizes)
    if spec.pack_impl == "packed":
        if spec.pairwise:
            raise DataError(f"{spec.name}: preference (pairwise) data needs pack_impl unpacked or pack_until_overflow")
        return build_packed(documents, sizes, spec)
    all_sizes = (sizes,) if pair_sizes is None else (sizes, np.asarray(pair_sizes))
    lengths = sizes if pair_sizes is None else np.maximum(sizes, np.asarray(pair_sizes))
    labels = tuple(x for x in (label, pair_label) if x is not None)
    rules = DocRules(lengths, all_sizes, labels)
    if spec.pack_impl == "pack_until_overflow":
        return build_pack_until_overflow(documents, rules, spec)
    return build_unpacked(documents, rules, spec)



def _plausible(maps: IndexMaps, documents: np.ndarray, sizes: np.ndarray, spec: IndexSpec) -> bool:
    """Cheap staleness check: the cache name records neither the data nor the split's document range
    (a changed ``split`` string keeps the names), so confirm the maps still fit both."""
    if len(maps.doc_idx) and int(np.max(maps.doc_idx)) >= len(sizes):
        return False
    if spec.pack_impl == "packed":
        # Every document of the range appears in doc_idx, so its extremes must be the range's.
        if len(documents) and (
            int(np.min(maps.doc_idx)) != int(np.min(documents)) or int(np.max(maps.doc_idx)) != int(np.max(documents))
        ):
            return False
        tokens = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
        epochs = num_epochs_needed(tokens, spec.seq_length, spec.num_samples)
        return (
            maps.doc_idx.shape[0] == epochs * len(documents)
            and maps.sample_idx.shape[0] == (epochs * tokens - 1) // spec.seq_length + 1
        )
    return maps.shuffle_idx.shape[0] == spec.num_samples


def load_or_build_index_maps(
    prefix: str,
    documents: np.ndarray,
    sizes: np.ndarray,
    spec: IndexSpec,
    label: TokenSource | None = None,
    cache_dir: str | None = None,
    *,
    pair_sizes: np.ndarray | None = None,
    pair_label: TokenSource | None = None,
) -> IndexMaps:
    """Reuse the cached maps (ours or GPT-NeoX's) or build and cache them.

    Every process may call this: the files are written under temporary names unique to the process
    and renamed into place, so concurrent builders (identical arrays) never expose a partial file.
    """
    paths = cache_paths(prefix, spec, cache_dir)
    arrays = load_cached_arrays(paths)
    cached = IndexMaps(arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]) if arrays else None
    if cached is not None and _plausible(cached, np.asarray(documents), sizes, spec):
        return cached
    if cached is not None:
        log.warning("index cache %s does not match the data; rebuilding", paths["doc_idx"])
    check_cache_writable(paths)  # before the build, which can take minutes
    log.info(
        "building %s index maps for %s (%d samples of %d tokens, %d documents)",
        spec.pack_impl, os.path.basename(prefix), spec.num_samples, spec.seq_length, len(documents),
    )
    started = time.perf_counter()
    maps = build_index_maps(documents, sizes, spec, label, pair_sizes=pair_sizes, pair_label=pair_label)
    save_cached_arrays(paths, {"doc_idx": maps.doc_idx, "sample_idx": maps.sample_idx,
                               "shuffle_idx": maps.shuffle_idx})
    stem = paths["doc_idx"][: -len("_doc_idx.npy")]
    log.info("index maps cached as %s_*.npy (%.1f s)", stem, time.perf_counter() - started)
    return maps
