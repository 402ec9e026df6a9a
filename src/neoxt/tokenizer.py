"""Tokenizers behind one small interface, chosen the way GPT-NeoX configs choose them.

``tokenizer_type`` + ``vocab_file`` (+ ``merge_file``) mean what they mean in GPT-NeoX
(megatron/tokenizer/tokenizer.py), and ``encode`` gives the same ids as upstream's ``tokenize`` so
data tokenized here matches data tokenized there:

- ``HFTokenizer``: a ``tokenizer.json`` (upstream) or an HF tokenizer directory / Hub name (ours: the
  directory also supplies the chat template and special tokens). EOD is ``<|endoftext|>`` as upstream,
  falling back to the directory's ``eos_token`` when the vocabulary has no ``<|endoftext|>``.
- ``HFGPT2Tokenizer``: an HF GPT-2 tokenizer directory / name, plus a ``<|padding|>`` token (upstream).
- ``GPT2BPETokenizer``: ``vocab.json`` + ``merges.txt`` (byte-level BPE, ``<|endoftext|>`` special).
- ``SPMTokenizer``: a SentencePiece model (needs the ``sentencepiece`` package).
- ``TiktokenTokenizer``: a tiktoken encoding name such as ``cl100k_base`` (needs ``tiktoken``).
- ``CharLevelTokenizer``: UTF-8 bytes, vocabulary 512, EOD 0, pad 1 (upstream).

Heavy imports (transformers, sentencepiece, tiktoken) happen only when a tokenizer needs them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neoxt.config.schema import TokenizerConfig
from neoxt.errors import ConfigError, DataError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
TOKENIZER_TYPES = (
    "HFTokenizer",
    "HFGPT2Tokenizer",
    "GPT2BPETokenizer",
    "SPMTokenizer",
    "TiktokenTokenizer",
    "CharLevelTokenizer",
)


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, model_parallel_size: int = 1) -> int:
    """GPT-NeoX's embedding rows: the vocabulary rounded up to a multiple of divisor x TP size."""
    multiple = make_vocab_size_divisible_by * model_parallel_size
    if multiple <= 0:
        raise ConfigError(f"make_vocab_size_divisible_by x model_parallel_size must be positive, got {multiple}")
    return -(-vocab_size // multiple) * multiple


class Tokenizer:
    """What data, training and generation need from a tokenizer; backends fill in the encoding."""

    name: str = "tokenizer"
    vocab_size: int
    eod_id: int | None = None
    # The tokenizer's declared end-of-sequence token (transformers' eos_token_id): what chat data
    # appends after a conversation. Often the same as eod_id; differs for chat tokenizers.
    eos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None
    # Values the chat template may reference (bos_token, eos_token, ...), as transformers passes them.
    special_tokens_map: dict[str, str]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as text through the chat template (transformers' Jinja environment)."""
        if not self.chat_template:
            raise ConfigError(f"tokenizer {self.name} has no chat template; set tokenizer 'chat_template' "
                              "or use a tokenizer directory that has one")
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens_map,
            )
        except Exception as err:  # jinja errors: these messages do not fit the template
            raise DataError(f"chat template of {self.name} failed on these messages: "
                            f"{type(err).__name__}: {err}") from err
        return rendered[0]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation, encoded without added BOS/EOS (as transformers does)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


class _TokenizersBackend(Tokenizer):
    """Shared by the backends built on the Rust ``tokenizers`` library."""

    def __init__(self, name: str, tok: Any, special_tokens_map: dict[str, str], chat_template: str | None):
        self.name = name
        self._tok = tok
        self.special_tokens_map = special_tokens_map
        self.chat_template = chat_template
        self.vocab_size = tok.get_vocab_size()
        self.eod_id = tok.token_to_id(EOD_TOKEN)
        if self.eod_id is None and special_tokens_map.get("eos_token"):
            self.eod_id = tok.token_to_id(special_tokens_map["eos_token"])
        eos = special_tokens_map.get("eos_token")
        self.eos_id = tok.token_to_id(eos) if eos else None
        self.pad_id = tok.token_to_id(PAD_TOKEN)
        if self.pad_id is None and special_tokens_map.get("pad_token"):
            self.pad_id = tok.token_to_id(special_tokens_map["pad_token"])
        self._batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def _special_tokens_from_config(cfg: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _read_hf_dir_meta(directory: Path) -> tuple[dict[str, str], str | None]:
    """Special tokens and chat template saved beside a tokenizer.json by ``save_pretrained``."""
    cfg: dict[str, Any] = {}
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{cfg_path}: invalid JSON ({err})") from err
    special = _special_tokens_from_config(cfg)
    template = cfg.get("chat_template")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return special, template if isinstance(template, str) else None


def _resolve_chat_template(value: str | None) -> str | None:
    """A config's chat_template is either the template text or a path to a file holding it."""
    if value and "{" not in value and os.path.isfile(value):
        return Path(value).read_text(encoding="utf-8")
    return value


def _looks_local(path: str) -> bool:
    """A path a user meant as a file, not a Hub name ('org/name'), so a typo is not sent to the Hub."""
    return path.startswith(("/", ".", "~")) or path.endswith(".json") or path.count("/") > 1


class HFTokenizer(_TokenizersBackend):
    def __init__(self, path: str, chat_template: str | None = None, name: str = "HFTokenizer"):
        from tokenizers import Tokenizer as RustTokenizer

        p = Path(path)
        if p.is_file() or (p.is_dir() and (p / "tokenizer.json").is_file()):
            file = p if p.is_file() else p / "tokenizer.json"
            try:
                tok = RustTokenizer.from_file(str(file))
            except Exception as err:
                raise ConfigError(f"vocab_file {file}: not a tokenizers JSON file ({err})") from err
            special, template = _read_hf_dir_meta(file.parent)
        elif not p.exists() and _looks_local(path):
            raise ConfigError(f"vocab_file {path}: file not found")
        else:
            # A directory without tokenizer.json (slow-only tokenizer) or a Hub name: through transformers.
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(path)
            except Exception as err:
                raise ConfigError(f"vocab_file {path}: not a file, directory or loadable Hub tokenizer "
                                  f"({type(err).__name__}: {err})") from err
            tok = hf.backend_tokenizer
            special = {k: v for k, v in hf.special_tokens_map.items() if isinstance(v, str)}
            template = hf.chat_template if isinstance(hf.chat_template, str) else None
        super().__init__(name, tok, special, _resolve_chat_template(chat_template) or template)


class HFGPT2Tokenizer(HFTokenizer):
    """Upstream's HF GPT-2 tokenizer: GPT-2's vocabulary plus an added ``<|padding|>`` token."""

    def __init__(self, path: str | None, chat_template: str | None = None):
        super().__init__(path or "gpt2", chat_template, name="HFGPT2Tokenizer")
        if self._tok.token_to_id(PAD_TOKEN) is None:
            from tokenizers import AddedToken

            self._tok.add_special_tokens([AddedToken(PAD_TOKEN, special=True)])
        self.vocab_size = self._tok.get_vocab_size()
        self.pad_id = self._tok.token_to_id(PAD_TOKEN)


class GPT2BPETokenizer(_TokenizersBackend):
    """GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt``; ``<|endoftext|>`` is a special token."""

    def __init__(self, vocab_file: str, merge_file: str, chat_template: str | None = None):
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RustTokenizer

        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as err:
            raise ConfigError(f"vocab_file {vocab_file} / merge_file {merge_file}: cannot build GPT-2 BPE "
                              f"({err})") from err
        tok = RustTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOD_TOKEN) is None:
            raise ConfigError(f"vocab_file {vocab_file}: has no {EOD_TOKEN} token (GPT2BPETokenizer needs it)")
        tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
        special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
        super().__init__("GPT2BPETokenizer", tok, special, _resolve_chat_template(chat_template))


class SPMTokenizer(Tokenizer):
    def __init__(self, model_file: str, chat_template: str | None = None):
        try:
            import sentencepiece as spm
        except ModuleNotFoundError as err:
            raise ConfigError("tokenizer_type SPMTokenizer needs the 'sentencepiece' package: "
                              "pip install sentencepiece") from err
        if not os.path.isfile(model_file):
            raise ConfigError(f"vocab_file {model_file}: SentencePiece model not found")
        self.name = "SPMTokenizer"
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        eod = self._sp.piece_to_id(EOD_TOKEN)
        # piece_to_id answers unk for a missing piece; upstream would then append unk as EOD.
        if self._sp.id_to_piece(eod) != EOD_TOKEN:
            eod = self._sp.eos_id()
        self.eod_id = eod if eod >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else None
        self.special_tokens_map = {
            k: self._sp.id_to_piece(i)
            for k, i in (("bos_token", self._sp.bos_id()), ("eos_token", self._sp.eos_id()),
                         ("unk_token", self._sp.unk_id()))
            if i >= 0
        }
        self.chat_template = _resolve_chat_template(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: str, chat_template: str | None = None):
        try:
            import tiktoken
        except ModuleNotFoundError as err:
            raise ConfigError("tokenizer_type TiktokenTokenizer needs the 'tiktoken' package: "
                              "pip install tiktoken") from err
        try:
            self._enc = tiktoken.get_encoding(encoding)
        except Exception as err:
            raise ConfigError(f"vocab_file {encoding!r}: not a tiktoken encoding name ({err})") from err
        self.name = "TiktokenTokenizer"
        self.vocab_size = self._enc.n_vocab
        self.eod_id = self.eos_id = self._enc.eot_token
        self.pad_id = None
        self.special_tokens_map = {}
        self.chat_template = _resolve_chat_template(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._enc.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_batch(list(texts), allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


class CharLevelTokenizer(Tokenizer):
    """Upstream's byte tokenizer: ids are UTF-8 bytes; decoding clamps ids to [32, 512)."""

    def __init__(self, vocab_size: int = 512, chat_template: str | None = None):
        self.name = "CharLevelTokenizer"
        self.vocab_size = vocab_size
        self.eod_id = self.eos_id = 0
        self.pad_id = 1
        self.special_tokens_map = {}
        self.chat_template = _resolve_chat_template(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(max(32, min(int(i), self.vocab_size))) for i in ids)


def load_tokenizer(
    config: TokenizerConfig | None = None,
    *,
    tokenizer_type: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    chat_template: str | None = None,
) -> Tokenizer:
    """The tokenizer a config (or explicit type + paths, which win over the config) describes."""
    cfg = config or TokenizerConfig()
    ttype = tokenizer_type or cfg.tokenizer_type
    vocab = vocab_file if vocab_file is not None else cfg.vocab_file
    merges = merge_file if merge_file is not None else cfg.merge_file
    template = chat_template if chat_template is not None else cfg.chat_template
    canonical = {t.lower(): t for t in TOKENIZER_TYPES}.get((ttype or "").lower())
    if canonical is None:
        raise ConfigError(f"tokenizer_type {ttype!r} is not supported (choices: {', '.join(TOKENIZER_TYPES)})")
    if canonical == "CharLevelTokenizer":
        return CharLevelTokenizer(chat_template=template)
    if canonical == "HFGPT2Tokenizer":
        return HFGPT2Tokenizer(vocab, template)
    if not vocab:
        raise ConfigError(f"tokenizer_type {canonical} needs vocab_file")
    if canonical in ("HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer") and not (
        os.path.exists(vocab) or canonical == "HFTokenizer"
    ):
        raise ConfigError(f"vocab_file {vocab}: file not found")
    if canonical == "HFTokenizer":
        return HFTokenizer(vocab, template)
    if canonical == "GPT2BPETokenizer":
        if not merges:
            raise ConfigError("tokenizer_type GPT2BPETokenizer needs merge_file")
        if not os.path.exists(merges):
            raise ConfigError(f"merge_file {merges}: file not found")
        return GPT2BPETokenizer(vocab, merges, template)
    if canonical == "SPMTokenizer":
        return SPMTokenizer(vocab, template)
    return TiktokenTokenizer(vocab, template)
