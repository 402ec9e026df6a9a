"""``neoxt preprocess-masked``: documents plus a label file that hides the prompt from the loss.

Two ways to say where the prompt ends, one output layout (``<prefix>_text_document`` and
``<prefix>_label_document``, both int32, labels ``-100`` on masked tokens, as the loader expects):

- ``mask_before``: upstream's ``tools/datasets/preprocess_data_with_mask.py --mask-before-token``.
  Every token up to and including the first occurrence of the delimiter token sequence is masked;
  a document without the delimiter is trained in full. The files are byte-identical to upstream's
  (checked against files its script wrote, tests/data/fixtures/upstream_mask).
- ``prompt_key``/``completion_key``: prompt/completion records. The prompt and the completion are
  tokenized separately and concatenated, so the mask covers exactly the prompt's tokens.

Decisions where upstream is odd: upstream reads the ``text`` field whatever ``--jsonl-keys`` says
and writes one label file for all keys; here exactly one key is read from its own field. A text
that tokenizes to no tokens is dropped (upstream writes an empty document, or crashes with
``--append-eod``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neoxt.config.schema import TokenizerConfig
from neoxt.data.readers import Batch, decode_payload, expand_inputs, iter_batches
from neoxt.data.tokenize import (
    EncodedBatch,
    PreprocessResult,
    check_outputs,
    open_writers,
    pack,
    run_pipeline,
    text_field,
)
from neoxt.errors import DataError

IGNORE = -100


def mask_before(tokens: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Upstream's ``mask``: -100 up to and including the first occurrence of ``pattern``."""
    n, k = len(tokens), len(pattern)
    if not k or n < k:
        return list(tokens)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens), k)
    hits = np.flatnonzero((windows == np.asarray(pattern)).all(axis=1))
    if not hits.size:
        return list(tokens)
    end = int(hits[0]) + k
    return [IGNORE] * end + list(tokens[end:])


def parse_token_list(value: str) -> list[int]:
    """``--mask-before-token 12,7,301`` -> [12, 7, 301]; anything else is a one-line error."""
    try:
        out = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise DataError(f"--mask-before-token {value!r}: expected comma-separated token ids, e.g. 0,1,1270") from None
    if not out or min(out) < 0:
        raise DataError(f"--mask-before-token {value!r}: expected comma-separated non-negative token ids")
    return out


@dataclass(frozen=True)
class MaskSpec:
    tokenizer: TokenizerConfig
    key: str = "text"
    mask_before: tuple[int, ...] = ()
    prompt_key: str | None = None
    completion_key: str | None = None
    append_eod: bool = False
    ftfy: bool = False


class MaskedEncoder:
    """Batch -> (tokens, labels) per kept document. Built once per worker process."""

    def __init__(self, spec: MaskSpec):
        from neoxt.data.tokenize import _load_ftfy
        from neoxt.tokenizer import load_tokenizer

        self.spec = spec
        self.tok = load_tokenizer(spec.tokenizer)
        self.fix = _load_ftfy() if spec.ftfy else None

    def _fields(self, batch: Batch, i: int) -> list[str] | None:
        rec = decode_payload(batch, i)
        if rec is None:
            return None
        keys = [self.spec.prompt_key, self.spec.completion_key] if self.spec.prompt_key else [self.spec.key]
        return [text_field(rec, k, batch.location(i)) for k in keys]  # type: ignore[arg-type]

    def __call__(self, batch: Batch) -> EncodedBatch:
        out = EncodedBatch(arrays={})
        texts, labels = [], []
        for i in range(len(batch.payloads)):
            try:
                values = self._fields(batch, i)
            except DataError as err:
                out.bad.append(str(err))
                continue
            if values is None:  # a blank line
                continue
            if not any(values):  # upstream (lm_dataformat) drops empty texts
                out.empty += 1
                continue
            if self.fix is not None:
                values = [self.fix(v) for v in values]
            out.nbytes += sum(len(v) for v in values)
            ids, label = self._encode(values)
            if not ids:
                out.empty += 1
                continue
            texts.append(ids)
            labels.append(label)
        out.docs = len(texts)
        out.arrays = {"text": pack(texts), "label": pack(labels)}
        return out

    def _encode(self, values: list[str]) -> tuple[list[int], list[int]]:
        if len(values) == 1:
            ids = self.tok.encode(values[0])
            if ids and self.spec.append_eod:
                ids = ids + [self.tok.eod_id]
            return ids, mask_before(ids, self.spec.mask_before)
        prompt = self.tok.encode(values[0]) if values[0] else []
        completion = self.tok.encode(values[1]) if values[1] else []
        ids = prompt + completion
        if ids and self.spec.append_eod:
            ids = ids + [self.tok.eod_id]
        return ids, [IGNORE] * len(prompt) + ids[len(prompt):]


def preprocess_masked(
    inputs: str | Sequence[str],
    output_prefix: str,
    tokenizer: TokenizerConfig,
    key: str = "text",
    mask_before_tokens: Sequence[int] = (),
    mask_before_text: str | None = None,
    prompt_key: str | None = None,
    completion_key: str | None = None,
    append_eod: bool = False,
    ftfy: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    num_docs: int | None = None,
    batch_size: int = 256,
) -> PreprocessResult:
    """Write ``<output_prefix>_<key>_document`` and ``<output_prefix>_label_document`` (int32)."""
    from neoxt.tokenizer import load_tokenizer

    name = "text" if prompt_key else key
    outputs = {"text": f"{output_prefix}_{name}_document", "label": f"{output_prefix}_label_document"}
    check_outputs(outputs.values())  # an unwritable output fails before any work
    tok = load_tokenizer(tokenizer)
    pattern = _pattern(tok, mask_before_tokens, mask_before_text, prompt_key, completion_key)
    if append_eod and tok.eod_id is None:
        raise DataError(f"--append-eod: tokenizer {tok.name} has no end-of-document token")
    if key == "label":
        raise DataError("--jsonl-keys label: 'label' is the name of the label output")
    spec = MaskSpec(tokenizer=tokenizer, key=key, mask_before=tuple(pattern), prompt_key=prompt_key,
                    completion_key=completion_key, append_eod=append_eod, ftfy=ftfy)
    columns = [prompt_key, completion_key] if prompt_key else [key]
    batches = iter_batches(expand_inputs(inputs), columns, batch_size=batch_size)  # type: ignore[arg-type]
    writers = open_writers(outputs, np.int32)  # upstream forces int32 for every file
    stats = run_pipeline(batches, MaskedEncoder, spec, writers, workers=workers, skip_bad_lines=skip_bad_lines,
                         num_docs=num_docs, label="preprocess-masked")
    return PreprocessResult(outputs=outputs, stats=stats, dtype=np.dtype(np.int32))


def _pattern(tok, tokens: Sequence[int], text: str | None, prompt_key: str | None,
             completion_key: str | None) -> list[int]:
    modes = [bool(tokens), text is not None, prompt_key is not None]
    if sum(modes) != 1:
        raise DataError("give exactly one of --mask-before-token, --mask-before-text or --prompt-key/--completion-key")
    if (prompt_key is None) != (completion_key is None):
        raise DataError("--prompt-key and --completion-key go together")
    if text is not None:
        ids = tok.encode(text)
        if not ids:
            raise DataError(f"--mask-before-text {text!r} tokenizes to nothing")
        return ids
    return list(tokens)
