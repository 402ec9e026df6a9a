"""``neoxt prepare-hf``: a Hugging Face dataset -> token counts -> JSONL -> .bin/.idx, in one command.

Stages (each timed, each skippable): **load** the dataset (a ``save_to_disk`` directory or a Hub
name), **detect** the column (``text`` -> plain text pipeline, ``messages``/``conversation`` ->
chat pipeline), **count** tokens in batches over ``num_proc`` processes, **export** the column to
JSONL, **tokenize** the JSONL with ``preprocess`` (EOD appended) or ``preprocess-chat``. The
summary goes to ``pipeline_results.json`` beside the outputs, and the config lines to paste are
printed. The output directory is checked writable before any work and locked for the run
(``<stem>.lock``); every file is written under a temporary name unique to the process and renamed
when complete, and a full or read-only disk is a one-line error.

Counts of chat data are the tokens of the whole rendered conversation plus EOS — what
``preprocess-chat`` writes for templates whose renders of a conversation's prefixes are prefixes
of the full render (the common case).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoxt.config.schema import TokenizerConfig
from neoxt.data.outputs import check_output_dir, claim_output, writing
from neoxt.data.readers import Batch, open_hf_dataset
from neoxt.data.tokenize import EncodedBatch, Progress, ordered_results, text_field
from neoxt.errors import DataError
from neoxt.io import atomic_open, write_text_atomic

TEXT_COLUMNS = ("text",)
CHAT_COLUMNS = ("messages", "conversation", "conversations")


@dataclass(frozen=True)
class PrepareOptions:
    dataset: str
    tokenizer: str  # HF tokenizer dir, tokenizer.json or Hub name (--vocab-file)
    subset: str | None = None
    split: str | None = "train"
    output_dir: str | None = None
    text_key: str | None = None
    count_only: bool = False
    skip_count: bool = False
    skip_tokenize: bool = False
    num_proc: int = 1
    tokenize_workers: int = 1
    append_eod: bool = True
    batch_size: int = 512


@dataclass(frozen=True)
class CountSpec:
    tokenizer: str
    column: str
    chat: bool
    append_eod: bool


class CountEncoder:
    """Counts the tokens the tokenize stage will write, per batch, in a worker process."""

    def __init__(self, spec: CountSpec):
        from neoxt.tokenizer import load_tokenizer

        self.spec = spec
        self.tok = load_tokenizer(TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=spec.tokenizer))
        if spec.chat and not self.tok.chat_template:
            raise DataError(f"{spec.tokenizer}: tokenizer has no chat template, needed for column "
                            f"{spec.column!r}")

    def __call__(self, batch: Batch) -> EncodedBatch:
        out = EncodedBatch(arrays={})
        rows = batch.payloads
        if self.spec.chat:
            eos = 1 if self.tok.eos_id is not None else 0
            for i, row in enumerate(rows):
                chat = row[self.spec.column]
                if not isinstance(chat, list) or not chat:
                    raise DataError(f"{batch.location(i)}: column {self.spec.column!r} is not a "
                                    "non-empty list of messages")
                out.tokens += len(self.tok.apply_chat_template(chat)) + eos
                out.nbytes += sum(len(str(m.get("content", ""))) for m in chat)
                out.docs += 1
            return out
        texts = [text_field(row, self.spec.column, batch.location(i)) for i, row in enumerate(rows)]
        texts = [t for t in texts if t]
        out.empty = len(rows) - len(texts)
        lengths = [len(ids) for ids in self.tok.encode_batch(texts)]
        kept = [n for n in lengths if n]
        out.empty += len(lengths) - len(kept)
        out.docs = len(kept)
        out.tokens = sum(kept) + (len(kept) if self.spec.append_eod else 0)
        out.nbytes = sum(len(t) for t in texts)
        return out


def detect_column(ds: Any, requested: str | None, source: str) -> tuple[str, bool]:
    """(column, is_chat): the requested column, else ``text``, else a messages-like column."""
    names = list(ds.column_names)
    if requested:
        if requested not in names:
            raise DataError(f"{source}: no column {requested!r} (columns: {', '.join(names)})")
        candidates = [requested]
    else:
        candidates = [c for c in TEXT_COLUMNS + CHAT_COLUMNS if c in names]
        if not candidates:
            raise DataError(f"{source}: no 'text' or 'messages' column (columns: {', '.join(names)}); "
                            "pass --text-key")
    column = candidates[0]
    feature = ds.features[column]
    kind = type(feature).__name__
    if kind == "Value" and getattr(feature, "dtype", "") in ("string", "large_string"):
        return column, False
    if kind in ("List", "Sequence", "LargeList") or isinstance(feature, list):
        return column, True
    raise DataError(f"{source}: column {column!r} has type {feature}; expected text or a list of messages")


def _stem(opts: PrepareOptions) -> str:
    base = os.path.basename(os.path.normpath(opts.dataset))
    parts = [base] + ([opts.subset] if opts.subset else []) + ([opts.split] if opts.split not in (None, "train") else [])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)).strip("_") or "dataset"


def _row_batches(ds: Any, column: str, source: str, batch_size: int):
    first = 1
    for cols in ds.select_columns([column]).iter(batch_size=batch_size):
        rows = [{column: v} for v in cols[column]]
        yield Batch(source, first, "rows", rows)
        first += len(rows)


def _export_jsonl(ds: Any, column: str, path: Path, batch_size: int) -> int:
    n = 0
    progress = Progress(len(ds), "prepare-hf export")
    try:
        with writing(path), atomic_open(path, "w") as f:
            for cols in ds.select_columns([column]).iter(batch_size=batch_size):
                lines = [json.dumps({column: value}, ensure_ascii=False) + "\n" for value in cols[column]]
                f.writelines(lines)
                n += len(lines)
                progress.update(len(lines), 0, sum(len(x) for x in lines))
    finally:
        progress.close()
    return n


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def config_lines(paths: dict[str, list[str]]) -> str:
    """The lines a user pastes into a GPT-NeoX / neoxt YAML config."""
    return "\n".join(f'"{key}": {json.dumps(value)},' for key, value in paths.items())


def prepare_hf(opts: PrepareOptions) -> dict[str, Any]:
    """Run the stages; returns (and writes) the pipeline_results.json content."""
    from neoxt.tokenizer import load_tokenizer

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    out_dir = Path(opts.output_dir or os.path.join("data", _stem(opts))).resolve()
    stem = _stem(opts)
    if not opts.count_only:
        check_output_dir(out_dir, create=False)  # before any work: an unwritable output fails in a second, not after counting
    ds = open_hf_dataset(opts.dataset, opts.split, opts.subset)
    column, chat = detect_column(ds, opts.text_key, opts.dataset)
    tok = load_tokenizer(TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=opts.tokenizer))
    check_output_dir(out_dir)  # (count-only writes its pipeline_results.json there too)
    # One prepare-hf per output at a time: the second exits at once, before counting or exporting.
    with claim_output(out_dir / stem, temp_globs=(".jsonl.tmp*",)):
        return _run_stages(opts, ds, column, chat, tok, out_dir, stem, timings, t0)


def _run_stages(opts: PrepareOptions, ds: Any, column: str, chat: bool, tok: Any, out_dir: Path, stem: str,
                timings: dict[str, float], t0: float) -> dict[str, Any]:
    timings["load"] = time.monotonic() - t0
    results: dict[str, Any] = {
        "dataset": opts.dataset, "subset": opts.subset, "split": opts.split, "column": column,
        "pipeline": "preprocess-chat" if chat else "preprocess", "tokenizer": opts.tokenizer,
        "vocab_size": tok.vocab_size, "rows": len(ds), "documents": {},
        "tokens": {}, "timings_s": timings, "paths": {},
    }
    log = _logger()

    if not opts.skip_count or opts.count_only:
        t = time.monotonic()
        spec = CountSpec(opts.tokenizer, column, chat, opts.append_eod and not chat)
        docs = tokens = empty = 0
        progress = Progress(len(ds), "prepare-hf count")
        try:
            for enc in ordered_results(_row_batches(ds, column, opts.dataset, opts.batch_size), CountEncoder,
                                       spec, max(1, opts.num_proc)):
                docs, tokens, empty = docs + enc.docs, tokens + enc.tokens, empty + enc.empty
                progress.update(enc.docs + enc.empty, enc.tokens, enc.nbytes)
        finally:
            progress.close()
        timings["count"] = time.monotonic() - t
        results["documents"]["counted"] = docs
        results["tokens"]["counted"] = tokens
        results["empty_documents"] = empty
        log(f"count: {docs:,} documents, {tokens:,} tokens ({timings['count']:.1f} s)")

    if not opts.count_only:
        t = time.monotonic()
        jsonl = out_dir / f"{stem}.jsonl"
        n = _export_jsonl(ds, column, jsonl, opts.batch_size)
        timings["export"] = time.monotonic() - t
        results["paths"]["jsonl"] = str(jsonl)
        results["exported_rows"] = n
        log(f"export: {n:,} rows -> {jsonl} ({timings['export']:.1f} s)")
        if not opts.skip_tokenize:
            t = time.monotonic()
            prefix = str(out_dir / stem)
            if chat:
                from neoxt.data.chat import preprocess_chat

                res = preprocess_chat(str(jsonl), prefix, opts.tokenizer, keys=[column],
                                      workers=opts.tokenize_workers)
                paths = {"train_data_paths": [res.outputs[column]],
                         "train_label_data_paths": [res.outputs[f"{column}_label"]]}
                written = res.stats.tokens[column]
                documents = res.stats.documents
            else:
                from neoxt.data.tokenize import preprocess

                res = preprocess(str(jsonl), prefix,
                                 TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=opts.tokenizer),
                                 keys=[column], append_eod=opts.append_eod, workers=opts.tokenize_workers)
                paths = {"train_data_paths": [res.outputs[column]]}
                written = res.stats.tokens[column]
                documents = res.stats.documents
            timings["tokenize"] = time.monotonic() - t
            results["tokens"]["written"] = written
            results["documents"]["written"] = documents
            results["paths"].update(paths)
            results["config_lines"] = config_lines(paths)
            log(f"tokenize: {documents:,} documents, {written:,} tokens ({timings['tokenize']:.1f} s)")

    timings["total"] = time.monotonic() - t0
    results_path = out_dir / "pipeline_results.json"
    results["paths"]["pipeline_results"] = str(results_path)
    with writing(results_path):
        _write_json(results_path, results)
    print(f"wrote {results_path}")
    if "config_lines" in results:
        print("add to your config:")
        print(results["config_lines"])
    return results


def _logger():
    def log(msg: str) -> None:
        print(f"prepare-hf: {msg}", file=sys.stderr, flush=True)

    return log
