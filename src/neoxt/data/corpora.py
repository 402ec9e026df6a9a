"""``neoxt prepare-data NAME``: GPT-NeoX's named corpora, downloaded, unpacked and tokenized.

The list of corpora and their URLs is upstream's (tools/datasets/corpora.py), kept as data in
``corpora.json`` beside this file. What upstream did with ``wget`` and ``lm_dataformat`` is done
here with a resumable downloader (``download``) and our own tokenizer pipeline
(``tokenize.preprocess``); the output layout is upstream's: ``<data_dir>/<name>/<name>_text_document``
with the end-of-document token appended, and the GPT-2 vocab/merges in ``<data_dir>`` when the
default GPT2BPETokenizer is used.

Where the files come from: the registered URLs; ``--mirror BASE`` fetches each from
``BASE/<file name>`` instead; ``--url`` replaces the list outright (a corpus that lives elsewhere).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neoxt.data.outputs import check_output_dir, claim_output
from neoxt.errors import DataError

if TYPE_CHECKING:
    from neoxt.config.schema import TokenizerConfig

log = logging.getLogger(__name__)

REGISTRY_FILE = Path(__file__).with_name("corpora.json")


@dataclass(frozen=True)
class Corpus:
    key: str  # what the user types (upstream's DATA_DOWNLOADERS key)
    name: str  # directory and output name (upstream's class ``name``)
    urls: tuple[str, ...]
    num_docs: int | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    workers: int | None = None


@cache
def _registry() -> dict[str, Any]:
    with open(REGISTRY_FILE, encoding="utf-8") as f:
        return json.load(f)


def _corpus(key: str, entry: dict[str, Any]) -> Corpus:
    if "url_pattern" in entry:
        urls = tuple(entry["url_pattern"].format(i=i) for i in range(int(entry["count"])))
    else:
        urls = tuple(entry["urls"])
    return Corpus(key=key, name=entry.get("name", key), urls=urls, num_docs=entry.get("num_docs"),
                  sha256=dict(entry.get("sha256", {})), workers=entry.get("workers"))


def corpus_names() -> list[str]:
    return list(_registry()["corpora"])


def get_corpus(key: str) -> Corpus:
    corpora = _registry()["corpora"]
    entry = corpora.get(key.lower())
    if entry is None:
        raise DataError(f"unknown corpus {key!r} (known: {', '.join(corpora)})")
    return _corpus(key.lower(), entry)


def gpt2_tokenizer_urls() -> tuple[str, str]:
    files = _registry()["gpt2_tokenizer"]
    return files["vocab"], files["merges"]


def mirrored(url: str, mirror: str | None) -> str:
    """``url`` fetched from ``mirror`` instead: ``<mirror>/<file name of url>``."""
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + url.rsplit("/", 1)[-1]


def file_name(url: str) -> str:
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise DataError(f"{url}: cannot tell a file name from this URL")
    return name


@dataclass(frozen=True)
class PrepareOptions:
    corpus: str
    data_dir: str | None = None
    tokenizer_type: str = "GPT2BPETokenizer"
    vocab_file: str | None = None
    merge_file: str | None = None
    mirror: str | None = None
    urls: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    force_redownload: bool = False
    workers: int | None = None
    download_only: bool = False
    retries: int = 3


def _tokenizer_config(opts: PrepareOptions, data_dir: Path) -> TokenizerConfig:
    """Upstream's defaults: GPT-2 vocab/merges in the data dir (fetched when missing), 'gpt2' from the Hub."""
    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.download import download

    vocab, merges = opts.vocab_file, opts.merge_file
    if opts.tokenizer_type == "GPT2BPETokenizer":
        vocab_url, merge_url = gpt2_tokenizer_urls()
        if vocab is None:
            vocab = str(download(mirrored(vocab_url, opts.mirror), data_dir / "gpt2-vocab.json", retries=opts.retries))
        if merges is None:
            merges = str(download(mirrored(merge_url, opts.mirror), data_dir / "gpt2-merges.txt", retries=opts.retries))
    elif opts.tokenizer_type == "HFGPT2Tokenizer" and vocab is None:
        vocab = "gpt2"
    elif opts.tokenizer_type not in ("CharLevelTokenizer",) and vocab is None:
        raise DataError(f"--tokenizer-type {opts.tokenizer_type} needs --vocab-file")
    return TokenizerConfig(tokenizer_type=opts.tokenizer_type, vocab_file=vocab, merge_file=merges)


def _document_files(paths: list[Path]) -> list[str]:
    """The files the tokenizer reads: JSONL / text / Parquet (compressed or not); others are skipped."""
    from neoxt.data.readers import input_kind

    out = []
    for p in paths:
        if p.name.startswith("."):
            continue
        try:
            input_kind(str(p))
        except DataError:
            log.warning("skipping %s: not a document file", p)
            continue
        out.append(str(p))
    return out


def fetch_corpus(corpus: Corpus, opts: PrepareOptions, folder: Path) -> list[str]:
    """Download (resuming) and unpack every file of ``corpus`` into ``folder``; returns the document files."""
    from neoxt.data.download import download, extract, is_archive
    from neoxt.io import write_text_atomic

    urls = opts.urls or corpus.urls
    if opts.sha256 and len(opts.sha256) != len(urls):
        raise DataError(f"--sha256 given {len(opts.sha256)} times for {len(urls)} file(s)")
    files: list[Path] = []
    for i, url in enumerate(urls):
        name = file_name(url)
        checksum = opts.sha256[i] if opts.sha256 else corpus.sha256.get(name)
        dest = folder / name
        if opts.force_redownload:
            dest.unlink(missing_ok=True)
        path = download(url if opts.urls else mirrored(url, opts.mirror), dest, sha256=checksum,
                        retries=opts.retries)
        if not is_archive(path):
            files.append(path)
            continue
        marker = folder / f".{name}.extracted"
        if marker.exists() and not opts.force_redownload:
            files.extend(Path(line) for line in marker.read_text().splitlines() if line)
            continue
        unpacked = extract(path, folder)
        write_text_atomic(marker, "".join(f"{p}\n" for p in unpacked))
        files.extend(unpacked)
    return _document_files(files)


def prepare_corpus(opts: PrepareOptions) -> dict[str, Any]:
    """Download, unpack and tokenize one named corpus; returns what was written."""
    from neoxt.data.tokenize import preprocess

    corpus = get_corpus(opts.corpus)
    data_dir = Path(opts.data_dir or os.environ.get("DATA_DIR", "./data"))
    folder = data_dir / corpus.name
    check_output_dir(folder, "data directory")  # before any download: one line, not a traceback later
    # One prepare-data per corpus folder at a time (downloads resume from fixed .part names).
    with claim_output(folder / f"{corpus.name}_prepare", temp_globs=()):
        tokenizer = _tokenizer_config(opts, data_dir)
        inputs = fetch_corpus(corpus, opts, folder)
        if not inputs:
            raise DataError(f"{corpus.key}: the downloaded files hold no JSONL, text or Parquet documents")
        if opts.download_only:
            return {"inputs": inputs}
        workers = opts.workers or corpus.workers or max(1, (os.cpu_count() or 1))
        result = preprocess(inputs, str(folder / corpus.name), tokenizer, keys=("text",), append_eod=True,
                            workers=workers, num_docs=corpus.num_docs)
    return {"inputs": inputs, "result": result}
