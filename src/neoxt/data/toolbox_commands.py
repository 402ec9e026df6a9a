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


def _preprocess_masked(args: argparse.Namespace) -> int:
    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.masked import parse_token_list, preprocess_masked
    from neoxt.data.tokenize import format_summary

    if args.dataset_impl != "mmap":
        from neoxt.errors import DataError

        raise DataError(f"--dataset-impl {args.dataset_impl}: only the mmap format is written")
    cfg = TokenizerConfig(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file)
    tokens = parse_token_list(args.mask_before_token) if args.mask_before_token else ()
    result = preprocess_masked(args.input, args.output_prefix, cfg, key=args.jsonl_keys[0],
                               mask_before_tokens=tokens, mask_before_text=args.mask_before_text,
                               prompt_key=args.prompt_key, completion_key=args.completion_key,
                               append_eod=args.append_eod, ftfy=args.ftfy, workers=args.workers,
                               skip_bad_lines=args.skip_bad_lines, num_docs=args.num_docs)
    print(format_summary(result.outputs, result.stats, result.dtype))
    print("config:")
    print(f'  "train_data_paths": ["{result.outputs["text"]}"],')
    print(f'  "train_label_data_paths": ["{result.outputs["label"]}"],')
    return 0


def _register_preprocess_masked(sub) -> None:
    p = sub.add_parser("preprocess-masked", help="tokenize documents plus a label file that masks the prompt",
                       description="Documents -> <prefix>_text_document and <prefix>_label_document (int32, "
                                   "-100 on masked tokens), byte-identical to GPT-NeoX's "
                                   "tools/datasets/preprocess_data_with_mask.py; or prompt/completion records.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSONL (.gz/.zst/.xz), text or Parquet files; comma lists and globs allowed")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--jsonl-keys", nargs=1, default=["text"], metavar="KEY", help="field to tokenize (default text)")
    p.add_argument("--mask-before-token", default=None, metavar="IDS",
                   help="comma-separated token ids of the delimiter: every token up to and including its first "
                        "occurrence is masked (upstream's flag)")
    p.add_argument("--mask-before-text", default=None, metavar="TEXT",
                   help="the delimiter as text (tokenized on its own; check the ids with --mask-before-token)")
    p.add_argument("--prompt-key", default=None, help="prompt/completion records: the prompt field (masked)")
    p.add_argument("--completion-key", default=None, help="prompt/completion records: the completion field")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    p.add_argument("--ftfy", action="store_true", help="fix mojibake with ftfy first (needs the ftfy package)")
    p.add_argument("--dataset-impl", default="mmap", choices=["lazy", "cached", "mmap"],
                   help="accepted for GPT-NeoX compatibility; only mmap is written")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--num-docs", type=int, default=None, help="for the progress bar only")
    p.add_argument("--log-interval", type=int, default=100, help="accepted for GPT-NeoX compatibility")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed records instead of stopping")
    p.set_defaults(handler=_preprocess_masked)


def _count(args: argparse.Namespace) -> int:
    from neoxt.data.count import count_datasets, format_counts

    counts = count_datasets(args.prefixes)
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps({"datasets": [asdict(c) for c in counts], "documents": sum(c.documents for c in counts),
                          "tokens": sum(c.tokens for c in counts)}))
    else:
        print(format_counts(counts, totals_only=args.total_only))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from neoxt.data.merge import merge_datasets, upstream_dir_prefixes
    from neoxt.errors import DataError

    prefixes = list(args.prefixes)
    if args.input:
        prefixes += upstream_dir_prefixes(args.input)
    if not prefixes:
        raise DataError("nothing to merge: give dataset prefixes or --input DIR")
    out = merge_datasets(args.output, prefixes, keep_documents=args.keep_document_index)
    print(f"wrote {args.output}.bin/.idx: {out['shards']:,} shards, {out['items']:,} items, {out['tokens']:,} tokens")
    return 0


def _register_data_commands(data_sub) -> None:
    c = data_sub.add_parser("count", help="tokens and documents of .bin/.idx datasets (reads only the .idx)",
                            description="Count tokens and documents per dataset and in total, from the index "
                                        "files alone (upstream tools/datasets/dataset_token_count.py).")
    c.add_argument("prefixes", nargs="+", metavar="PREFIX", help="dataset prefixes, .bin/.idx paths or directories")
    c.add_argument("--json", action="store_true", help="one JSON object with every dataset and the totals")
    c.add_argument("--total-only", action="store_true", help="print only the total line")
    c.set_defaults(handler=_count)
    m = data_sub.add_parser("merge", help="concatenate .bin/.idx shards into one dataset",
                            description="Concatenate indexed datasets, in the order given, into OUT.bin/.idx: "
                                        "byte-identical to GPT-NeoX's tools/datasets/merge_datasets.py "
                                        "(streamed; written under temporary names, renamed at the end).")
    m.add_argument("output", metavar="OUT", help="output prefix")
    m.add_argument("prefixes", nargs="*", metavar="PREFIX", help="shards, in order (prefixes, .bin/.idx or dirs)")
    m.add_argument("--input", default=None, metavar="DIR",
                   help="upstream's form: every .bin/.idx pair in DIR, sorted by name (after any PREFIX)")
    m.add_argument("--keep-document-index", action="store_true",
                   help="also write the shards' document boundaries (upstream keeps only [0]; the tokens and "
                        "items are the same, the .idx then differs from upstream's)")
    m.set_defaults(handler=_merge)


def _train_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neoxt.data.train_tokenizer import (
        CHAT_TEMPLATES,
        CHAT_TOKENS,
        TokenizerSpec,
        parse_special,
        save_tokenizer,
        train_tokenizer,
    )
    from neoxt.errors import DataError

    inputs = list(args.input or [])
    if args.json_input_dir:  # upstream's flag: every *.jsonl and *.json in the directory
        inputs += sorted(str(p) for p in Path(args.json_input_dir).glob("*.json*") if p.suffix in (".jsonl", ".json"))
    if not inputs:
        raise DataError("no input: give --input FILE... (or upstream's --json_input_dir DIR)")
    named = set(parse_special(args.special_tokens)[0])  # chat tokens the user placed already keep their ids
    specials = list(args.special_tokens) + [t for t in CHAT_TOKENS.get(args.chat_tokens or "", ()) if t not in named]
    spec = TokenizerSpec(model=args.model, vocab_size=args.vocab_size, special_tokens=tuple(specials),
                         pre_tokenizer=args.pre_tokenizer, normalizer="nfkc" if args.upstream else args.normalizer,
                         add_prefix_space=args.add_prefix_space or args.upstream, min_frequency=args.min_frequency)
    template = args.chat_template
    if template and "{" not in template:
        template = Path(template).read_text(encoding="utf-8")
    template = template or CHAT_TEMPLATES.get(args.chat_tokens or "")
    tok = train_tokenizer(inputs, spec, keys=args.jsonl_keys)
    for path in save_tokenizer(tok, args.output, hf_dir=args.hf_dir, chat_template=template):
        print(f"wrote {path}")
    names, _ = parse_special(specials)
    print(f"vocabulary: {tok.get_vocab_size():,} tokens"
          + "".join(f"; {t} = {tok.token_to_id(t)}" for t in names))
    return 0


def _register_train_tokenizer(sub) -> None:
    from neoxt.data.train_tokenizer import MODELS, NEOX_SPECIAL, NORMALIZERS, PRE_TOKENIZERS

    t = sub.add_parser("train-tokenizer", help="train a tokenizer (byte-level BPE by default) on your data",
                       description="Train a tokenizers model on JSONL / Parquet / text (streamed) and write "
                                   "tokenizer.json, plus an HF tokenizer directory with --hf-dir "
                                   "(upstream megatron/tokenizer/train_tokenizer.py; --upstream for its exact "
                                   "settings).")
    t.add_argument("--input", nargs="+", metavar="PATH", help="input files; comma lists and globs allowed")
    t.add_argument("--json_input_dir", "--json-input-dir", dest="json_input_dir", default=None,
                   help="upstream's form: every *.jsonl / *.json in this directory")
    t.add_argument("--output", "--tokenizer_output_path", "--tokenizer-output-path", dest="output", required=True,
                   help="tokenizer.json to write (a directory gets DIR/tokenizer.json)")
    t.add_argument("--model", "--tokenizer_type", "--tokenizer-type", dest="model", default="bpe",
                   type=str.lower, choices=MODELS, help="tokenizers model (default bpe)")
    t.add_argument("-v", "--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=52000,
                   help="vocabulary size including special tokens (default 52000, as upstream)")
    t.add_argument("--special-tokens", nargs="*", default=list(NEOX_SPECIAL), metavar="TOKEN[=ID]",
                   help="special tokens, in order from id 0, or at an explicit id with TOKEN=ID "
                        "(default: <|endoftext|> <|padding|>, GPT-NeoX's)")
    t.add_argument("--chat-tokens", choices=["roles", "chatml"], default=None,
                   help="also add chat-role tokens: roles = <|system|> <|user|> <|assistant|> <|end|>; "
                        "chatml = <|im_start|> <|im_end|> (and a matching chat template for --hf-dir)")
    t.add_argument("--pre-tokenizer", choices=PRE_TOKENIZERS, default="byte_level")
    t.add_argument("--add-prefix-space", action="store_true", help="byte-level/metaspace: prefix a space")
    t.add_argument("--normalizer", choices=NORMALIZERS, default="none",
                   help="text normaliser (default none, which keeps round trips lossless; upstream used nfkc)")
    t.add_argument("--upstream", action="store_true",
                   help="upstream's exact settings: NFKC normaliser and add_prefix_space")
    t.add_argument("--min-frequency", type=int, default=0, help="merges/words seen fewer times are dropped")
    t.add_argument("--jsonl-keys", nargs="+", default=["text"], metavar="KEY", help="fields to read (default text)")
    t.add_argument("--hf-dir", default=None, metavar="DIR",
                   help="also write an HF tokenizer directory (AutoTokenizer.from_pretrained loads it)")
    t.add_argument("--chat-template", default=None, help="chat template text or file for --hf-dir")
    t.set_defaults(handler=_train_tokenizer)


def register(sub, data_sub) -> None:
    """Add the toolbox commands: top-level ones to ``sub``, ``data`` subcommands to ``data_sub``."""
    _register_prepare_data(sub)
    _register_preprocess_masked(sub)
    _register_train_tokenizer(sub)
    _register_data_commands(data_sub)
