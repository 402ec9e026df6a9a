"""Scoring conversations with a reward model: what ``neoxt score`` does.

Each JSONL line is a record with ``messages`` (a conversation, rendered with the tokenizer's chat
template) or ``text`` (taken as is); its score is the value head at the last token
(``neoxt.model.value_head``), the same number the HF ``*ForSequenceClassification`` export gives.
"""

from __future__ import annotations

from typing import Any

from neoxt.data.readers import read_jsonl_records
from neoxt.errors import DataError
from neoxt.model.value_head import score_sequences


def read_records(path: str) -> list[dict[str, Any]]:
    """The JSONL records of ``path``; a bad line is a DataError naming the file and line."""
    records = []
    for number, record in read_jsonl_records(path):
        if not ("messages" in record or "text" in record):
            raise DataError(f"{path}:{number}: expected an object with 'messages' or 'text'")
        records.append(record)
    return records


def record_tokens(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """Token ids of one record: its conversation through the chat template, or its text."""
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"])
    return tokenizer.encode(record["text"], add_special_tokens=False)


def score_records(model: Any, tokenizer: Any, records: list[dict[str, Any]], batch_size: int = 8) -> list[float]:
    return score_sequences(model, [record_tokens(tokenizer, r) for r in records], batch_size)
