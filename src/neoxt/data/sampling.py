"""GPT-NeoX's samples: an indexed dataset (plus its label, reward and reference files) read through
its index maps, item for item as upstream's ``GPT2Dataset`` / ``PairwiseDataset``.

A non-packed sample is padded (text 0, labels -100) or truncated to ``seq_length+1``. Preference pairs
share one index between the chosen and rejected files, cached under the chosen prefix (without
``_ac``, as upstream). One deliberate difference from upstream: pack_until_overflow's last sample
(which lacks the next document) is read without its carried token, where upstream's modulo retry
would recurse forever. The maps themselves: ``neoxt.data.index_maps`` and ``neoxt.data.index_builder``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from neoxt.data.index_builder import load_or_build_index_maps
from neoxt.data.index_maps import LABEL_PAD, TEXT_PAD, IndexMaps, IndexSpec, TokenSource
from neoxt.errors import DataError


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
