"""Blends and splits as GPT-NeoX computes them (data_utils.py, blendable_dataset.py, helpers.cpp)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neoxt.data.blend import (
    blend,
    blending_indices,
    normalized_weights_and_num_samples,
    split_boundaries,
    weights_by_num_docs,
)
from neoxt.errors import ConfigError


def reference_blending(weights, size):
    """helpers.cpp build_blending_indices, transcribed as a plain loop."""
    w = np.array(weights, dtype=np.float64)
    w /= np.sum(w)
    current = [0] * len(w)
    index, sample = [], []
    for t in range(size):
        x = max(float(t), 1.0)
        best = 0
        best_err = w[0] * x - current[0]
        for i in range(1, len(w)):
            err = w[i] * x - current[i]
            if err > best_err:
                best, best_err = i, err
        index.append(best)
        sample.append(current[best])
        current[best] += 1
    return index, sample


@pytest.mark.parametrize(
    "weights",
    [[0.7, 0.3], [1.0, 1.0], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [3.0, 1.0, 0.5, 0.25, 7.0], [1.0]],
)
def test_blending_indices_match_upstream_helper(weights):
    size = 3000
    index, sample = blending_indices(weights, size)
    want_index, want_sample = reference_blending(weights, size)
    assert index.dtype == np.uint8 and sample.dtype == np.int64
    assert index.tolist() == want_index
    assert sample.tolist() == want_sample


def test_blend_realises_weights_within_one_percent_over_10k_samples():
    class Fake:
        def __init__(self, n, tag):
            self.n, self.tag = n, tag

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"text": np.array([self.tag, i])}

    for weights in ([0.7, 0.3], [5.0, 3.0, 2.0], [0.1, 0.1, 0.8]):
        norm, counts = normalized_weights_and_num_samples(weights, 10_000)
        parts = [Fake(c, k) for k, c in enumerate(counts)]
        b = blend(parts, norm)
        assert len(b) == sum(counts)
        tags = np.array([b[i]["text"][0] for i in range(10_000)])
        for k, w in enumerate(norm):
            assert abs(np.mean(tags == k) - w) < 0.01, (weights, k)
        # Each part is read sequentially from its own sample 0.
        firsts = [int(b[i]["text"][1]) for i in range(10_000) if b[i]["text"][0] == 0][:5]
        assert firsts == [0, 1, 2, 3, 4]


def test_normalized_weights_and_num_samples():
    norm, counts = normalized_weights_and_num_samples([2.0, 1.0, 1.0], 1000)
    assert norm == [0.5, 0.25, 0.25]
    assert counts == [math.ceil(1000 * 0.5 * 1.005), math.ceil(1000 * 0.25 * 1.005)] * 1 + [252]
    with pytest.raises(ConfigError):
        normalized_weights_and_num_samples([0.0, 0.0], 10)


def test_weights_by_num_docs():
    assert weights_by_num_docs([123]) == [1.0]
    w = weights_by_num_docs([100, 900], alpha=0.3)
    p = [0.1**0.3, 0.9**0.3]
    p = [x / sum(p) for x in p]
    raw = [p[0] * 0.9, p[1] * 0.1]
    assert w == pytest.approx([x / sum(raw) for x in raw])
    assert w[0] > 0.1  # small datasets are up-sampled
    assert sum(weights_by_num_docs([5, 50, 500], alpha=1.0)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("split", "size", "want"),
    [
        ("969,30,1", 1000, [0, 969, 999, 1000]),
        ("969, 30, 1", 100, [0, 97, 100, 100]),
        ("98/2", 50, [0, 49, 50, 50]),
        ("1", 7, [0, 7, 7, 7]),
        ("1,1,1", 10, [0, 4, 7, 10]),  # rounding excess moves every boundary but the first
        ("2,1,1", 5, [0, 3, 4, 5]),  # Python round(): 2.5 -> 2, then shifted by the excess
    ],
)
def test_split_boundaries(split, size, want):
    assert split_boundaries(split, size) == want


def test_bad_split_is_a_config_error():
    with pytest.raises(ConfigError, match="split.*'a,b'"):
        split_boundaries("a,b", 10)
    with pytest.raises(ConfigError, match="positive sum"):
        split_boundaries("0,0,0", 10)
