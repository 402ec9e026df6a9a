"""``neoxt preprocess``: text documents -> ``<prefix>_<key>_document.bin/.idx``, streaming and parallel.

The shape of the pipeline (shared with ``preprocess-chat``): the main process reads batches of
records (``readers``), hands them to a pool of worker processes that parse and tokenize, and
writes the results *in input order*. At most a few batches per worker are in flight, so memory
stays flat however large the input is. Workers are spawned (not forked) and run single-threaded
tokenizers, so ``--workers N`` means N busy cores and nothing else.

Decisions where upstream (tools/datasets/preprocess_data.py) is silent or odd:

- Every key is tokenized from its own field (upstream tokenized the ``text`` field for every key).
- A document whose text is empty or null for any key — or that tokenizes to no tokens — is dropped
  (upstream drops empty texts) and counted in the summary; dropping it from every key's file keeps
  document ``i`` of each file the same record. An input with no documents at all is an error.
- A value that is a list of strings is joined with blank lines (lm_dataformat's behaviour).
- ``--ftfy`` applies ``ftfy.fix_text`` before tokenizing, as upstream; without the package it is an
  error, not a silent no-op.
- Malformed JSON, a missing key or a non-text value is an error naming ``file:line``; with
  ``skip_bad_lines`` the record is skipped and counted instead.
- Output goes to temporary names unique to the process and is renamed only when every record has
  been written; the outputs are checked writable first and locked for the run (see ``outputs``).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neoxt.config.schema import TokenizerConfig
from neoxt.data.indexed import IndexedDatasetWriter, best_fitting_dtype
from neoxt.data.outputs import check_output_prefix
from neoxt.data.readers import Batch, decode_payload, expand_inputs, iter_batches
from neoxt.errors import DataError


@dataclass
class EncodedBatch:
    """What a worker sends back for one input batch: per output, the kept documents' tokens."""

    arrays: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (concatenated tokens, lengths)
    docs: int = 0
    bad: list[str] = field(default_factory=list)  # one message per rejected record, with its location
    empty: int = 0
    nbytes: int = 0
    # Token count when only counting (arrays empty), e.g. prepare-hf's count stage.
    tokens: int = 0


@dataclass
class PipelineStats:
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    skipped_bad: int = 0
    dropped_empty: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    first_bad: list[str] = field(default_factory=list)  # a few examples for the summary

    @property
    def tokens_per_s(self) -> float:
        total = next(iter(self.tokens.values()), 0)
        return total / self.seconds if self.seconds > 0 else 0.0


def pack(seqs: Sequence[Sequence[int]], dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (concatenation, lengths): cheap to pickle back from a worker."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def text_field(rec: dict[str, Any], key: str, where: str) -> str:
    """The text under ``key``; DataError naming the location when it is missing or not text."""
    if key not in rec:
        raise DataError(f"{where}: missing key {key!r} (keys: {', '.join(map(str, rec)) or 'none'})")
    value = rec[key]
    if value is None:  # a null cell (common in HF datasets) is an empty document
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n\n".join(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: key {key!r} holds {type(value).__name__}, expected text")
    return value


# --- worker pool -----------------------------------------------------------------------------------

_WORKER: Any = None


def _worker_init(factory: Callable[[Any], Callable[[Batch], EncodedBatch]], arg: Any) -> None:
    global _WORKER
    # Ctrl-C is the main process's to handle (it discards the outputs and terminates the pool);
    # workers ignoring it keeps the terminal free of one traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One busy core per worker: no Rust thread pool inside each (N processes x all cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        _WORKER = factory(arg)
    except BaseException as err:  # reported on first use; a raising initializer makes Pool respawn forever
        _WORKER = err


def _worker_run(batch: Batch) -> EncodedBatch:
    if isinstance(_WORKER, BaseException):
        raise _WORKER
    return _WORKER(batch)


def ordered_results(
    batches: Iterable[Batch],
    factory: Callable[[Any], Callable[[Batch], EncodedBatch]],
    arg: Any,
    workers: int,
) -> Iterator[EncodedBatch]:
    """Encoded batches in input order, with at most ~2 batches per worker in flight."""
    if workers <= 1:
        # One worker means one core, as upstream's single process did (and as a SLURM task with one
        # CPU expects): no Rust thread pool here either. Restored afterwards for the caller.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            encode = factory(arg)
            for batch in batches:
                yield encode(batch)
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(factory, arg))
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_worker_run, (batch,)))
            if len(pending) >= 2 * workers + 1:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class Progress:
    """Documents done, with tokens and bytes per second, over the one display (``neoxt.progress``)."""

    def __init__(self, total_docs: int | None, label: str, every_s: float = 10.0):
        from neoxt.progress import Progress as Display

        self.label = label
        self.start = time.monotonic()
        self.tokens = 0
        self.nbytes = 0
        self.display = Display(total_docs, label, "doc", every_s, describe=self._line)

    def _line(self, docs: int) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate, mbs = self.tokens / elapsed, self.nbytes / elapsed / 2**20
        toks = f", {self.tokens:,} tokens ({rate:,.0f} tokens/s, {mbs:.1f} MB/s)" if self.tokens else f" ({mbs:.1f} MB/s)"
        return f"{self.label}: {docs:,} documents{toks}"

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.tokens += tokens
        self.nbytes += nbytes
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        self.display.update(docs, f"{self.tokens:,} tok, {rate:,.0f} tok/s" if self.tokens else None)

    def close(self) -> None:
        self.display.close()


def _raise_on_sigterm() -> Any:
    """Turn SIGTERM (kill, SLURM preemption) into SystemExit so the outputs are discarded cleanly."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def run_pipeline(
    batches: Iterable[Batch],
    factory: Callable[[Any], Callable[[Batch], EncodedBatch]],
    arg: Any,
    writers: dict[str, IndexedDatasetWriter],
    workers: int = 1,
    skip_bad_lines: bool = False,
    num_docs: int | None = None,
    label: str = "tokenizing",
) -> PipelineStats:
    """Encode every batch, write results in order, finalize all writers only if everything succeeded.

    On any error (a bad record without ``skip_bad_lines``, an exception, Ctrl-C, SIGTERM) every writer is
    discarded, so nothing is left under a final name.
    """
    stats = PipelineStats(tokens={name: 0 for name in writers})
    progress = Progress(num_docs, label)
    start = time.monotonic()
    previous_term = _raise_on_sigterm()
    try:
        for enc in ordered_results(batches, factory, arg, workers):
            if enc.bad:
                if not skip_bad_lines:
                    raise DataError(f"{enc.bad[0]} (pass --skip-bad-lines to skip such records)")
                stats.skipped_bad += len(enc.bad)
                stats.first_bad.extend(enc.bad[: max(0, 5 - len(stats.first_bad))])
            stats.dropped_empty += enc.empty
            stats.input_bytes += enc.nbytes
            stats.documents += enc.docs
            for name, (flat, lengths) in enc.arrays.items():
                writers[name].add_documents(flat, lengths)
                stats.tokens[name] += len(flat)
            progress.update(enc.docs, len(next(iter(enc.arrays.values()))[0]) if enc.arrays else 0,
                            enc.nbytes)
        if stats.documents == 0:
            raise DataError("no documents to write: every input record was empty or skipped"
                            + (f" ({stats.skipped_bad} bad, {stats.dropped_empty} empty)"
                               if stats.skipped_bad or stats.dropped_empty else ""))
        for writer in writers.values():  # every index complete before any file takes its final name
            writer.write_index()
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        progress.close()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    stats.seconds = time.monotonic() - start
    return stats


def check_outputs(prefixes: Iterable[str]) -> None:
    """Every output prefix writable (DataError otherwise): the first thing a data command does."""
    for prefix in prefixes:
        check_output_prefix(prefix, create=False)


def open_writers(outputs: dict[str, str], dtype: Any) -> dict[str, IndexedDatasetWriter]:
    """One writer (and lock) per output; if any cannot be claimed, the ones already open are dropped."""
    writers: dict[str, IndexedDatasetWriter] = {}
    try:
        for name, prefix in outputs.items():
            writers[name] = IndexedDatasetWriter(prefix, dtype)
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    return writers


# --- plain text documents --------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncodeSpec:
    tokenizer: TokenizerConfig
    keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    ftfy: bool = False


def _load_ftfy() -> Callable[[str], str]:
    try:
        import ftfy
    except ImportError as err:
        raise DataError("--ftfy needs the 'ftfy' package: pip install ftfy") from err
    return ftfy.fix_text


class TextEncoder:
    """Batch -> tokens per key. Built once per worker process (loads the tokenizer there)."""

    def __init__(self, spec: TextEncodeSpec):
        from neoxt.tokenizer import load_tokenizer

        self.spec = spec
        self.tok = load_tokenizer(spec.tokenizer)
        if spec.append_eod and self.tok.eod_id is None:
            raise DataError(f"--append-eod: tokenizer {self.tok.name} has no end-of-document token")
        self.fix = _load_ftfy() if spec.ftfy else None

    def __call__(self, batch: Batch) -> EncodedBatch:
        keys = self.spec.keys
        out = EncodedBatch(arrays={})
        rows: list[list[str]] = []
        for i in range(len(batch.payloads)):
            try:
                rec = decode_payload(batch, i)
                if rec is None:
                    continue
                values = [text_field(rec, k, batch.location(i)) for k in keys]
            except DataError as err:
                out.bad.append(str(err))
                continue
            if any(not v for v in values):
                out.empty += 1
                continue
            if self.fix is not None:  # upstream: ftfy.fix_text before tokenizing
                values = [self.fix(v) for v in values]
            out.nbytes += sum(len(v) for v in values)
            rows.append(values)
        encoded = [self.tok.encode_batch([r[k] for r in rows]) for k in range(len(keys))]
        keep = [all(len(enc[j]) for enc in encoded) for j in range(len(rows))]
        if not all(keep):
            out.empty += keep.count(False)
            encoded = [[ids for ids, ok in zip(enc, keep) if ok] for enc in encoded]
        if self.spec.append_eod:
            eod = self.tok.eod_id
            encoded = [[ids + [eod] for ids in enc] for enc in encoded]
        out.docs = sum(keep)
        out.arrays = {key: pack(enc) for key, enc in zip(keys, encoded)}
        return out


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Upstream's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


@dataclass(frozen=True)
class PreprocessResult:
    outputs: dict[str, str]  # key -> dataset prefix
    stats: PipelineStats
    dtype: np.dtype


def preprocess(
    inputs: str | Sequence[str],
    output_prefix: str,
    tokenizer: TokenizerConfig,
    keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    ftfy: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    num_docs: int | None = None,
    batch_size: int = 256,
    split: str | None = None,
    subset: str | None = None,
) -> PreprocessResult:
    """Tokenize documents into one indexed dataset per key; returns where they went and the counts."""
    from neoxt.tokenizer import load_tokenizer

    keys = tuple(keys)
    if not keys or len(set(keys)) != len(keys):
        raise DataError(f"--jsonl-keys must be distinct and non-empty, got {list(keys)}")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    paths = expand_inputs(inputs)
    outputs = {key: output_prefix_for(output_prefix, key) for key in keys}
    check_outputs(outputs.values())  # an unwritable output fails before the tokenizer is even loaded
    tok = load_tokenizer(tokenizer)  # fail here, in the main process, on a bad tokenizer
    dtype = best_fitting_dtype(tok.vocab_size)
    spec = TextEncodeSpec(tokenizer=tokenizer, keys=keys, append_eod=append_eod, ftfy=ftfy)
    if ftfy:
        _load_ftfy()  # fail before any output exists
    if append_eod and tok.eod_id is None:
        raise DataError(f"--append-eod: tokenizer {tok.name} has no end-of-document token")
    batches = iter_batches(paths, keys, batch_size=batch_size, split=split, subset=subset)
    writers = open_writers(outputs, dtype)
    stats = run_pipeline(batches, TextEncoder, spec, writers, workers=workers,
                         skip_bad_lines=skip_bad_lines, num_docs=num_docs, label="preprocess")
    return PreprocessResult(outputs=outputs, stats=stats, dtype=dtype)


def format_summary(outputs: dict[str, str], stats: PipelineStats, dtype: Any = None) -> str:
    lines = []
    for name, prefix in outputs.items():
        dt = f", {np.dtype(dtype).name}" if dtype is not None else ""
        lines.append(f"wrote {prefix}.bin/.idx: {stats.documents:,} documents, "
                     f"{stats.tokens.get(name, 0):,} tokens{dt}")
    rate = stats.tokens_per_s
    lines.append(f"{stats.seconds:.1f} s, {rate:,.0f} tokens/s, {stats.input_bytes / 2**20:.1f} MB of text")
    if stats.dropped_empty:
        lines.append(f"dropped {stats.dropped_empty:,} empty documents")
    if stats.skipped_bad:
        lines.append(f"skipped {stats.skipped_bad:,} bad records, e.g.:")
        lines.extend(f"  {m}" for m in stats.first_bad)
    return "\n".join(lines)
