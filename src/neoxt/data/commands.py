"""CLI for data preparation: ``preprocess``, ``preprocess-chat``, ``prepare-hf`` and the ``data`` group.

Flags keep the names of GPT-NeoX's tools/datasets scripts so existing job scripts keep working.
Handlers import the heavy modules lazily so ``neoxt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from neoxt.errors import DataError


def _add_runtime_flags(p: argparse.ArgumentParser, default_keys: list[str]) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files (.jsonl[.gz|.zst|.xz], .txt, .parquet), saved HF dataset directories "
                        "or a Hub dataset name; several arguments, comma lists and globs allowed")
    p.add_argument("--jsonl-keys", nargs="+", default=default_keys, metavar="KEY",
                   help=f"fields to tokenize, one output dataset each (default: {' '.join(default_keys)})")
    p.add_argument("--num-docs", type=int, default=None,
                   help="number of documents in the input, for an accurate progress bar only")
    p.add_argument("--output-prefix", required=True, help="output path without the _<key>_document suffix")
    p.add_argument("--dataset-impl", default="mmap", choices=["lazy", "cached", "mmap"],
                   help="accepted for GPT-NeoX compatibility; only mmap is written")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--log-interval", type=int, default=100,
                   help="accepted for GPT-NeoX compatibility (progress is shown continuously)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed records (bad JSON, missing key) and count them, instead of stopping")
    p.add_argument("--split", default=None, help="split of a saved HF DatasetDict or Hub dataset")
    p.add_argument("--subset", default=None, help="configuration name of a Hub dataset")
    p.add_argument("--ftfy", action="store_true",
                   help="fix mojibake with ftfy before tokenizing (preprocess; needs the ftfy package). "
                        "preprocess-chat accepts and ignores it, as upstream does")


def _check_impl(args: argparse.Namespace) -> None:
    if args.dataset_impl != "mmap":
        raise DataError(f"--dataset-impl {args.dataset_impl}: only the mmap format is written "
                        "(it is what GPT-NeoX trains on)")


def _preprocess(args: argparse.Namespace) -> int:
    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.tokenize import format_summary, preprocess

    _check_impl(args)
    cfg = TokenizerConfig(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                          merge_file=args.merge_file)
    result = preprocess(args.input, args.output_prefix, cfg, keys=args.jsonl_keys,
                        append_eod=args.append_eod, ftfy=args.ftfy, workers=args.workers,
                        skip_bad_lines=args.skip_bad_lines, num_docs=args.num_docs,
                        split=args.split, subset=args.subset)
    print(format_summary(result.outputs, result.stats, result.dtype))
    _print_config_hint({"train_data_paths": list(result.outputs.values())})
    return 0


def _print_config_hint(paths: dict[str, list[str]]) -> None:
    from neoxt.data.prepare_hf import config_lines

    print("config:")
    print(config_lines(paths))


def _preprocess_chat(args: argparse.Namespace) -> int:
    from neoxt.data.chat import preprocess_chat
    from neoxt.data.tokenize import format_summary

    _check_impl(args)
    if args.ftfy:
        print("neoxt: --ftfy is ignored by preprocess-chat (as upstream)", file=sys.stderr)
    result = preprocess_chat(args.input, args.output_prefix, args.tokenizer_path, keys=args.jsonl_keys,
                             generation_role=args.generation_role, only_last=args.only_last,
                             no_mask=args.no_mask, for_rm=args.for_rm, reward_key=args.reward_key,
                             binary_reward=args.binary_reward, chat_template=args.chat_template,
                             workers=args.workers, skip_bad_lines=args.skip_bad_lines,
                             num_docs=args.num_docs, split=args.split, subset=args.subset)
    print(format_summary(result.outputs, result.stats, "int32"))
    hint = {"train_data_paths": [result.outputs[k] for k in args.jsonl_keys],
            "train_label_data_paths": [result.outputs[f"{k}_label"] for k in args.jsonl_keys]}
    if args.reward_key:
        hint["train_reward_data_paths"] = [result.outputs[f"{k}_reward"] for k in args.jsonl_keys]
    _print_config_hint(hint)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def inspect_dataset(prefix: str, doc: int | None = None, tokenizer_type: str = "HFTokenizer",
                    vocab_file: str | None = None, merge_file: str | None = None,
                    max_tokens: int = 2000, vocab_size: int | None = None) -> str:
    """A human summary of one .bin/.idx dataset, and optionally one document (decoded if possible).

    With ``vocab_size`` the token ids' range is shown and an id outside the vocabulary is warned
    about (a ``warning:`` line naming the document and the id)."""
    import os

    import numpy as np

    from neoxt.data.indexed import DTYPE_CODES, IndexedDataset, data_file_path, index_file_path

    ds = IndexedDataset(prefix)
    sizes = ds.sizes
    code = next(c for c, d in DTYPE_CODES.items() if d == ds.dtype)
    lines = [
        f"dataset    {ds.prefix}",
        f"dtype      {ds.dtype.name} (code {code})",
        f"documents  {ds.num_documents:,} ({len(ds):,} items)",
        f"tokens     {ds.num_tokens:,}",
    ]
    if len(sizes):
        lines.append(f"item size  min {int(sizes.min()):,} / mean {float(sizes.mean(dtype=np.float64)):,.1f} "
                     f"/ max {int(sizes.max()):,} tokens")
    lines.append(f"files      {os.path.basename(data_file_path(ds.prefix))} "
                 f"{_size(os.path.getsize(data_file_path(ds.prefix)))}, "
                 f"{os.path.basename(index_file_path(ds.prefix))} "
                 f"{_size(os.path.getsize(index_file_path(ds.prefix)))}")
    bin_size, described = os.path.getsize(data_file_path(ds.prefix)), ds.num_tokens * ds.dtype.itemsize
    if bin_size != described:  # every writer (ours, upstream's) stores exactly the items
        lines.append(f"warning: {data_file_path(ds.prefix)} has {bin_size:,} bytes but its index describes "
                     f"{described:,}; the .bin and .idx may come from different runs")
    if vocab_size is not None:
        lines += _vocab_lines(ds, vocab_size)
    if doc is None:
        return "\n".join(lines)
    try:
        items = ds.document(doc)
    except IndexError as err:
        raise DataError(f"{ds.prefix}: --doc {doc}: {err}") from None
    tokens = np.concatenate(items) if items else np.empty(0, ds.dtype)
    shown = tokens[:max_tokens]
    more = f" (first {max_tokens} of {len(tokens):,})" if len(tokens) > max_tokens else ""
    lines += ["", f"document {doc}: {len(items)} item(s), {len(tokens):,} tokens{more}",
              f"ids        {shown.tolist()}"]
    if shown.dtype.kind == "i" and (shown == -100).any():
        lines.append(f"labels     {int((tokens != -100).sum()):,} trained, {int((tokens == -100).sum()):,} "
                     "masked (-100)")
    labels = _sibling_labels(ds.prefix, doc)
    if labels is not None:
        lines.append(f"label file {labels[0]}: {int((labels[1] != -100).sum()):,} of {len(labels[1]):,} "
                     "tokens trained")
    if vocab_file or tokenizer_type == "CharLevelTokenizer":
        from neoxt.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_type=tokenizer_type, vocab_file=vocab_file, merge_file=merge_file)
        ids = shown[shown >= 0] if shown.dtype.kind == "i" else shown
        lines += ["text:", tok.decode(ids.tolist())]
        if labels is not None and len(labels[1]) == len(tokens):
            lines.append("trained spans (label != -100):")
            lines += [f"  {tok.decode(span)!r}" for span in _trained_spans(tokens, labels[1])[:50]]
    return "\n".join(lines)


def _vocab_lines(ds, vocab_size: int) -> list[str]:
    from neoxt.data.token_check import range_problem, scan_token_range

    span = scan_token_range(ds)
    out = [f"token ids  min {span[0]:,} / max {span[1]:,} (vocabulary {vocab_size:,})"] if span else []
    problem = range_problem(ds, span, vocab_size, labels=ds.prefix.endswith("_label_document"))
    return out + ([f"warning: {problem}"] if problem else [])


def _sibling_labels(prefix: str, doc: int):
    """(label prefix, labels of ``doc``) when ``<x>_document`` has a ``<x>_label_document`` beside it."""
    import numpy as np

    from neoxt.data.indexed import IndexedDataset, dataset_exists

    if not prefix.endswith("_document") or prefix.endswith("_label_document"):
        return None
    label_prefix = prefix[: -len("_document")] + "_label_document"
    if not dataset_exists(label_prefix):
        return None
    items = IndexedDataset(label_prefix).document(doc)
    return label_prefix, (np.concatenate(items) if items else np.empty(0, np.int32))


def _trained_spans(tokens, labels) -> list[list[int]]:
    spans, cur = [], []
    for t, lab in zip(tokens.tolist(), labels.tolist()):
        if lab != -100:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def _inspect(args: argparse.Namespace) -> int:
    vocab_size = args.vocab_size
    if vocab_size is None and args.config:
        from neoxt.config import load_config
        from neoxt.tokenizer import load_tokenizer, padded_vocab_size

        cfg = load_config(args.config)
        vocab_size = cfg.model.padded_vocab_size or padded_vocab_size(
            load_tokenizer(cfg.tokenizer).vocab_size, cfg.model.make_vocab_size_divisible_by,
            cfg.parallelism.model_parallel_size)
    if vocab_size is not None and vocab_size < 1:
        raise DataError(f"--vocab-size must be positive, got {vocab_size}")
    print(inspect_dataset(args.prefix, doc=args.doc, tokenizer_type=args.tokenizer_type,
                          vocab_file=args.tokenizer or args.vocab_file, merge_file=args.merge_file,
                          max_tokens=args.max_tokens, vocab_size=vocab_size))
    return 0


def _samples(args: argparse.Namespace) -> int:
    from neoxt.data.loader import samples_command

    return samples_command(args)


def _prepare_hf(args: argparse.Namespace) -> int:
    from neoxt.data.prepare_hf import PrepareOptions, prepare_hf

    opts = PrepareOptions(
        dataset=args.dataset, subset=args.subset, split=args.split, output_dir=args.output_dir,
        tokenizer=args.vocab_file, text_key=args.text_key, count_only=args.count_only,
        skip_count=args.skip_count, skip_tokenize=args.skip_tokenize, num_proc=args.num_proc,
        tokenize_workers=args.tokenize_workers, append_eod=not args.no_append_eod,
    )
    prepare_hf(opts)
    return 0


def _add_tokenizer_flags(p: argparse.ArgumentParser, required: bool) -> None:
    from_types = ["HFTokenizer", "HFGPT2Tokenizer", "GPT2BPETokenizer", "SPMTokenizer",
                  "TiktokenTokenizer", "CharLevelTokenizer"]
    p.add_argument("--tokenizer-type", required=required, default=None if required else "HFTokenizer",
                   choices=from_types, help="GPT-NeoX tokenizer type")
    p.add_argument("--vocab-file", default=None,
                   help="tokenizer.json / HF tokenizer dir (HFTokenizer), vocab.json (GPT2BPETokenizer), "
                        ".model (SPMTokenizer) or encoding name (TiktokenTokenizer)")
    p.add_argument("--merge-file", default=None, help="merges.txt (GPT2BPETokenizer)")


def register(sub) -> None:
    p = sub.add_parser("preprocess", help="tokenize documents into GPT-NeoX .bin/.idx datasets",
                       description="Tokenize text documents into <prefix>_<key>_document.bin/.idx "
                                   "(GPT-NeoX tools/datasets/preprocess_data.py flags).")
    _add_runtime_flags(p, ["text"])
    _add_tokenizer_flags(p, required=True)
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    p.set_defaults(handler=_preprocess)

    c = sub.add_parser("preprocess-chat", help="tokenize conversations with a chat template, plus label files",
                       description="Conversations -> <prefix>_<key>_document and <prefix>_<key>_label_document "
                                   "(int32; labels -100 on every token the generation role did not produce).")
    _add_runtime_flags(c, ["conversation"])
    c.add_argument("--tokenizer-path", required=True, help="HF tokenizer directory, tokenizer.json or Hub name")
    c.add_argument("--chat-template", default=None, help="chat template text or file (default: the tokenizer's)")
    c.add_argument("--generation-role", default="assistant", help="role whose tokens are trained")
    c.add_argument("--only-last", action="store_true", help="train only the final turn")
    c.add_argument("--no-mask", action="store_true", help="train every token (labels = tokens)")
    c.add_argument("--for-rm", action="store_true", help="reward-model data: all -100, then EOS EOS")
    c.add_argument("--reward-key", default=None, help="field holding a reward; writes <key>_reward files")
    c.add_argument("--binary-reward", action="store_true", help="reward is truthy/falsy -> 1/-1")
    c.set_defaults(handler=_preprocess_chat)

    h = sub.add_parser("prepare-hf", help="count, export and tokenize a Hugging Face dataset in one go",
                       description="Detect a text or messages column, count tokens, export JSONL, tokenize "
                                   "it and write pipeline_results.json plus the config line to paste.")
    h.add_argument("--dataset", required=True, help="Hub dataset name or a saved dataset directory")
    h.add_argument("--subset", default=None)
    h.add_argument("--split", default="train")
    h.add_argument("--output-dir", default=None, help="default: ./data/<dataset name>")
    h.add_argument("--vocab-file", default="EleutherAI/gpt-neox-20b",
                   help="HF tokenizer directory, tokenizer.json or Hub name (default: EleutherAI/gpt-neox-20b, "
                        "GPT-NeoX's tokenizer, fetched from the Hub)")
    h.add_argument("--text-key", default=None, help="column to use (default: 'text' or 'messages', detected)")
    h.add_argument("--count-only", action="store_true", help="only count tokens")
    h.add_argument("--skip-count", action="store_true", help="skip the counting stage")
    h.add_argument("--skip-tokenize", action="store_true", help="stop after exporting JSONL")
    h.add_argument("--num-proc", type=int, default=1, help="processes for the count stage")
    h.add_argument("--tokenize-workers", type=int, default=1, help="workers for the tokenize stage")
    h.add_argument("--no-append-eod", action="store_true", help="text data: do not append EOD")
    h.set_defaults(handler=_prepare_hf)

    d = sub.add_parser("data", help="look at, count and merge prepared datasets")
    data_sub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    i = data_sub.add_parser("inspect", help="documents, tokens, dtype and size of a .bin/.idx dataset",
                            description="Summarise an indexed dataset; with --doc N show that document "
                                        "(decoded when a tokenizer is given).")
    i.add_argument("prefix", help="dataset prefix (or its .bin / .idx path)")
    i.add_argument("--doc", type=int, default=None, help="show document N (negative counts from the end)")
    i.add_argument("--tokenizer", default=None, help="HF tokenizer dir or tokenizer.json (HFTokenizer)")
    i.add_argument("--tokenizer-type", default="HFTokenizer")
    i.add_argument("--vocab-file", default=None)
    i.add_argument("--merge-file", default=None)
    i.add_argument("--max-tokens", type=int, default=2000, help="show at most this many tokens of a document")
    i.add_argument("--vocab-size", type=int, default=None,
                   help="warn about token ids outside [0, N) (what training would reject)")
    i.add_argument("--config", nargs="+", default=None, metavar="YAML",
                   help="take the vocabulary size from these configs (padded_vocab_size, or the tokenizer's, padded)")
    i.set_defaults(handler=_inspect)
    s = data_sub.add_parser("samples", help="the samples the trainer would draw, in global order",
                            description="Show the training (or valid/test) samples exactly as the trainer "
                                        "draws them: global order (all data-parallel ranks), seq_length+1 "
                                        "tokens each, plus labels when a label file is configured.")
    from neoxt.config.commands import add_config_arguments

    add_config_arguments(s)
    s.add_argument("--split", default="train", choices=["train", "valid", "test"])
    s.add_argument("--start", type=int, default=0, help="first sample position in the stream (default 0)")
    s.add_argument("--count", type=int, default=4, help="number of samples to show (default 4)")
    s.add_argument("--world-size", type=int, default=None,
                   help="processes of the job (default $WORLD_SIZE or the model-parallel size); "
                        "fixes the data-parallel size and so the global batch")
    s.add_argument("--json", action="store_true", help="one JSON object per sample")
    s.add_argument("--decode", action="store_true", help="also decode the tokens with the configured tokenizer")
    s.set_defaults(handler=_samples)

    from neoxt.data import toolbox_commands

    toolbox_commands.register(sub, data_sub)
