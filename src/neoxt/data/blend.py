"""Weighted blends of datasets and train/valid/test splits, as GPT-NeoX computes them.

Upstream: ``megatron/data/data_utils.py`` (split strings, normalised weights with the 0.5% head
room, ``weights_by_num_docs``) and ``blendable_dataset.py`` with the C++ ``build_blending_indices``.
The blending order is a greedy "largest deficit first" choice; it is reproduced here with the same
double-precision arithmetic and tie rule (lowest dataset index wins), so a blend draws its samples
from the same datasets in the same order as upstream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from neoxt.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]: ...


def split_boundaries(split: str, size: int, key: str = "split") -> list[int]:
    """Document boundaries ``[0, a, b, size]`` for a ``split`` string such as ``969,30,1`` or ``98/2``.

    Upstream rounds each part, then shifts every boundary but the first by the rounding excess.
    """
    sep = "," if "," in split else "/" if "/" in split else None
    try:
        parts = [float(s) for s in (split.split(sep) if sep else [split])]
    except ValueError:
        raise ConfigError(f"{key}: {split!r} is not a list of numbers separated by ',' or '/'") from None
    parts = (parts + [0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"{key}: {split!r} must hold non-negative parts with a positive sum")
    total = sum(parts)
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + int(round(part / total * float(size))))
    diff = bounds[-1] - size
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def normalized_weights_and_num_samples(
    weights: Sequence[float], num_samples: int
) -> tuple[list[float], list[int]]:
    """Weights normalised to sum 1 and per-dataset sample counts ``ceil(num_samples * w * 1.005)``.

    The 0.5% head room lets the blend draw a few more samples from a dataset than its exact share.
    """
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ConfigError(f"data weights {list(weights)} must be non-negative with a positive sum")
    norm = [w / total for w in weights]
    return norm, [int(math.ceil(num_samples * w * 1.005)) for w in norm]


def weights_by_num_docs(num_docs: Sequence[int], alpha: float = 0.3) -> list[float]:
    """Upstream's ``weights_by_num_docs``: p_i ∝ (n_i/N)^alpha, then × (1 - n_i/N), normalised.

    alpha < 1 up-samples small datasets (https://arxiv.org/abs/1911.02116).
    """
    if len(num_docs) == 1:
        return [1.0]
    total = sum(num_docs)
    unbiased = [n / total for n in num_docs]
    probs = [p**alpha for p in unbiased]
    s = sum(probs)
    probs = [p / s for p in probs]
    weights = [p * (1 - u) for p, u in zip(probs, unbiased)]
    s = sum(weights)
    return [w / s for w in weights]


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index uint8[size], dataset_sample_index int64[size]) as upstream's C++ helper.

    Sample ``t`` goes to the dataset with the largest ``w_i * max(t, 1) - count_i`` (ties: lowest
    index); its sample index is that dataset's running count. A tight loop on Python floats, which
    are the same doubles the C++ uses (a vectorised form would not reproduce ties and rounding).
    """
    w = [float(x) for x in np.asarray(weights, dtype=np.float64) / np.sum(weights, dtype=np.float64)]
    n = len(w)
    if not 0 < n < 255:
        raise ConfigError(f"a blend needs between 1 and 254 datasets, got {n}")
    choice = np.zeros(size, dtype=np.uint8)
    counts = [0] * n
    picks: list[int] = []
    append = picks.append
    if n == 1:
        choice[:] = 0
        return choice, np.arange(size, dtype=np.int64)
    if n == 2:
        w0, w1 = w
        c0 = c1 = 0
        for t in range(size):
            x = float(t) if t > 1 else 1.0
            if w1 * x - c1 > w0 * x - c0:
                append(1)
                c1 += 1
            else:
                append(0)
                c0 += 1
        counts = [c0, c1]
    else:
        rng = range(1, n)
        for t in range(size):
            x = float(t) if t > 1 else 1.0
            best, best_err = 0, w[0] * x - counts[0]
            for i in rng:
                err = w[i] * x - counts[i]
                if err > best_err:
                    best, best_err = i, err
            append(best)
            counts[best] += 1
    choice[:] = picks
    sample = np.empty(size, dtype=np.int64)
    for i in range(n):
        where = np.flatnonzero(choice == i)
        sample[where] = np.arange(len(where), dtype=np.int64)
    return choice, sample


@dataclass(frozen=True, eq=False)
class BlendedDataset:
    """Upstream's ``BlendableDataset``: ``len`` is the sum of the parts' lengths; sample ``t`` is
    sample ``dataset_sample_index[t]`` of dataset ``dataset_index[t]`` (which wraps around by modulo
    when the blend asks a part for more samples than it holds, as upstream)."""

    datasets: tuple[Dataset, ...]
    weights: tuple[float, ...]
    dataset_index: np.ndarray
    dataset_sample_index: np.ndarray

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def source(self, idx: int) -> tuple[int, int]:
        """(dataset, sample within it) for blended sample ``idx``."""
        if not 0 <= idx < len(self):
            idx = idx % len(self)
        return int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        d, s = self.source(int(idx))
        return self.datasets[d][s]


def blend(datasets: Sequence[Dataset], weights: Sequence[float]) -> BlendedDataset:
    """Blend ``datasets`` with (unnormalised) ``weights``; its length is the sum of theirs."""
    if len(datasets) != len(weights):
        raise ConfigError(f"{len(datasets)} datasets but {len(weights)} weights")
    size = sum(len(d) for d in datasets)
    if size == 0:
        raise DataError("blend of empty datasets")
    if size >= 10_000_000:
        log.info("building blend indices for %d samples over %d datasets", size, len(datasets))
    index, sample = blending_indices(weights, size)
    norm = np.asarray(weights, dtype=np.float64) / np.sum(weights, dtype=np.float64)
    return BlendedDataset(tuple(datasets), tuple(float(x) for x in norm), index, sample)
