"""Samples/s of the packed loader at seq 2048, beside raw numpy memmap slicing of the same tokens.

    .venv/bin/python benchmarks/loader.py [--tokens 100_000_000] [--seq-length 2048] [--micro-batch 8]

Writes a synthetic uint16 corpus (random document lengths, EOD-terminated) to a temporary
directory, builds GPT-NeoX's packed index maps for it, then times:

* ``index build``  — doc/sample/shuffle index construction (numpy, no cache);
* ``dataset[i]``   — one packed sample (shuffled order, possibly spanning documents), int64;
* ``loader``       — ``BatchLoader`` micro-batches as the trainer gets them (tokens, labels, loss mask,
  position ids as torch tensors);
* ``memmap slice`` — the peer: slicing seq_length+1 contiguous tokens at the same shuffled sample
  starts straight out of a ``np.memmap`` of the ``.bin`` and casting to int64, i.e. the floor any
  packed loader reading this format pays.

Prints one table; asserts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import argparse
import os
import tempfile
import time

import numpy as np

from neoxt.data.index_builder import build_index_maps
from neoxt.data.index_maps import IndexSpec
from neoxt.data.indexed import IndexedDataset, IndexedDatasetWriter
from neoxt.data.loader import BatchLoader
from neoxt.data.sampling import GPTDataset

EOD = 0


def write_corpus(prefix: str, total_tokens: int, seed: int = 0) -> IndexedDataset:
    rng = np.random.RandomState(seed)
    # Document lengths roughly like web text: log-normal, median ~400 tokens.
    lengths = np.maximum(2, rng.lognormal(mean=6.0, sigma=1.0, size=total_tokens // 300)).astype(np.int64)
    lengths = lengths[np.cumsum(lengths) <= total_tokens]
    tokens = rng.randint(1, 50000, size=int(lengths.sum()), dtype=np.uint16)
    tokens[np.cumsum(lengths) - 1] = EOD
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_documents(tokens, lengths)
    w.finalize()
    return IndexedDataset(prefix)


def timed(fn, min_seconds: float = 2.0) -> tuple[int, float]:
    """Run ``fn(k)`` for k = 0, 1, ... until ``min_seconds`` pass; return (calls, seconds)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn(calls)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000_000, help="corpus size in tokens")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = ap.parse_args()
    seq = args.seq_length

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench_text_document")
        t0 = time.perf_counter()
        ds = write_corpus(prefix, args.tokens)
        write_s = time.perf_counter() - t0
        num_samples = (int(ds.sizes.sum()) - 1) // seq
        spec = IndexSpec("train", num_samples, seq, 1234, "packed", True)
        documents = np.arange(len(ds), dtype=np.int32)
        t0 = time.perf_counter()
        maps = build_index_maps(documents, ds.sizes, spec)
        index_s = time.perf_counter() - t0
        data = GPTDataset("train", prefix, ds, maps, seq)
        n = len(data)

        _, _ = timed(lambda k: data[k % n], 0.3)  # warm the page cache
        calls, secs = timed(lambda k: data[k % n], args.seconds)
        item_rate = calls / secs

        loader = BatchLoader(data, args.micro_batch)
        next(loader)  # the first batch imports torch
        calls, secs = timed(lambda k: next(loader), args.seconds)
        loader_rate = calls * args.micro_batch / secs

        # Peer: the same sample starts (stream offsets in the shuffled doc order would need the same
        # index; the cost that matters is the slice), read as contiguous runs of the .bin.
        raw = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r")
        starts = (np.asarray(maps.shuffle_idx[:n], dtype=np.int64) * seq) % (len(raw) - seq - 1)
        calls, secs = timed(lambda k: raw[starts[k % n] : starts[k % n] + seq + 1].astype(np.int64), args.seconds)
        raw_rate = calls / secs

        def raw_batch(k: int) -> None:
            b = args.micro_batch
            rows = [raw[s : s + seq + 1] for s in starts[(k * b) % (n - b) : (k * b) % (n - b) + b]]
            np.stack(rows).astype(np.int64)

        calls, secs = timed(raw_batch, args.seconds)
        raw_batch_rate = calls * args.micro_batch / secs

    print(f"corpus: {args.tokens:,} tokens requested, {len(documents):,} documents, uint16; "
          f"seq_length {seq}; written in {write_s:.1f} s")
    print(f"packed index build (doc/sample/shuffle, {num_samples:,} samples): {index_s:.2f} s")
    print()
    print(f"{'what':<42}{'samples/s':>12}{'tokens/s':>16}")
    rows = [
        ("neoxt dataset[i] (packed, shuffled)", item_rate),
        (f"neoxt BatchLoader (micro-batch {args.micro_batch}, torch)", loader_rate),
        ("peer: np.memmap slice -> int64", raw_rate),
        (f"peer: np.memmap slices, stacked x{args.micro_batch}", raw_batch_rate),
    ]
    for name, rate in rows:
        print(f"{name:<42}{rate:>12,.0f}{rate * (seq + 1):>16,.0f}")


if __name__ == "__main__":
    main()
