"""The document-per-sample index modes; their loops are sequential by nature (next-fit packing).

* ``pack_until_overflow`` — documents in a shuffled order (reshuffled on every pass) are appended
  to the current sample until the next one would overflow ``seq_length+1`` tokens.
* ``unpacked`` — one document per sample, documents in order.

As upstream, a sample also carries the first token of the document that follows it (the span ends at
``(next_doc, offset 0)`` inclusive; see ``IndexMaps.pieces``); ``allow_chopped: false`` skips
documents longer than ``seq_length+1``, and documents whose leading labels are all -100 are skipped.
Preference pairs (upstream's ``pairwise_dataset.py``) pack by the longer side, both sides' labels
decide skipping, and upstream's unpacked pairwise shuffle (``arange(num_samples) % num_documents``)
is kept.

Deliberate differences from upstream (each only where upstream crashes or reads the wrong data):
both modes index the split's own documents (upstream uses document ``k`` where it means
``documents[k]``, which only differs for the valid/test part of a ``split``); ``unpacked`` works
without a label dataset; a pass that skips its last document wraps around instead of raising
IndexError; a dataset whose documents can never fill a sample raises DataError instead of looping
forever; for pairs with ``allow_chopped: false`` pairs *longer* than ``seq_length+1`` are skipped
(upstream's test is inverted and skips the shorter ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neoxt.data.index_maps import LABEL_PAD, IndexMaps, IndexSpec, TokenSource
from neoxt.errors import DataError


def _fully_masked(label: TokenSource, doc: int, limit: int) -> bool:
    """Upstream skips documents whose first ``limit`` labels are all -100 (nothing to learn)."""
    size = int(label.sizes[doc])
    head = label.get(doc, 0, min(size, limit))
    return bool(np.all(head == LABEL_PAD))


@dataclass(frozen=True, eq=False)
class DocRules:
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


def build_pack_until_overflow(documents: np.ndarray, rules: DocRules, spec: IndexSpec) -> IndexMaps:
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


def build_unpacked(documents: np.ndarray, rules: DocRules, spec: IndexSpec) -> IndexMaps:
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
