"""Helpers for the training tests: tiny configs and an in-memory, resumable batch source."""

from __future__ import annotations

from dataclasses import dataclass, replace

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


class Killed(Exception):
    """Raised from a step callback to end ``train`` mid-run without a save, as ``kill -9`` would."""


@dataclass
class KilledRun:
    status: str
    start_iteration: int
    iteration: int
    losses: list
    nan_count: int  # NaN steps of this call


def train_killed_after(steps: int, *args, **kwargs) -> KilledRun:
    """``train(*args, **kwargs)`` killed after ``steps`` steps of this call (after that step's save, if
    any); returns the losses it reported, as a ``TrainResult`` would have."""
    from neoxt.train.loop import train

    losses: list[float] = []
    reached: list[int] = []
    nans: list[bool] = []

    def kill(iteration, r):
        losses.append(float("nan") if r.skipped else r.loss)
        reached.append(iteration)
        nans.append(r.nan)
        if len(losses) >= steps:
            raise Killed

    try:
        train(*args, on_step=[kill], **kwargs)
    except Killed:
        return KilledRun("killed", reached[0] - 1, reached[-1], losses, sum(nans))
    raise AssertionError(f"the run ended before {steps} steps")
