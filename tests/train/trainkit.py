"""Helpers for the training tests: tiny configs and an in-memory, resumable batch source."""

from __future__ import annotations

from dataclasses import replace

import torch

from neoxt.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    TrainingConfig,
)


def tiny_config(save=None, **training) -> RunConfig:
    model = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_kv_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        padded_vocab_size=64,
        attention_types=("global", "global"),
    )
    t = dict(train_iters=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, train_batch_size=4, seed=7)
    t.update(training)
    return RunConfig(
        model=model,
        data=DataConfig(seq_length=16),
        optimizer=OptimizerConfig(optimizer_type="adam", lr=1e-2, weight_decay=0.01, gradient_clipping=1.0),
        schedule=ScheduleConfig(lr_decay_style="cosine", warmup_iters=2),
        training=TrainingConfig(**t),
        checkpoint=CheckpointConfig(save=str(save) if save else None),
        logging=LoggingConfig(log_interval=1),
    )


def with_checkpoint(cfg: RunConfig, **kw) -> RunConfig:
    return replace(cfg, checkpoint=replace(cfg.checkpoint, **kw))


class PatternSource:
    """Sequences following t[i+1] = (t[i] + step) % vocab, random start/step per sequence.

    Batch ``n`` depends only on (seed, n), so ``state_dict`` is just the count of batches served.
    ``empty_label_every``: every k-th batch has all labels -100 (an all-masked SFT window).
    """

    def __init__(self, seed=0, micro_batch=2, seq=16, vocab=64, empty_label_every=0):
        self.seed, self.micro_batch, self.seq, self.vocab = seed, micro_batch, seq, vocab
        self.empty_label_every = empty_label_every
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.served)
        start = torch.randint(0, self.vocab, (self.micro_batch, 1), generator=g)
        step = torch.randint(1, 4, (self.micro_batch, 1), generator=g)
        seq = (start + step * torch.arange(self.seq + 1)) % self.vocab
        tokens, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
        self.served += 1
        if self.empty_label_every and self.served % self.empty_label_every == 0:
            labels[:] = -100
        return {"tokens": tokens, "labels": labels, "loss_mask": (labels >= 0).float()}

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = int(state["served"])
