"""Prompts for online training (REINFORCE) from a JSONL file, as a resumable batch source.

Each line is ``{"prompt": str}``, ``{"text": str}`` or ``{"messages": [...]}`` (rendered with the
chat template and the generation prompt). The file is read in order and cycled; the micro-batches
of every data-parallel rank together take consecutive prompts (rank ``r`` takes rows ``r * micro``
onwards of each group of ``micro * dp_size``), so the prompts of a global batch do not depend on how
it is split. A micro-batch has the shape of an SFT batch: ``tokens`` hold the prompt (right-padded)
and the first counted label sits on its last token, which is where the REINFORCE objective reads
the prompt's end (``prompt_lengths``).
"""

from __future__ import annotations

from typing import Any

import torch

from neoxt.data.readers import read_jsonl_records
from neoxt.errors import DataError


def prompt_ids(tokenizer: Any, record: dict[str, Any], where: str) -> list[int]:
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True)
    text = record.get("prompt", record.get("text"))
    if not isinstance(text, str):
        raise DataError(f"{where}: expected 'prompt', 'text' or 'messages'")
    return tokenizer.encode(text, add_special_tokens=False)


def read_prompts(path: str, tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Token ids of every prompt of ``path`` (the last ``max_tokens`` of a longer one)."""
    out = []
    for number, record in read_jsonl_records(path):
        ids = prompt_ids(tokenizer, record, f"{path}:{number}")
        if not ids:
            raise DataError(f"{path}:{number}: empty prompt")
        out.append(ids[-max_tokens:])
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def prompt_lengths(b: dict[str, torch.Tensor]) -> list[int]:
    """Prompt length of each row of an SFT-shaped micro-batch: up to its first counted label (a row
    with no counted label is all prompt)."""
    counted = b["labels"] >= 0
    if "loss_mask" in b:
        counted &= b["loss_mask"] > 0
    width = counted.shape[1]
    first = torch.where(counted, torch.arange(width, device=counted.device), width).amin(-1)
    return [min(int(f) + 1, width) for f in first]


class JsonlPrompts:
    """A ``BatchSource`` of prompt micro-batches (see the module docstring)."""

    def __init__(self, prompts: list[list[int]], micro: int, dp_rank: int, dp_size: int, pad_id: int = 0):
        self.prompts, self.micro, self.dp_rank, self.dp_size, self.pad_id = prompts, micro, dp_rank, dp_size, pad_id
        self.position = 0  # prompts taken by all ranks so far

    def __iter__(self) -> JsonlPrompts:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.position + self.dp_rank * self.micro
        rows = [self.prompts[(start + i) % len(self.prompts)] for i in range(self.micro)]
        self.position += self.micro * self.dp_size
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.as_tensor(r)
            labels[i, len(r) - 1] = 0  # the prompt ends here
        return {"tokens": tokens, "labels": labels}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
