"""``neoxt train-tokenizer``: train a ``tokenizers`` model on JSONL / Parquet / text, streamed.

Upstream's megatron/tokenizer/train_tokenizer.py trains one thing: byte-level BPE with an NFKC
normaliser, ``add_prefix_space=True`` and the special tokens ``<|endoftext|>``, ``<|padding|>`` at
ids 0 and 1, reading whole JSONL files into memory. Here the same is ``--upstream``; the defaults
differ where upstream loses text: no normaliser and no prefix space, so that ``decode(encode(x)) == x``
for any ``x`` (NFKC rewrites characters such as "ﬁ" and full-width letters). The other models
``tokenizers`` ships (WordPiece, Unigram, WordLevel) and pre-tokenizers are choices.

Special tokens are given as ``TOKEN`` or ``TOKEN=ID``. Without ids they take 0, 1, ... in order (as
the trainer places them); with ids the finished vocabulary is renumbered so each sits exactly where
asked, the other tokens keeping their order in the remaining ids.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoxt.data.readers import decode_payload, expand_inputs, iter_batches
from neoxt.errors import DataError
from neoxt.io import publish_dir, temp_dir_beside, write_text_atomic
from neoxt.progress import Progress

MODELS = ("bpe", "wordpiece", "unigram", "wordlevel")
PRE_TOKENIZERS = ("byte_level", "whitespace", "metaspace", "bert")
NORMALIZERS = ("none", "nfkc", "nfc", "nfd", "nfkd", "lowercase")
NEOX_SPECIAL = ("<|endoftext|>", "<|padding|>")
CHAT_TOKENS = {
    "roles": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}
CHAT_TEMPLATES = {
    "roles": ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    "chatml": ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
UNK = "[UNK]"


@dataclass(frozen=True)
class TokenizerSpec:
    model: str = "bpe"
    vocab_size: int = 52000
    special_tokens: tuple[str, ...] = NEOX_SPECIAL  # each "TOKEN" or "TOKEN=ID"
    pre_tokenizer: str = "byte_level"
    add_prefix_space: bool = False
    normalizer: str = "none"
    min_frequency: int = 0


def parse_special(specs: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """``["<a>", "<b>=7"]`` -> (["<a>", "<b>"], {"<b>": 7}); duplicates and bad ids are one-line errors."""
    tokens, ids = [], {}
    for spec in specs:
        token, sep, value = spec.rpartition("=") if "=" in spec and spec.rsplit("=", 1)[1].isdigit() else (spec, "", "")
        if not token:
            raise DataError(f"--special-tokens {spec!r}: empty token")
        if token in tokens:
            raise DataError(f"--special-tokens: {token!r} given twice")
        tokens.append(token)
        if sep:
            if int(value) in ids.values():
                raise DataError(f"--special-tokens: id {value} requested for two tokens")
            ids[token] = int(value)
    return tokens, ids


def _build(spec: TokenizerSpec, specials: list[str]) -> tuple[Any, Any]:
    """(untrained Tokenizer, trainer) for ``spec``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if spec.model not in MODELS:
        raise DataError(f"--model {spec.model!r}: choose one of {', '.join(MODELS)}")
    needs_unk = spec.model in ("wordpiece", "wordlevel", "unigram")
    if needs_unk and UNK not in specials:
        specials = [*specials, UNK]
    byte_level = spec.pre_tokenizer == "byte_level"
    common: dict[str, Any] = {"vocab_size": spec.vocab_size, "special_tokens": specials, "show_progress": False}
    if spec.model == "bpe":
        model, trainer = models.BPE(), trainers.BpeTrainer(
            min_frequency=spec.min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
            **common)
    elif spec.model == "wordpiece":
        model, trainer = models.WordPiece(unk_token=UNK), trainers.WordPieceTrainer(min_frequency=spec.min_frequency,
                                                                                    **common)
    elif spec.model == "unigram":
        model, trainer = models.Unigram(), trainers.UnigramTrainer(
            unk_token=UNK, initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [], **common)
    else:
        model, trainer = models.WordLevel(unk_token=UNK), trainers.WordLevelTrainer(min_frequency=spec.min_frequency,
                                                                                    **common)
    tok = Tokenizer(model)
    pre = {
        "byte_level": lambda: pre_tokenizers.ByteLevel(add_prefix_space=spec.add_prefix_space),
        "whitespace": pre_tokenizers.Whitespace,
        "metaspace": lambda: pre_tokenizers.Metaspace(prepend_scheme="always" if spec.add_prefix_space else "never"),
        "bert": pre_tokenizers.BertPreTokenizer,
    }
    if spec.pre_tokenizer not in pre:
        raise DataError(f"--pre-tokenizer {spec.pre_tokenizer!r}: choose one of {', '.join(PRE_TOKENIZERS)}")
    tok.pre_tokenizer = pre[spec.pre_tokenizer]()
    if byte_level:
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)  # offsets only, as upstream
    elif spec.pre_tokenizer == "metaspace":
        tok.decoder = decoders.Metaspace(prepend_scheme="always" if spec.add_prefix_space else "never")
    elif spec.model == "wordpiece":
        tok.decoder = decoders.WordPiece()
    norm = {"nfkc": normalizers.NFKC, "nfc": normalizers.NFC, "nfd": normalizers.NFD, "nfkd": normalizers.NFKD,
            "lowercase": normalizers.Lowercase}
    if spec.normalizer not in (*norm, "none"):
        raise DataError(f"--normalizer {spec.normalizer!r}: choose one of {', '.join(NORMALIZERS)}")
    if spec.normalizer != "none":
        tok.normalizer = norm[spec.normalizer]()
    return tok, trainer


def iter_texts(inputs: Sequence[str], keys: Sequence[str]) -> Iterator[str]:
    """Every non-empty text under ``keys`` of every record, streamed; bad records are one-line errors."""
    from neoxt.data.tokenize import text_field

    with Progress(None, "reading", unit="doc") as bar:
        for batch in iter_batches(expand_inputs(inputs), keys):
            for i in range(len(batch.payloads)):
                rec = decode_payload(batch, i)
                if rec is None:
                    continue
                for key in keys:
                    text = text_field(rec, key, batch.location(i))
                    if text:
                        yield text
                bar.update(1)


def renumber(tok_json: dict[str, Any], wanted: dict[str, int]) -> dict[str, Any]:
    """Move the tokens in ``wanted`` to their ids; every other token keeps its order in the ids left."""
    model = tok_json["model"]
    vocab = model["vocab"]
    listed = isinstance(vocab, list)  # Unigram: [[piece, score], ...] where the position is the id
    old_ids = {piece: i for i, (piece, _) in enumerate(vocab)} if listed else dict(vocab)
    size = len(old_ids)
    for token, new in wanted.items():
        if token not in old_ids:
            raise DataError(f"--special-tokens: {token!r} is not in the vocabulary")
        if not 0 <= new < size:
            raise DataError(f"--special-tokens {token}={new}: the trained vocabulary has {size} tokens "
                            f"(ids 0-{size - 1}); use a larger corpus or a smaller id")
    fixed = {old_ids[t]: new for t, new in wanted.items()}
    free = iter(i for i in range(size) if i not in set(fixed.values()))
    mapping = {old: fixed[old] if old in fixed else next(free) for old in sorted(old_ids.values())}
    if listed:
        ordered: list[Any] = [None] * size
        for old, entry in enumerate(vocab):
            ordered[mapping[old]] = entry
        model["vocab"] = ordered
    else:
        model["vocab"] = {piece: mapping[i] for piece, i in sorted(vocab.items(), key=lambda kv: mapping[kv[1]])}
    if model.get("unk_id") is not None:
        model["unk_id"] = mapping[model["unk_id"]]
    for added in tok_json.get("added_tokens", []):
        added["id"] = mapping[added["id"]]
    tok_json["added_tokens"] = sorted(tok_json.get("added_tokens", []), key=lambda a: a["id"])
    return tok_json


def train_tokenizer(inputs: Sequence[str], spec: TokenizerSpec, keys: Sequence[str] = ("text",)) -> Any:
    """Train and return a ``tokenizers.Tokenizer`` (special tokens where ``spec`` asks)."""
    from tokenizers import Tokenizer

    if spec.vocab_size < 1:
        raise DataError(f"--vocab-size must be positive, got {spec.vocab_size}")
    specials, wanted = parse_special(spec.special_tokens)
    tok, trainer = _build(spec, specials)
    tok.train_from_iterator(iter_texts(inputs, keys), trainer=trainer)
    if tok.get_vocab_size() == len(specials):
        raise DataError("the input holds no text to train on")
    if wanted:
        tok = Tokenizer.from_str(json.dumps(renumber(json.loads(tok.to_str()), wanted)))
    return tok


def save_tokenizer(tok: Any, output: str, hf_dir: str | None = None, chat_template: str | None = None) -> list[str]:
    """Write ``tokenizer.json`` (atomically) and, when asked, an HF tokenizer directory; returns the paths."""

    out = Path(output)
    if out.is_dir() or not out.suffix:
        out = out / "tokenizer.json"
    written = [str(write_text_atomic(out, tok.to_str(pretty=True)))]
    if hf_dir:
        written.append(_save_hf_dir(tok, Path(hf_dir), chat_template))
    return written


def _save_hf_dir(tok: Any, target: Path, chat_template: str | None) -> str:
    from transformers import PreTrainedTokenizerFast

    vocab = tok.get_vocab()
    roles = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|padding|>", "unk_token": UNK}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in roles.items() if v in vocab})
    if chat_template:
        fast.chat_template = chat_template
    tmp = temp_dir_beside(target, DataError, replace=True)
    try:
        fast.save_pretrained(str(tmp))
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
