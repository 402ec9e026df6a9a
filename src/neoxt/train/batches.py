"""Micro-batch sources as the trainer reads them: dicts of tensors from ``neoxt.data.loader``.

``open_train_data`` (in ``setup.py``) opens the run's train/valid splits with these; an objective that
reads further data of its own (the forget and retain sets of ``objectives/unlearning.py``) opens
them with ``open_indexed`` so they are ordinary indexed datasets with the same resumable position.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from neoxt.config.schema import RunConfig


class DictBatches:
    """Adapts ``neoxt.data.loader.BatchLoader`` (``Batch`` objects) to the dict micro-batches here."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __iter__(self) -> DictBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        b = next(self.loader)
        out = {"tokens": b.tokens, "labels": b.labels, "loss_mask": b.loss_mask, "position_ids": b.position_ids}
        if b.document_ids is not None:
            out["attention_mask"] = b.attention_mask()
        for extra in ("ref", "reward"):
            if getattr(b, extra, None) is not None:
                out[extra] = getattr(b, extra)
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def eod_id_for(cfg: RunConfig) -> int | None:
    """The tokenizer's end-of-document id when the data options need it (EOD masking / resets)."""
    d = cfg.data
    if not (d.eod_mask_loss or d.reset_position_ids or d.reset_attention_mask):
        return None
    from neoxt.tokenizer import load_tokenizer

    return load_tokenizer(cfg.tokenizer).eod_id


def open_indexed(cfg: RunConfig, prefix: str, name: str, num_samples: int, dp_rank: int = 0) -> DictBatches:
    """All documents of the indexed dataset ``prefix`` as this rank's micro-batches, sampled as the
    train split is (``seq_length``, ``seed``, ``pack_impl``), with an index map for ``num_samples``."""
    from neoxt.data.indexed import IndexedDataset
    from neoxt.data.loader import build_loader
    from neoxt.data.sampling import IndexSpec, build_gpt_dataset

    d = cfg.data
    text = IndexedDataset(prefix)
    spec = IndexSpec(name, max(1, num_samples), d.seq_length, cfg.training.seed, d.pack_impl, d.allow_chopped)
    dataset = build_gpt_dataset(name, prefix, text, np.arange(len(text.sizes), dtype=np.int32), spec,
                                cache_dir=d.index_cache_dir)
    loader = build_loader(cfg, "train", dp_rank=dp_rank, eod_id=eod_id_for(cfg), dataset=dataset)
    assert loader is not None
    loader.name = name
    return DictBatches(loader)
