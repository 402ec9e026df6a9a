"""CLI for the data toolbox: ``prepare-data``, ``train-tokenizer``, ``preprocess-masked``, ``data count``,
``data merge``. Registered from ``data/commands.py``; flags keep the names of GPT-NeoX's scripts.
"""

from __future__ import annotations

import argparse

TOKENIZER_TYPES = ["HFGPT2Tokenizer", "HFTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer",
                   "TiktokenTokenizer", "SPMTokenizer"]


def _prepare_data(args: argparse.Namespace) -> int:
    from neoxt.data.corpora import PrepareOptions, prepare_corpus
    from neoxt.data.tokenize import format_summary

    opts = PrepareOptions(
        corpus=args.dataset, data_dir=args.data_dir, tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file, merge_file=args.merge_file, mirror=args.mirror, urls=tuple(args.url or ()),
        sha256=tuple(args.sha256 or ()), force_redownload=args.force_redownload, workers=args.workers,
        download_only=args.download_only, retries=args.retries,
    )
    out = prepare_corpus(opts)
    if "result" not in out:
        print("downloaded:\n" + "\n".join(f"  {p}" for p in out["inputs"]))
        return 0
    result = out["result"]
    print(format_summary(result.outputs, result.stats, result.dtype))
    print("config:")
    print(f'  "train_data_paths": ["{result.outputs["text"]}"],')
    return 0


def _register_prepare_data(sub) -> None:
    from neoxt.data.corpora import corpus_names

    p = sub.add_parser("prepare-data", help="download and tokenize one of GPT-NeoX's named corpora",
                       description="Download (resumable, checksummed), unpack and tokenize a corpus from "
                                   "GPT-NeoX's registry into <data-dir>/<name>/<name>_text_document "
                                   "(upstream prepare_data.py).")
    p.add_argument("dataset", nargs="?", default="enwik8", choices=corpus_names(), metavar="NAME",
                   help=f"corpus name: {', '.join(corpus_names())} (default enwik8)")
    p.add_argument("-d", "--data-dir", default=None, help="download/output directory (default $DATA_DIR or ./data)")
    p.add_argument("-t", "--tokenizer-type", "--tokenizer", dest="tokenizer_type", default="GPT2BPETokenizer",
                   choices=TOKENIZER_TYPES, help="GPT-NeoX tokenizer type (default GPT2BPETokenizer)")
    p.add_argument("-v", "--vocab-file", default=None,
                   help="tokenizer vocab (default for GPT2BPETokenizer: <data-dir>/gpt2-vocab.json, fetched)")
    p.add_argument("-m", "--merge-file", default=None,
                   help="BPE merges (default for GPT2BPETokenizer: <data-dir>/gpt2-merges.txt, fetched)")
    p.add_argument("-f", "--force-redownload", action="store_true", help="download and unpack again")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="fetch every file (and the GPT-2 vocab/merges) from URL/<file name> instead")
    p.add_argument("--url", action="append", metavar="URL", help="fetch these files instead of the registered "
                   "ones (repeatable)")
    p.add_argument("--sha256", action="append", metavar="HEX",
                   help="expected checksum of each file, in order (repeatable); a mismatch is refused")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores; "
                   "enwik8: 1, as upstream)")
    p.add_argument("--retries", type=int, default=3, help="resume a dropped download this many times (default 3)")
    p.add_argument("--download-only", action="store_true", help="stop after downloading and unpacking")
    p.set_defaults(handler=_prepare_data)


def register(sub, data_sub) -> None:
    """Add the toolbox commands: top-level ones to ``sub``, ``data`` subcommands to ``data_sub``."""
    _register_prepare_data(sub)
