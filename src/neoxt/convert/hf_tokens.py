"""Which special tokens and chat template an HF export carries, and where they come from.

An exported model must stop where the training data ended a document and must render chats, or the
users' eval pipeline fails ("chat_template is not set", ``generate`` running past the end). Each id
(``bos_token_id``, ``eos_token_id``, ``pad_token_id``) is taken from the first that has it:

1. the source HF model's ``config.json`` / ``generation_config.json`` when the run came from one
   (``hf-to-neoxt`` records them as ``special_token_ids.json`` in the run's ``tokenizer/``, which
   later runs name as ``vocab_file``), so Llama's 128000/128001 or OLMo-3's 100257 survive;
2. the tokenizer, when its files name the token (``tokenizer_config.json``);
3. the end-of-document token the data used (``<|endoftext|>`` when the vocabulary has it), for EOS
   and BOS — GPT-NeoX's convention (Pythia: bos = eos = ``<|endoftext|>``).

The chat template: the config's ``chat_template`` (text or file), else the tokenizer directory's
(``tokenizer_config.json`` or ``chat_template.jinja``, also beside a bare ``tokenizer.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoxt.config.schema import TokenizerConfig
from neoxt.errors import ConversionError

SOURCE_IDS_FILE = "special_token_ids.json"
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def source_ids(hf_dir: Path) -> dict[str, Any]:
    """bos/eos/pad ids an HF model directory declares (``config.json``; ``generation_config.json``
    fills the gaps). An id may be a list (several EOS ids, e.g. Llama-3 instruct)."""
    found: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):
        path = hf_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path}: not valid JSON ({err})") from err
        for key in ID_KEYS:
            if found.get(key) is None and data.get(key) is not None:
                found[key] = data[key]
    return found


def record_source_ids(hf_dir: Path, tokenizer_dir: Path) -> None:
    """Keep the source model's ids with the tokenizer ``hf-to-neoxt`` copies (see the module doc)."""
    ids = source_ids(hf_dir)
    if ids:
        (tokenizer_dir / SOURCE_IDS_FILE).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ExportTokens:
    ids: dict[str, Any]  # bos/eos/pad ids to write (only those known)
    tokens: dict[str, str]  # bos_token / eos_token / pad_token strings for the tokenizer files
    chat_template: str | None


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, list) else int(value)


def resolve_export_tokens(tok_cfg: TokenizerConfig, hf_tokenizer: Any) -> ExportTokens:
    """The special ids, their token strings and the chat template for an export (module doc's order)."""
    from neoxt.tokenizer import load_tokenizer

    ours = load_tokenizer(tok_cfg)
    ids: dict[str, Any] = {}
    recorded = Path(str(tok_cfg.vocab_file)).parent / SOURCE_IDS_FILE
    if tok_cfg.vocab_file and recorded.is_file():
        ids.update({k: v for k, v in json.loads(recorded.read_text(encoding="utf-8")).items() if k in ID_KEYS})
    for key in ID_KEYS:
        if ids.get(key) is None and getattr(hf_tokenizer, key, None) is not None:
            ids[key] = getattr(hf_tokenizer, key)
    if ours.eod_id is not None:
        for key in ("eos_token_id", "bos_token_id"):
            if ids.get(key) is None:
                ids[key] = ours.eod_id
    ids = {k: v for k, v in ids.items() if v is not None}
    tokens = {}
    for key, value in ids.items():
        token = hf_tokenizer.convert_ids_to_tokens(_first(value))
        if isinstance(token, str):
            tokens[key.removesuffix("_id")] = token
    return ExportTokens(ids, tokens, ours.chat_template)


def apply_to_tokenizer(hf_tokenizer: Any, export: ExportTokens) -> None:
    """Name the special tokens the tokenizer files lack (what it already names is kept) and set the
    chat template, so ``AutoTokenizer`` on the export has both."""
    for attr, token in export.tokens.items():
        if getattr(hf_tokenizer, attr, None) is None:
            setattr(hf_tokenizer, attr, token)
    if export.chat_template is not None:
        hf_tokenizer.chat_template = export.chat_template
