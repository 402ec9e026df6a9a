"""Reading a reward model (``ModelConfig.value_head``): one scalar per sequence.

A sequence's score is the value head's output at its last token, as HF's
``*ForSequenceClassification`` pools it (the last non-padding token). In training batches
(``tokens`` = document[:-1], ``labels`` = document[1:]) that is the position whose label is the last
counted one: with documents that end in EOD (as preprocessing appends) it is the last content
token, the same token HF scores in the document without its EOD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neoxt.errors import ConfigError


def last_position_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] at each row's last True position of ``mask`` [B, T] -> [B].

    A row with no True position is an error (a pair with nothing to score)."""
    if not bool(mask.any(-1).all()):
        raise ConfigError("reward model: a sequence has no counted token to score (empty answer or label file)")
    columns = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, columns, torch.full_like(columns, -1)).amax(-1)
    return values.gather(-1, last.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def score_sequences(model: nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """Scores of token sequences under a value-head model (fp32), right-padded in batches."""
    if not getattr(model, "cfg", None) or not model.cfg.value_head:
        raise ConfigError("not a reward model: its config has no value head (train it with train_impl: rm)")
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[start:start + batch_size]]
        if any(not s for s in chunk):
            raise ConfigError("reward model: cannot score an empty sequence")
        width = max(len(s) for s in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool, device=device)
        for row, s in enumerate(chunk):
            tokens[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[row, : len(s)] = True
        # Right padding sits after every real token, so causal attention never sees it.
        values = model(tokens)[..., 0].float()
        out += last_position_values(values, mask).tolist()
    return out
