"""The loader: datasets from a RunConfig, upstream's batch layout, masks, and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neoxt.config import config_from_dict
from neoxt.data.indexed import IndexedDataset, IndexedDatasetWriter
from neoxt.data.loader import (
    BatchLoader,
    build_dataset,
    build_datasets,
    build_loader,
    make_batch_arrays,
    neox_resume_positions,
    split_num_samples,
    stream_index,
)
from neoxt.errors import ConfigError, DataError

EOD = 0


def write_corpus(prefix, num_docs, seed, lo=3, hi=40, base=1):
    """Documents of random length; every token distinct (base + running count), each ending in EOD."""
    rng = np.random.RandomState(seed)
    w = IndexedDatasetWriter(str(prefix), np.int32)
    pos = base
    for _ in range(num_docs):
        n = int(rng.randint(lo, hi))
        w.add_document(np.array(list(range(pos, pos + n - 1)) + [EOD]))
        pos += n - 1
    w.finalize()
    return str(prefix)


def base_cfg(**data):
    d = {
        "seq_length": 16,
        "train_iters": 20,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "eval_interval": 10,
        "eval_iters": 3,
        "seed": 1234,
    }
    d.update(data)
    return config_from_dict(d, world_size=1)


def batches_equal(a, b):
    assert a.sample_indices == b.sample_indices
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_sample_counts_follow_upstream():
    cfg = base_cfg()
    # train = iters × global batch; valid = (iters // eval_interval + 1) × eval_iters × batch; test = eval_iters × batch
    assert split_num_samples(cfg) == {"train": 20 * 4, "valid": 3 * 3 * 4, "test": 3 * 4}


def test_data_path_split_gives_disjoint_document_ranges(tmp_path):
    prefix = write_corpus(tmp_path / "c_text_document", 100, 1)
    cfg = base_cfg(data_path=prefix, split="80,15,5")
    ds = build_datasets(cfg)
    docs = {k: set(np.unique(np.asarray(v.maps.doc_idx)).tolist()) for k, v in ds.items()}
    assert docs["train"] == set(range(0, 80))
    assert docs["valid"] == set(range(80, 95))
    assert docs["test"] == set(range(95, 100))
    names = sorted(p.name.split("_indexmap")[0] for p in tmp_path.glob("*_doc_idx.npy"))
    assert names == ["c_text_document_test", "c_text_document_train", "c_text_document_valid"]
    assert build_dataset(base_cfg(data_path=prefix, split="100,0,0"), "valid") is None


def test_resume_after_k_batches_blend_and_gradient_accumulation(tmp_path):
    a = write_corpus(tmp_path / "a_text_document", 60, 2, base=1)
    b = write_corpus(tmp_path / "b_text_document", 40, 3, base=100_000)
    cfg = base_cfg(
        train_data_paths=[a, b], valid_data_paths=[a], test_data_paths=[b], train_data_weights=[0.7, 0.3]
    )
    first = build_loader(cfg, "train", eod_id=EOD)
    assert first.global_batch == 2  # micro 2 × dp 1; accumulation = 2 loader steps per iteration
    k = 7  # 3.5 iterations: restore mid-accumulation too
    for _ in range(k):
        next(first)
    state = first.state_dict()
    assert state["consumed_samples"] == k * 2
    fresh = build_loader(cfg, "train", eod_id=EOD)  # rebuilds from the cached index maps
    fresh.load_state_dict(state)
    straight = build_loader(cfg, "train", eod_id=EOD)
    for _ in range(k):
        next(straight)
    sources = set()
    for _ in range(len(first) + 5):  # past the end of the stream, where it wraps around
        x, y, z = next(first), next(fresh), next(straight)
        batches_equal(x, y)
        batches_equal(x, z)
        sources.update(int(first.dataset.source(i)[0]) for i in x.sample_indices)
    assert sources == {0, 1}
    # Another seed gives another stream.
    other = build_loader(base_cfg(train_data_paths=[a, b], valid_data_paths=[a], test_data_paths=[b],
                                  train_data_weights=[0.7, 0.3], seed=99), "train", eod_id=EOD)
    assert not torch.equal(next(other).tokens, next(build_loader(cfg, "train", eod_id=EOD)).tokens)


def test_data_parallel_ranks_take_contiguous_slices(tmp_path):
    prefix = write_corpus(tmp_path / "d_text_document", 50, 4)
    cfg = base_cfg(data_path=prefix)
    ds = build_dataset(cfg, "train")
    whole = BatchLoader(ds, 6, dp_size=1)
    ranks = [BatchLoader(ds, 3, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(4):
        w = next(whole)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p.tokens for p in parts]), w.tokens)
        assert parts[0].sample_indices + parts[1].sample_indices == w.sample_indices
    # The stream order the CLI reports is the concatenation of the ranks' rows.
    assert [stream_index(len(ds), 6, p) for p in range(12)] == list(range(12))
    n = len(ds) // 6 * 6
    assert stream_index(len(ds), 6, n + 1) == 1  # wraps to the start, dropping the last partial batch


def test_batch_from_label_file_masks_negatives():
    text = np.array([[5, 6, 7, 8, 9]])
    label = np.array([[-100, -100, 7, 8, -100]])
    out = make_batch_arrays(text, label)
    assert out["tokens"].tolist() == [[5, 6, 7, 8]]
    assert out["labels"].tolist() == [[0, 7, 8, 0]]
    assert out["loss_mask"].tolist() == [[0.0, 1.0, 1.0, 0.0]]
    plain = make_batch_arrays(text)
    assert plain["labels"].tolist() == [[6, 7, 8, 9]] and plain["loss_mask"].tolist() == [[1.0] * 4]


def test_eod_mask_loss_positions_and_document_ids():
    text = np.array([[11, 12, EOD, 13, 14, EOD, 15, 16]])
    out = make_batch_arrays(
        text, eod_id=EOD, eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True
    )
    # Upstream masks the loss where the *input* token is EOD.
    assert out["loss_mask"].tolist() == [[1, 1, 0, 1, 1, 0, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0]]
    assert out["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    plain = make_batch_arrays(text, eod_id=EOD)
    assert plain["position_ids"].tolist() == [list(range(7))] and "document_ids" not in plain
    with pytest.raises(ConfigError, match="EOD"):
        make_batch_arrays(text, eod_mask_loss=True)


def test_attention_mask_from_document_ids(tmp_path):
    prefix = write_corpus(tmp_path / "e_text_document", 30, 5, lo=2, hi=6)
    cfg = base_cfg(data_path=prefix, reset_attention_mask=True, reset_position_ids=True)
    batch = next(build_loader(cfg, "train", eod_id=EOD))
    mask = batch.attention_mask()
    b, t = batch.tokens.shape
    assert mask.shape == (b, 1, t, t) and mask.dtype == torch.bool
    for row in range(b):
        toks = batch.tokens[row].tolist()
        for q in range(t):
            for k in range(t):
                crosses = any(tok == EOD for tok in toks[k:q])  # an EOD at k..q-1 ends k's document
                assert bool(mask[row, 0, q, k]) == (k <= q and not crosses)
    assert torch.equal(batch.position_ids[:, 0], torch.zeros(b, dtype=torch.long))


def test_label_files_flow_into_batches(tmp_path):
    text = write_corpus(tmp_path / "s_messages_document", 20, 6)
    src = IndexedDataset(text)
    w = IndexedDatasetWriter(str(tmp_path / "s_messages_label_document"), np.int32)
    for i in range(len(src)):
        doc = src.get(i).astype(np.int64)
        doc[: len(doc) // 2] = -100  # the "prompt" half is masked
        w.add_document(doc)
    w.finalize()
    cfg = base_cfg(train_data_paths=[text], train_label_data_paths=[str(tmp_path / "s_messages_label_document")],
                   valid_data_paths=[text], test_data_paths=[text])
    loader = build_loader(cfg, "train", eod_id=EOD)
    for _ in range(5):
        batch = next(loader)
        assert torch.all(batch.labels[batch.loss_mask == 0] == 0)
        raw = loader.samples(batch.sample_indices)
        assert np.array_equal(batch.labels.numpy(), np.where(raw["label"] >= 0, raw["label"], 0)[:, 1:])
        assert np.array_equal(batch.loss_mask.numpy(), (raw["label"] >= 0)[:, 1:].astype(np.float32))
        # Where a label is kept, it is the text's next token (labels are aligned token for token).
        keep = raw["label"] >= 0
        assert np.array_equal(raw["label"][keep], raw["text"][keep])


def test_mismatched_label_file_in_config_is_a_clear_error(tmp_path):
    text = write_corpus(tmp_path / "t_messages_document", 10, 7)
    bad = write_corpus(tmp_path / "t_messages_label_document", 10, 8)
    cfg = base_cfg(train_data_paths=[text], train_label_data_paths=[bad], valid_data_paths=[text], test_data_paths=[text])
    with pytest.raises(DataError, match="t_messages_label_document.*t_messages_document"):
        build_dataset(cfg, "train")


def test_restore_into_changed_data_is_refused(tmp_path):
    prefix = write_corpus(tmp_path / "f_text_document", 40, 9)
    loader = build_loader(base_cfg(data_path=prefix), "train")
    next(loader)
    state = loader.state_dict()
    other = build_loader(base_cfg(data_path=prefix, train_iters=200), "train")
    with pytest.raises(DataError, match="changed since the checkpoint"):
        other.load_state_dict(state)


def test_neox_resume_positions():
    cfg = base_cfg()
    assert neox_resume_positions(cfg, 15) == {"train": 30, "valid": 30 // 10 * 3, "test": 0}


def write_docs(prefix, docs, dtype=np.int32):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(np.asarray(d))
    w.finalize()
    return str(prefix)


def test_preference_pairs_batch_chosen_then_rejected(tmp_path):
    rng = np.random.RandomState(11)
    prompts = [list(rng.randint(1, 50, size=rng.randint(2, 6))) for _ in range(30)]
    chosen = [p + [100 + k, 101 + k, EOD] for k, p in enumerate(prompts)]
    rejected = [p + [500 + k, EOD] for k, p in enumerate(prompts)]
    mask = [[-100] * len(p) for p in prompts]
    paths = {
        "pos": write_docs(tmp_path / "pos_document", chosen),
        "neg": write_docs(tmp_path / "neg_document", rejected),
        "pos_label": write_docs(tmp_path / "pos_label_document", [m + c[len(m):] for m, c in zip(mask, chosen)]),
        "neg_label": write_docs(tmp_path / "neg_label_document", [m + r[len(m):] for m, r in zip(mask, rejected)]),
    }
    data = dict(
        dataset_impl="pairwise", pack_impl="unpacked", train_impl="dpo",
        pos_train_data_paths=[paths["pos"]], neg_train_data_paths=[paths["neg"]],
        pos_train_label_data_paths=[paths["pos_label"]], neg_train_label_data_paths=[paths["neg_label"]],
    )
    cfg = base_cfg(**data)
    loader = build_loader(cfg, "train", eod_id=EOD)
    assert build_dataset(cfg, "valid") is None
    batch = next(loader)
    assert batch.pairwise and batch.tokens.shape == (4, 16)
    for row in range(2):
        pos, neg = batch.tokens[row].tolist(), batch.tokens[row + 2].tolist()
        k = next(i for i, c in enumerate(chosen) if pos[: len(c)] == c)
        assert neg[: len(rejected[k])] == rejected[k]  # the same pair, chosen rows first
        # Loss only on the response tokens (the label file), shifted to predict the next token.
        n_prompt = len(prompts[k])
        assert batch.loss_mask[row].tolist()[: n_prompt + 2] == [0.0] * (n_prompt - 1) + [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="pairwise.*unpacked"):
        build_dataset(base_cfg(**{**data, "pack_impl": "packed"}), "train")


def test_reward_file_reaches_the_batch(tmp_path):
    docs = [[10 * i + j + 1 for j in range(2 + i % 3)] + [EOD] for i in range(12)]
    text = write_docs(tmp_path / "k_document", docs)
    reward = write_docs(tmp_path / "k_reward_document", [[1 if i % 2 else -1] for i in range(len(docs))])
    cfg = base_cfg(train_data_paths=[text], train_reward_data_paths=[reward], valid_data_paths=[text],
                   test_data_paths=[text], pack_impl="unpacked", seq_length=8)
    batch = next(build_loader(cfg, "train", eod_id=EOD))
    assert batch.reward is not None and batch.reward.shape == batch.tokens.shape
    for row in range(batch.tokens.shape[0]):
        first = batch.tokens[row, 0].item()
        k = next(i for i, d in enumerate(docs) if d[0] == first)
        n = len(docs[k])
        # The document's reward on each of its n input positions (upstream spreads a document's
        # reward over its tokens; position n is the next document's carried token).
        assert batch.reward[row, : n].tolist() == [1.0 if k % 2 else -1.0] * n
    with pytest.raises(DataError, match="reward.*unpacked"):
        build_dataset(base_cfg(train_data_paths=[text], train_reward_data_paths=[reward], valid_data_paths=[text],
                               test_data_paths=[text]), "train")


def test_restore_with_another_batch_layout_continues_on_the_next_sample(tmp_path):
    prefix = write_corpus(tmp_path / "g_text_document", 60, 12)
    ds = build_dataset(base_cfg(data_path=prefix), "train")
    a = BatchLoader(ds, 4)
    for _ in range(3):
        next(a)
    b = BatchLoader(ds, 2, dp_rank=1, dp_size=2)  # same global batch of 4, now on two ranks
    b.load_state_dict(a.state_dict())
    assert next(b).sample_indices == (14, 15)
    c = BatchLoader(ds, 3)  # a smaller global batch: 12 consumed samples = 4 of its batches
    c.load_state_dict(a.state_dict())
    assert next(c).sample_indices == (12, 13, 14)
    d = BatchLoader(ds, 5)
    with pytest.raises(DataError, match="not a whole number"):
        d.load_state_dict(a.state_dict())
