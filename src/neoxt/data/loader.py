"""Datasets for a RunConfig's train/valid/test splits and the resumable micro-batch loader.

The sample stream is GPT-NeoX's: ``build_train_valid_test_data_loaders`` (sample counts from
``train_iters``, ``eval_interval``, ``eval_iters`` and the global batch; a ``split`` of one
``data_path`` or explicit per-split paths blended by weight), a sequential sampler, and
``DistributedBatchSampler`` batches of ``micro_batch × dp`` samples in which data-parallel rank ``r``
takes the ``r``-th contiguous slice, dropping the last incomplete batch and starting over when the
stream runs out.

The loader is a plain iterator over numpy indexing (no worker processes: reading a packed sample is a
few memory-mapped slices, far cheaper than a step), so its whole state is one integer: the number of
global micro-batches consumed. ``state_dict()`` / ``load_state_dict()`` carry it through
checkpoints, and a restored loader yields exactly the batches the original would have yielded next.
Upstream wraps its loader in ``itertools.cycle``, which after a resume replays only the batches from
the resume point on; here a wrap always restarts at batch 0, so the stream depends only on the
position, not on when the job was restarted.

Beyond text (+ label file), a split may carry KTO rewards (``{split}_reward_data_paths``, unpacked
only) and precomputed reference log-probs (``<prefix>_<precompute_model_name>``), which reach the
batch cut to the inputs; with ``dataset_impl: pairwise`` (DPO/RM) the chosen (``pos_``) and rejected
(``neg_``) files share one index and a micro-batch holds the B chosen rows followed by the B rejected
ones, as upstream's DPO batch.

Document boundaries (``reset_attention_mask``) travel as ``document_ids [B, T]`` — the number of EOD
tokens strictly before each position — rather than a ``[B, 1, T, T]`` mask: T× smaller, enough for
flex_attention's document masking, and ``Batch.attention_mask()`` expands it to the dense boolean mask
(causal and same document) that the model's SDPA path accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from neoxt.config.schema import RunConfig
from neoxt.data.blend import (
    BlendedDataset,
    Dataset,
    blend,
    normalized_weights_and_num_samples,
    split_boundaries,
    weights_by_num_docs,
)
from neoxt.data.index_maps import IndexSpec
from neoxt.data.sampling import GPTDataset, build_gpt_dataset, build_pairwise_dataset
from neoxt.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")


def split_num_samples(cfg: RunConfig) -> dict[str, int]:
    """How many samples each split's index maps are built for (GPT-NeoX's rule)."""
    t = cfg.training
    if t.eval_interval <= 0:
        raise ConfigError(f"eval_interval must be positive, got {t.eval_interval}")
    return {
        "train": t.train_iters * t.train_batch_size,
        "valid": (t.train_iters // t.eval_interval + 1) * t.eval_iters * t.train_batch_size,
        "test": t.eval_iters * t.train_batch_size,
    }


def _open(prefix: str) -> Any:
    from neoxt.data.indexed import IndexedDataset

    return IndexedDataset(prefix)


def _spec(cfg: RunConfig, name: str, num_samples: int) -> IndexSpec:
    d = cfg.data
    return IndexSpec(name, num_samples, d.seq_length, cfg.training.seed, d.pack_impl, d.allow_chopped)


def _from_data_path(cfg: RunConfig, split: str, num_samples: int) -> GPTDataset | None:
    d = cfg.data
    assert d.data_path is not None
    text = _open(d.data_path)
    bounds = split_boundaries(d.split, len(text.sizes))
    k = SPLITS.index(split)
    if bounds[k + 1] <= bounds[k]:
        return None
    documents = np.arange(bounds[k], bounds[k + 1], dtype=np.int32)
    return build_gpt_dataset(
        split, d.data_path, text, documents, _spec(cfg, split, num_samples), cache_dir=d.index_cache_dir
    )


def _paths(cfg: RunConfig, key: str, count: int, base: str) -> list[str | None]:
    """A per-dataset companion path list (labels, rewards), checked against the data paths."""
    paths: Sequence[str] = getattr(cfg.data, key)
    if paths and len(paths) != count:
        raise ConfigError(f"{key} has {len(paths)} paths but {base} has {count}")
    return list(paths) if paths else [None] * count


def _weights(cfg: RunConfig, split: str, num_samples: int, texts: Sequence[Any]) -> tuple[list[float], list[int]]:
    d = cfg.data
    weights = tuple(getattr(d, f"{split}_data_weights")) or (1.0,) * len(texts)
    if len(weights) != len(texts):
        raise ConfigError(f"{split}_data_weights has {len(weights)} weights but there are {len(texts)} {split} datasets")
    if d.weight_by_num_documents:
        weights = tuple(weights_by_num_docs([len(t.sizes) for t in texts], alpha=d.weighted_sampler_alpha))
    return normalized_weights_and_num_samples(weights, num_samples)


def _open_ref(cfg: RunConfig, prefix: str) -> tuple[Any, str | None]:
    """Precomputed reference log-probs beside the data (``<prefix>_<precompute_model_name>``), if any.

    As upstream, a missing file means "no reference values" (with a warning here)."""
    name = cfg.training.precompute_model_name
    if not name:
        return None, None
    from neoxt.data.indexed import dataset_exists

    ref_prefix = f"{prefix}_{name}"
    if not dataset_exists(ref_prefix):
        log.warning("no precomputed reference log-probs at %s(.bin/.idx); continuing without them", ref_prefix)
        return None, None
    return _open(ref_prefix), ref_prefix


def _from_paths(cfg: RunConfig, split: str, num_samples: int) -> BlendedDataset | None:
    d = cfg.data
    paths: Sequence[str] = getattr(d, f"{split}_data_paths")
    if not paths:
        return None
    base = f"{split}_data_paths"
    labels = _paths(cfg, f"{split}_label_data_paths", len(paths), base)
    rewards = _paths(cfg, f"{split}_reward_data_paths", len(paths), base)
    texts = [_open(p) for p in paths]
    norm, counts = _weights(cfg, split, num_samples, texts)
    parts = []
    for i, (path, text) in enumerate(zip(paths, texts)):
        ref, ref_prefix = _open_ref(cfg, path)
        parts.append(
            build_gpt_dataset(
                f"{split}_{i}",
                path,
                text,
                np.arange(len(text.sizes), dtype=np.int32),
                _spec(cfg, f"{split}_{i}", counts[i]),
                label=_open(labels[i]) if labels[i] else None,
                label_prefix=labels[i],
                cache_dir=d.index_cache_dir,
                reward=_open(rewards[i]) if rewards[i] else None,
                reward_prefix=rewards[i],
                ref=ref,
                ref_prefix=ref_prefix,
            )
        )
    return blend(parts, norm)


def _pairwise_from_paths(cfg: RunConfig, split: str, num_samples: int) -> BlendedDataset | None:
    """Preference data: ``pos_/neg_{split}_data_paths`` (+ label paths), one shared index per pair."""
    d = cfg.data
    pos_paths: Sequence[str] = getattr(d, f"pos_{split}_data_paths")
    neg_paths: Sequence[str] = getattr(d, f"neg_{split}_data_paths")
    if not pos_paths:
        return None
    base = f"pos_{split}_data_paths"
    if len(neg_paths) != len(pos_paths):
        raise ConfigError(f"neg_{split}_data_paths has {len(neg_paths)} paths but {base} has {len(pos_paths)}")
    pos_labels = _paths(cfg, f"pos_{split}_label_data_paths", len(pos_paths), base)
    neg_labels = _paths(cfg, f"neg_{split}_label_data_paths", len(pos_paths), base)
    if any((a is None) != (b is None) for a, b in zip(pos_labels, neg_labels)):
        raise ConfigError(f"pos_{split}_label_data_paths and neg_{split}_label_data_paths must be given together")
    pos = [_open(p) for p in pos_paths]
    norm, counts = _weights(cfg, split, num_samples, pos)
    parts = []
    for i, (pos_path, neg_path) in enumerate(zip(pos_paths, neg_paths)):
        pl, nl = pos_labels[i], neg_labels[i]
        labels = (_open(pl), _open(nl)) if pl and nl else None
        pos_ref, _ = _open_ref(cfg, pos_path)
        neg_ref, _ = _open_ref(cfg, neg_path)
        refs = (pos_ref, neg_ref) if pos_ref is not None and neg_ref is not None else None
        parts.append(
            build_pairwise_dataset(
                f"{split}_{i}",
                pos_path,
                pos[i],
                neg_path,
                _open(neg_path),
                np.arange(len(pos[i].sizes), dtype=np.int32),
                _spec(cfg, f"{split}_{i}", counts[i]),
                labels=labels,
                label_prefixes=(pl or "", nl or ""),
                refs=refs,
                cache_dir=d.index_cache_dir,
            )
        )
    return blend(parts, norm)


def build_dataset(cfg: RunConfig, split: str, vocab_size: int | None = None) -> Dataset | None:
    """The dataset the trainer draws ``split`` from, or None when the config gives it no data. Token ids
    are checked against ``vocab_size`` (default ``padded_vocab_size``) once per file (``token_check``)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    d = cfg.data
    vocab_size = vocab_size if vocab_size is not None else cfg.model.padded_vocab_size
    if vocab_size is not None:
        from neoxt.data.token_check import check_split_token_ids

        check_split_token_ids(cfg, split, vocab_size)
    num_samples = split_num_samples(cfg)[split]
    if d.dataset_impl == "pairwise":
        if d.pack_impl == "packed":
            raise ConfigError("dataset_impl 'pairwise' needs pack_impl 'unpacked' or 'pack_until_overflow' (as GPT-NeoX)")
        if not d.pos_train_data_paths:
            raise ConfigError("dataset_impl 'pairwise' needs pos_train_data_paths and neg_train_data_paths")
        return _pairwise_from_paths(cfg, split, num_samples)
    if d.train_data_paths:
        return _from_paths(cfg, split, num_samples)
    if d.data_path:
        return _from_data_path(cfg, split, num_samples)
    raise ConfigError("no training data: set data_path or train_data_paths")


def build_datasets(cfg: RunConfig, splits: Sequence[str] = SPLITS) -> dict[str, Dataset | None]:
    """``{split: dataset or None}`` for the requested splits."""
    return {split: build_dataset(cfg, split) for split in splits}


# --------------------------------------------------------------------------------------------------
# Batches.


def document_ids(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """Per position, the number of EOD tokens strictly before it: an EOD ends its own document."""
    is_eod = tokens == eod_id
    return np.cumsum(is_eod, axis=-1) - is_eod


def reset_positions(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """Position ids that restart at 0 after every EOD (old Megatron's ``reset_position_ids``)."""
    t = tokens.shape[-1]
    ar = np.broadcast_to(np.arange(t, dtype=np.int64), tokens.shape)
    starts = np.zeros(tokens.shape, dtype=bool)
    starts[..., 0] = True
    starts[..., 1:] = tokens[..., :-1] == eod_id
    start_of_doc = np.maximum.accumulate(np.where(starts, ar, 0), axis=-1)
    return ar - start_of_doc


def make_batch_arrays(
    text: np.ndarray,
    label: np.ndarray | None = None,
    *,
    eod_id: int | None = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
) -> dict[str, np.ndarray]:
    """Upstream's ``_get_batch`` on ``[B, T+1]`` samples.

    tokens = text[:, :-1]; labels = the next token, or the label file's value shifted by one with
    negatives replaced by 0; loss_mask = (label >= 0) shifted, times "input token is not EOD" when
    ``eod_mask_loss``.
    """
    text = np.asarray(text, dtype=np.int64)
    if (eod_mask_loss or reset_position_ids or reset_attention_mask) and eod_id is None:
        raise ConfigError("eod_mask_loss / reset_position_ids / reset_attention_mask need a tokenizer with an EOD token")
    tokens = text[:, :-1]
    if label is not None:
        label = np.asarray(label, dtype=np.int64)
        loss_mask = (label[:, 1:] >= 0).astype(np.float32)
        labels = np.where(label >= 0, label, 0)[:, 1:]
    else:
        loss_mask = (text[:, 1:] >= 0).astype(np.float32)
        labels = text[:, 1:]
    if eod_mask_loss:
        loss_mask *= tokens != eod_id
    if reset_position_ids:
        positions = reset_positions(tokens, eod_id)  # type: ignore[arg-type]
    else:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int64), tokens.shape)
    out = {
        "tokens": np.ascontiguousarray(tokens),
        "labels": np.ascontiguousarray(labels),
        "loss_mask": loss_mask,
        "position_ids": np.ascontiguousarray(positions),
    }
    if reset_attention_mask:
        out["document_ids"] = document_ids(tokens, eod_id)  # type: ignore[arg-type]
    return out


def batch_arrays(samples: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
    """Stacked dataset items → the micro-batch arrays (``make_batch_arrays`` options pass through).

    Preference pairs become one batch of ``2B`` rows, chosen rows first, as upstream's DPO batch;
    rewards and reference log-probs are cut to the inputs (``[:, :-1]``), as upstream.
    """
    if "pos" in samples:
        sides = [make_batch_arrays(samples[k], samples.get(f"{k}_label"), **options) for k in ("pos", "neg")]
        out = {key: np.concatenate([sides[0][key], sides[1][key]]) for key in sides[0]}
        if "pos_ref" in samples:
            out["ref"] = np.concatenate([samples["pos_ref"], samples["neg_ref"]])[:, :-1]
        return out
    out = make_batch_arrays(samples["text"], samples.get("label"), **options)
    for key in ("reward", "ref"):
        if key in samples:
            out[key] = np.ascontiguousarray(samples[key][:, :-1])
    return out


@dataclass(frozen=True, eq=False)
class Batch:
    """One micro-batch for one data-parallel rank (torch tensors, on CPU).

    For preference data (``pairwise``) every tensor has ``2B`` rows: the B chosen sequences, then the
    B rejected ones in the same order.
    """

    tokens: torch.Tensor  # int64 [B, T]
    labels: torch.Tensor  # int64 [B, T]
    loss_mask: torch.Tensor  # float32 [B, T]
    position_ids: torch.Tensor  # int64 [B, T]
    document_ids: torch.Tensor | None = None  # int64 [B, T], only with reset_attention_mask
    reward: torch.Tensor | None = None  # float32 [B, T], with {split}_reward_data_paths (KTO)
    ref: torch.Tensor | None = None  # float32 [B, T], precomputed reference log-probs
    pairwise: bool = False
    sample_indices: tuple[int, ...] = ()  # dataset indices of the rows, for logging and debugging

    def attention_mask(self) -> torch.Tensor:
        """Dense ``BoolTensor [B, 1, T, T]``: True where query t may attend key s (s <= t, same document)."""
        import torch

        t = self.tokens.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril_()
        if self.document_ids is None:
            return causal.expand(self.tokens.shape[0], 1, t, t)
        same = self.document_ids[:, None, :, None] == self.document_ids[:, None, None, :]
        return same & causal


def _to_batch(arrays: dict[str, np.ndarray], indices: Sequence[int], pairwise: bool = False) -> Batch:
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return Batch(sample_indices=tuple(int(i) for i in indices), pairwise=pairwise, **tensors)


class BatchLoader:
    """Endless iterator over one rank's micro-batches of ``dataset``, resumable to the exact sample.

    Global micro-batch ``b`` holds dataset samples ``[(b mod n) * G, (b mod n + 1) * G)`` with
    ``G = micro_batch_size × dp_size`` and ``n = len(dataset) // G``; rank ``r`` takes rows
    ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of it.
    """

    def __init__(
        self,
        dataset: Dataset,
        micro_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        eod_id: int | None = None,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
        name: str = "train",
    ):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"bad batch layout: micro batch {micro_batch_size}, dp rank {dp_rank} of {dp_size}")
        self.dataset = dataset
        self.name = name
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = micro_batch_size * dp_size
        self.num_batches = len(dataset) // self.global_batch
        if self.num_batches == 0:
            raise DataError(
                f"{name} data has {len(dataset)} samples, fewer than one global micro-batch of {self.global_batch}"
            )
        self._batch_options = {
            "eod_id": eod_id,
            "eod_mask_loss": eod_mask_loss,
            "reset_position_ids": reset_position_ids,
            "reset_attention_mask": reset_attention_mask,
        }
        self.position = 0  # global micro-batches consumed

    def __len__(self) -> int:
        """Global micro-batches before the stream starts over (upstream's ``len(dataloader)``)."""
        return self.num_batches

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset indices of all ranks' samples in global micro-batch ``step``."""
        start = (step % self.num_batches) * self.global_batch
        return np.arange(start, start + self.global_batch, dtype=np.int64)

    def rank_indices(self, step: int) -> np.ndarray:
        lo = self.dp_rank * self.micro_batch_size
        return self.global_indices(step)[lo : lo + self.micro_batch_size]

    def samples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Stacked dataset items (``text`` [B, T+1], ``label`` ...) for the given indices."""
        items = [self.dataset[int(i)] for i in indices]
        return {key: np.stack([item[key] for item in items]) for key in items[0]}

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Batch:
        indices = self.rank_indices(self.position)
        s = self.samples(indices)
        arrays = batch_arrays(s, **self._batch_options)
        self.position += 1
        return _to_batch(arrays, indices, pairwise="pos" in s)

    def seek(self, micro_batches: int) -> None:
        """Continue after ``micro_batches`` global micro-batches (e.g. iteration × gradient accumulation)."""
        if micro_batches < 0:
            raise DataError(f"{self.name} loader: negative position {micro_batches}")
        self.position = int(micro_batches)

    def state_dict(self) -> dict[str, int | str]:
        return {
            "name": self.name,
            "micro_batches": self.position,
            "consumed_samples": self.position * self.global_batch,
            "global_batch": self.global_batch,
            "dataset_len": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; a different global batch is fine when the samples consumed divide it."""
        consumed = int(state["consumed_samples"])
        if int(state.get("dataset_len", len(self.dataset))) != len(self.dataset):
            raise DataError(
                f"{self.name} data changed since the checkpoint: {state['dataset_len']} samples then, "
                f"{len(self.dataset)} now (different data, seq_length, seed, iterations or weights)"
            )
        if consumed % self.global_batch:
            raise DataError(
                f"{self.name} loader: checkpoint consumed {consumed} samples, not a whole number of "
                f"global micro-batches of {self.global_batch}"
            )
        self.seek(consumed // self.global_batch)


def neox_resume_positions(cfg: RunConfig, iteration: int) -> dict[str, int]:
    """Loader positions (global micro-batches) GPT-NeoX uses when resuming at ``iteration``.

    For checkpoints imported from GPT-NeoX, which record no data position: train starts at
    ``iteration × gradient_accumulation_steps``; valid at
    ``(iteration × gradient_accumulation_steps // eval_interval) × eval_iters`` (upstream's formula).
    """
    t = cfg.training
    steps = iteration * t.gradient_accumulation_steps
    return {"train": steps, "valid": steps // max(t.eval_interval, 1) * t.eval_iters, "test": 0}


def build_loader(
    cfg: RunConfig,
    split: str = "train",
    *,
    dp_rank: int = 0,
    eod_id: int | None = None,
    dataset: Dataset | None = None,
    vocab_size: int | None = None,
) -> BatchLoader | None:
    """The loader the trainer uses for ``split`` (None without data); ``vocab_size``: see ``build_dataset``."""
    dataset = build_dataset(cfg, split, vocab_size) if dataset is None else dataset
    if dataset is None:
        return None
    d, t = cfg.data, cfg.training
    return BatchLoader(
        dataset,
        t.train_micro_batch_size_per_gpu,
        dp_rank=dp_rank,
        dp_size=t.data_parallel_size,
        eod_id=eod_id,
        eod_mask_loss=d.eod_mask_loss,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        name=split,
    )


def stream_index(loader_len_samples: int, global_batch: int, position: int) -> int:
    """Dataset index of the ``position``-th sample the trainer draws (all ranks, in order)."""
    num_batches = loader_len_samples // global_batch
    if num_batches == 0:
        raise DataError(f"{loader_len_samples} samples, fewer than one global micro-batch of {global_batch}")
    step, row = divmod(position, global_batch)
    return (step % num_batches) * global_batch + row


# --------------------------------------------------------------------------------------------------
# `neoxt data samples`: the stream the trainer draws, in global order.


@dataclass(frozen=True, eq=False)
class StreamSample:
    """The ``position``-th sample the trainer draws for a split (all data-parallel ranks, in order)."""

    position: int
    index: int  # index into the split's (blended) dataset
    source: str  # prefix of the indexed dataset the sample comes from
    source_index: int  # index within that dataset
    item: dict[str, np.ndarray]  # "text" (+ "label", "reward", "ref"), or "pos"/"neg" (+ labels) for pairs


def _source_of(dataset: Dataset, index: int) -> tuple[str, int]:
    if isinstance(dataset, BlendedDataset):
        d, s = dataset.source(index)
        return str(getattr(dataset.datasets[d], "prefix", f"dataset {d}")), s
    return str(getattr(dataset, "prefix", "dataset")), index


def stream_samples(
    cfg: RunConfig, split: str, start: int, count: int, dataset: Dataset | None = None
) -> list[StreamSample]:
    """Samples ``start .. start+count-1`` of ``split`` in the order the trainer draws them."""
    if start < 0 or count < 0:
        raise ConfigError(f"--start and --count must be non-negative (got {start}, {count})")
    dataset = build_dataset(cfg, split) if dataset is None else dataset
    if dataset is None:
        raise DataError(f"the config gives no {split} data (check data_path/split or {split}_data_paths)")
    t = cfg.training
    global_batch = t.train_micro_batch_size_per_gpu * t.data_parallel_size
    out = []
    for position in range(start, start + count):
        index = stream_index(len(dataset), global_batch, position)
        source, source_index = _source_of(dataset, index)
        out.append(StreamSample(position, index, source, source_index, dataset[index]))
    return out


_TOKEN_KEYS = ("text", "pos", "neg")


def samples_command(args: Any) -> int:
    """Handler of ``neoxt data samples`` (registered in ``neoxt.data.commands``)."""
    import json
    import sys

    from neoxt.config import load_config

    cfg = load_config(args.configs, args.overrides, world_size=args.world_size)
    if split_num_samples(cfg)[args.split] == 0:
        raise ConfigError(
            f"the config draws no {args.split} samples (train_iters={cfg.training.train_iters}, "
            f"eval_iters={cfg.training.eval_iters}); set them to see the stream"
        )
    samples = stream_samples(cfg, args.split, args.start, args.count)
    decode = None
    if args.decode:
        from neoxt.tokenizer import load_tokenizer

        decode = load_tokenizer(cfg.tokenizer).decode
    t = cfg.training
    global_batch = t.train_micro_batch_size_per_gpu * t.data_parallel_size
    for s in samples:
        step, row = divmod(s.position, global_batch)
        record: dict[str, Any] = {
            "position": s.position,
            "micro_batch": step,
            "dp_rank": row // t.train_micro_batch_size_per_gpu,
        }
        if args.split == "train":
            record["iteration"] = step // t.gradient_accumulation_steps + 1
        record.update(index=s.index, source=s.source, source_index=s.source_index)
        for key, values in s.item.items():
            record[key] = values.tolist()
        if decode is not None:
            for key in _TOKEN_KEYS:
                if key in s.item:
                    record[f"{key}_decoded" if key != "text" else "decoded"] = decode(s.item[key].tolist())
        if args.json:
            sys.stdout.write(json.dumps(record) + "\n")
            continue
        it = f"iteration {record['iteration']}, " if "iteration" in record else ""
        sys.stdout.write(
            f"sample {s.position} ({it}micro-batch {step}, dp rank {record['dp_rank']}) <- "
            f"{s.source} [{s.source_index}] (index {s.index})\n"
        )
        for key in s.item:
            name = {"text": "tokens", "label": "labels"}.get(key, key)
            sys.stdout.write(f"  {name:<9} {record[key]}\n")
        if decode is not None:
            for key in _TOKEN_KEYS:
                if key in s.item:
                    decoded = record[f"{key}_decoded" if key != "text" else "decoded"]
                    sys.stdout.write(f"  {'text' if key == 'text' else key + ' text':<9} {decoded!r}\n")
    return 0
