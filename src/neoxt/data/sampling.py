"""GPT-NeoX sample construction: document, sample and shuffle indices over an indexed dataset.

A run imported from GPT-NeoX must keep drawing the samples it would have drawn there, so this module
reproduces upstream's ``megatron/data/gpt2_dataset.py`` (and the C++ ``build_sample_idx`` helper)
sample for sample: the same ``np.random.RandomState(seed)`` draws in the same order, the same
``num_epochs`` rule, the same dtypes in the cached ``.npy`` files, the same ``__len__`` (the last
shuffled sample is never drawn directly) and the same modulo fallback for out-of-range indices.
Upstream's cache files (``{prefix}_{name}_indexmap_..._{doc,sample,shuffle}_idx.npy``) are read and
written under the same names, so either stack can reuse the other's.

What is built, per ``pack_impl``:

* ``packed`` — the documents, tiled ``num_epochs`` times and shuffled as one array, form one token
  stream; sample ``j`` is tokens ``[j*seq_length, (j+1)*seq_length]`` of that stream (``seq_length+1``
  tokens, overlapping the next sample by one token); the samples are then shuffled.
* ``pack_until_overflow`` — documents in a shuffled order (reshuffled on every pass) are appended
  to the current sample until the next one would overflow ``seq_length+1`` tokens.
* ``unpacked`` — one document per sample, documents in order.

As upstream, a non-packed sample also carries the first token of the document that follows it (the
span ends at ``(next_doc, offset 0)`` inclusive) and is then padded (text 0, labels -100) or truncated
to ``seq_length+1``; ``allow_chopped: false`` skips documents longer than ``seq_length+1``.

Preference pairs (``PairwiseDataset``, upstream's ``pairwise_dataset.py``) share one index between
the chosen and rejected files: a pair packs by the longer side, both sides' labels decide skipping,
the cache is named after the chosen prefix without ``_ac``, and upstream's unpacked pairwise shuffle
(``arange(num_samples) % num_documents``) is kept.

Deliberate differences from upstream (each only where upstream crashes or reads the wrong data):
``pack_until_overflow`` / ``unpacked`` index the split's own documents (upstream uses document
``k`` where it means ``documents[k]``, which only differs for the valid/test part of a ``split``);
``unpacked`` works without a label dataset; a pass that skips its last document wraps around
instead of raising IndexError; a dataset whose documents can never fill a sample raises DataError
instead of looping forever; pack_until_overflow's last sample (which lacks the next document) is read
without its carried token where upstream's modulo retry would recurse forever; for pairs with
``allow_chopped: false`` pairs *longer* than ``seq_length+1`` are skipped (upstream's test is
inverted and skips the shorter ones).

Checked against upstream's own Python code (gpt2_dataset.py / pairwise_dataset.py run with stubbed
torch.distributed) on hundreds of random corpora: identical maps and items wherever upstream runs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np

from neoxt.data.index_cache import cache_paths, check_cache_writable, load_cached_arrays, save_cached_arrays
from neoxt.errors import DataError

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------------
# The packed index (upstream's default), vectorised.


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


def _build_packed(documents: np.ndarray, sizes: np.ndarray, spec: IndexSpec) -> IndexMaps:
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, spec.seq_length, spec.num_samples)
    rng = np.random.RandomState(seed=spec.seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, spec.seq_length, num_epochs, tokens_per_epoch)
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    return IndexMaps(doc_idx, sample_idx, shuffle_idx)


# --------------------------------------------------------------------------------------------------
# The document-per-sample modes. Their loops are sequential by nature (next-fit packing).


def _fully_masked(label: TokenSource, doc: int, limit: int) -> bool:
    """Upstream skips documents whose first ``limit`` labels are all -100 (nothing to learn)."""
    size = int(label.sizes[doc])
    head = label.get(doc, 0, min(size, limit))
    return bool(np.all(head == LABEL_PAD))


@dataclass(frozen=True, eq=False)
class _DocRules:
    """Which documents the non-packed modes take and how long each is.

    ``lengths`` is what a document adds to a pack_until_overflow sample (for a preference pair, the
    longer of chosen and rejected). With ``allow_chopped: false`` a document longer than
    ``seq_length+1`` in any of ``sizes`` is skipped; a document whose leading labels are all -100 in
    any of ``labels`` is skipped too (pack_until_overflow looks at ``seq_length+1`` labels, unpacked at
    ``seq_length``, as upstream).
    """

    lengths: np.ndarray
    sizes: tuple[np.ndarray, ...]
    labels: tuple[TokenSource, ...]

    def too_long(self, spec: IndexSpec) -> np.ndarray:
        """Per document id: skipped for its length (only with ``allow_chopped: false``)."""
        out = np.zeros(len(self.lengths), dtype=bool)
        if not spec.allow_chopped:
            for sizes in self.sizes:
                out |= sizes > spec.seq_length + 1
        return out

    def masked(self, doc: int, label_limit: int) -> bool:
        return any(_fully_masked(lab, doc, label_limit) for lab in self.labels)


def _build_pack_until_overflow(documents: np.ndarray, rules: _DocRules, spec: IndexSpec) -> IndexMaps:
    seq1 = spec.seq_length + 1
    rng = np.random.RandomState(seed=spec.seed)
    shuffle_idx = np.arange(spec.num_samples)
    rng.shuffle(shuffle_idx)
    n_docs = len(documents)
    perm = np.arange(n_docs)
    rng.shuffle(perm)
    docs = np.asarray(documents, dtype=np.int64)
    starts: list[int] = []
    doc_idx: list[int] = []
    running = 0
    pos = 0
    accepted_this_pass = 0
    too_long = rules.too_long(spec)
    check_labels = bool(rules.labels)

    def arrange() -> tuple[list[int], list[int], list[bool]]:
        ordered = docs[perm]
        return ordered.tolist(), rules.lengths[ordered].tolist(), too_long[ordered].tolist()

    order, order_lengths, order_skip = arrange()
    while len(starts) < spec.num_samples:
        if pos == n_docs:  # a pass ended on a skipped document (upstream raises IndexError here)
            if accepted_this_pass == 0:
                raise DataError(_nothing_fits(spec))
            pos, accepted_this_pass = 0, 0
            rng.shuffle(perm)
            order, order_lengths, order_skip = arrange()
        doc, length = order[pos], order_lengths[pos]
        if order_skip[pos] or (check_labels and rules.masked(doc, seq1)):
            pos += 1
            continue
        if running == 0:
            starts.append(len(doc_idx))
            running += length
        elif running + length > seq1:
            starts.append(len(doc_idx))
            running = length
        else:
            running += length
        doc_idx.append(doc)
        accepted_this_pass += 1
        pos += 1
        if pos == n_docs:
            pos, accepted_this_pass = 0, 0
            rng.shuffle(perm)
            order, order_lengths, order_skip = arrange()
    starts.append(len(doc_idx))
    sample_idx = np.zeros((len(starts), 2), dtype=np.int64)
    sample_idx[:, 0] = starts
    return IndexMaps(np.asarray(doc_idx, dtype=np.int64), sample_idx, shuffle_idx)


def _build_unpacked(documents: np.ndarray, rules: _DocRules, spec: IndexSpec) -> IndexMaps:
    rng = np.random.RandomState(seed=spec.seed)
    if spec.pairwise:
        # Upstream's pairwise shuffle only ever draws the first len(documents) samples, each repeatedly.
        shuffle_idx = np.arange(spec.num_samples) % len(documents)
    else:
        shuffle_idx = np.arange(spec.num_samples)
    rng.shuffle(shuffle_idx)
    sample_idx = np.zeros((spec.num_samples + 1, 2), dtype=np.int64)
    sample_idx[:, 0] = np.arange(spec.num_samples + 1)
    docs = np.asarray(documents, dtype=np.int64)
    too_long = rules.too_long(spec)
    need = spec.num_samples + 1
    usable: list[np.ndarray] = []
    found = 0
    chunk = 1 << 16
    # Documents are taken in order, cycling, skipping unusable ones; read only as many as needed.
    for lo in range(0, len(docs), chunk):
        part = docs[lo : lo + chunk]
        ok = ~too_long[part]
        if rules.labels:
            for k in np.flatnonzero(ok).tolist():
                ok[k] = not rules.masked(int(part[k]), spec.seq_length)
        usable.append(part[ok])
        found += int(ok.sum())
        if found >= need:
            break
    cycle = np.concatenate(usable) if usable else np.zeros(0, dtype=np.int64)
    if len(cycle) == 0:
        raise DataError(_nothing_fits(spec))
    return IndexMaps(np.resize(cycle, need), sample_idx, shuffle_idx)


def _nothing_fits(spec: IndexSpec) -> str:
    why = [] if spec.allow_chopped else [f"longer than seq_length+1={spec.seq_length + 1}"]
    why.append("or fully masked (all labels -100)")
    return (
        f"{spec.name}: every document is skipped ({' '.join(why)}); "
        f"no {spec.pack_impl} sample can be built"
    )


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
        return _build_packed(documents, sizes, spec)
    all_sizes = (sizes,) if pair_sizes is None else (sizes, np.asarray(pair_sizes))
    lengths = sizes if pair_sizes is None else np.maximum(sizes, np.asarray(pair_sizes))
    labels = tuple(x for x in (label, pair_label) if x is not None)
    rules = _DocRules(lengths, all_sizes, labels)
    if spec.pack_impl == "pack_until_overflow":
        return _build_pack_until_overflow(documents, rules, spec)
    return _build_unpacked(documents, rules, spec)


# --------------------------------------------------------------------------------------------------
# Cache (files: ``neoxt.data.index_cache``).


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


# --------------------------------------------------------------------------------------------------
# Reading samples.


def read_pieces(source: TokenSource, pieces: list[tuple[int, int, int]]) -> np.ndarray:
    """The tokens of (document, offset, length) pieces, concatenated."""
    if len(pieces) == 1:
        doc, offset, length = pieces[0]
        return source.get(doc, offset, length)
    return np.concatenate([source.get(doc, offset, length) for doc, offset, length in pieces])


def fit_length(tokens: np.ndarray, length: int, pad: float, dtype: type = np.int64) -> np.ndarray:
    """Pad with ``pad`` or truncate to ``length`` (upstream's item dtypes: int64, float32 for rewards)."""
    out = np.full(length, pad, dtype=dtype)
    n = min(length, len(tokens))
    out[:n] = tokens[:n]
    return out


def _per_token_reward(reward: TokenSource, pieces: list[tuple[int, int, int]]) -> np.ndarray:
    """Upstream spreads each document's reward (its first value) over that document's tokens."""
    return np.concatenate([np.full(length, reward.get(doc, 0, 1)[0], dtype=np.float32) for doc, _, length in pieces])


@dataclass(frozen=True, eq=False)
class GPTDataset:
    """One indexed dataset (plus aligned label / reward / reference-logprob datasets) seen through its
    index maps. ``self[i]`` is upstream's ``GPT2Dataset[i]``: ``{"text": int64[seq_length+1]}``, plus
    ``"label"`` (int64, padded -100), ``"reward"`` and ``"ref"`` (float32) when present.
    """

    name: str
    prefix: str
    text: TokenSource
    maps: IndexMaps
    seq_length: int
    label: TokenSource | None = None
    label_prefix: str | None = None
    reward: TokenSource | None = None
    ref: TokenSource | None = None

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        pieces = self.maps.pieces(self.maps.resolve(int(idx)), self.text.sizes)
        seq1 = self.seq_length + 1
        item = {"text": fit_length(read_pieces(self.text, pieces), seq1, TEXT_PAD)}
        if self.label is not None:
            item["label"] = fit_length(read_pieces(self.label, pieces), seq1, LABEL_PAD)
        if self.reward is not None:
            item["reward"] = fit_length(_per_token_reward(self.reward, pieces), seq1, 0.0, np.float32)
        if self.ref is not None:
            item["ref"] = fit_length(read_pieces(self.ref, pieces), seq1, 0.0, np.float32)
        return item


@dataclass(frozen=True, eq=False)
class PairwiseDataset:
    """Preference pairs (upstream's ``PairwiseDataset``): the same index maps select the chosen
    (``pos``) and rejected (``neg``) documents; each side is read with its own document lengths.
    ``self[i]`` = ``{"pos", "neg"}`` int64[seq_length+1] (+ ``pos_label``/``neg_label``, padded -100,
    and ``pos_ref``/``neg_ref`` float32 when present)."""

    name: str
    prefix: str
    pos: TokenSource
    neg: TokenSource
    maps: IndexMaps
    seq_length: int
    pos_label: TokenSource | None = None
    neg_label: TokenSource | None = None
    pos_ref: TokenSource | None = None
    neg_ref: TokenSource | None = None

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        row = self.maps.resolve(int(idx))
        seq1 = self.seq_length + 1
        item: dict[str, np.ndarray] = {}
        for side, text, label, ref in (
            ("pos", self.pos, self.pos_label, self.pos_ref),
            ("neg", self.neg, self.neg_label, self.neg_ref),
        ):
            pieces = self.maps.pieces(row, text.sizes)
            item[side] = fit_length(read_pieces(text, pieces), seq1, TEXT_PAD)
            if label is not None:
                item[f"{side}_label"] = fit_length(read_pieces(label, pieces), seq1, LABEL_PAD)
            if ref is not None:
                item[f"{side}_ref"] = fit_length(read_pieces(ref, pieces), seq1, 0.0, np.float32)
        return item


def check_aligned(text: TokenSource, other: TokenSource, text_prefix: str, other_prefix: str, what: str = "labels") -> None:
    """Labels (and reference log-probs) are read with the text's offsets, so every document must have
    the same length in both files."""
    ts, ls = np.asarray(text.sizes), np.asarray(other.sizes)
    if ts.shape != ls.shape:
        raise DataError(
            f"{what} file {other_prefix} has {ls.shape[0]} documents but text file {text_prefix} has "
            f"{ts.shape[0]}; they must be aligned token for token"
        )
    bad = np.flatnonzero(ts != ls)
    if len(bad):
        d = int(bad[0])
        raise DataError(
            f"{what} file {other_prefix} is not aligned with text file {text_prefix}: document {d} has "
            f"{int(ls[d])} {what} but {int(ts[d])} tokens ({len(bad)} documents differ)"
        )


def _check_documents(prefix: str, documents: np.ndarray, num_docs: int) -> None:
    if len(documents) and (documents.min() < 0 or documents.max() >= num_docs):
        raise DataError(f"{prefix}: document range outside the {num_docs} documents of the file")


def build_gpt_dataset(
    name: str,
    prefix: str,
    text: TokenSource,
    documents: np.ndarray,
    spec: IndexSpec,
    label: TokenSource | None = None,
    label_prefix: str | None = None,
    cache_dir: str | None = None,
    *,
    reward: TokenSource | None = None,
    reward_prefix: str | None = None,
    ref: TokenSource | None = None,
    ref_prefix: str | None = None,
) -> GPTDataset:
    """Check alignment, then load or build the cached maps and wrap them as a dataset."""
    if label is not None:
        check_aligned(text, label, prefix, label_prefix or "<label>")
    if ref is not None:
        check_aligned(text, ref, prefix, ref_prefix or "<ref>", "reference log-probs")
    if reward is not None:
        if spec.pack_impl != "unpacked":
            raise DataError(f"reward file {reward_prefix}: reward datasets need pack_impl 'unpacked' (as GPT-NeoX)")
        if len(reward.sizes) != len(text.sizes) or (len(reward.sizes) and np.min(reward.sizes) < 1):
            raise DataError(
                f"reward file {reward_prefix} must hold one non-empty entry for each of the "
                f"{len(text.sizes)} documents of {prefix}"
            )
    sizes = np.asarray(text.sizes)
    documents = np.asarray(documents)
    _check_documents(prefix, documents, len(sizes))
    maps = load_or_build_index_maps(prefix, documents, sizes, spec, label, cache_dir)
    return GPTDataset(name, prefix, text, maps, spec.seq_length, label, label_prefix, reward, ref)


def build_pairwise_dataset(
    name: str,
    pos_prefix: str,
    pos: TokenSource,
    neg_prefix: str,
    neg: TokenSource,
    documents: np.ndarray,
    spec: IndexSpec,
    labels: tuple[TokenSource, TokenSource] | None = None,
    label_prefixes: tuple[str, str] = ("<pos label>", "<neg label>"),
    refs: tuple[TokenSource, TokenSource] | None = None,
    cache_dir: str | None = None,
) -> PairwiseDataset:
    """Chosen/rejected datasets with one shared index (cached under the chosen prefix, as upstream)."""
    if len(pos.sizes) != len(neg.sizes):
        raise DataError(
            f"preference data: {pos_prefix} has {len(pos.sizes)} documents but {neg_prefix} has "
            f"{len(neg.sizes)}; chosen and rejected must pair up one to one"
        )
    if labels is not None:
        check_aligned(pos, labels[0], pos_prefix, label_prefixes[0])
        check_aligned(neg, labels[1], neg_prefix, label_prefixes[1])
    if refs is not None:
        check_aligned(pos, refs[0], pos_prefix, f"{pos_prefix}_<ref>", "reference log-probs")
        check_aligned(neg, refs[1], neg_prefix, f"{neg_prefix}_<ref>", "reference log-probs")
    spec = replace(spec, pairwise=True)
    documents = np.asarray(documents)
    _check_documents(pos_prefix, documents, len(pos.sizes))
    maps = load_or_build_index_maps(
        pos_prefix, documents, np.asarray(pos.sizes), spec, labels[0] if labels else None, cache_dir,
        pair_sizes=np.asarray(neg.sizes), pair_label=labels[1] if labels else None,
    )
    pos_label, neg_label = labels if labels is not None else (None, None)
    pos_ref, neg_ref = refs if refs is not None else (None, None)
    return PairwiseDataset(name, pos_prefix, pos, neg, maps, spec.seq_length, pos_label, neg_label, pos_ref, neg_ref)
