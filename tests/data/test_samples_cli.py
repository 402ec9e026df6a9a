"""`neoxt data samples` shows the samples GPT-NeoX's algorithm gives, in the order the trainer draws them.

The expected samples are re-derived here from upstream's published procedure (gpt2_dataset.py
_build_index_mappings / helpers.cpp build_sample_idx / GPT2Dataset.__getitem__, then
SequentialSampler + DistributedBatchSampler with drop_last) by a plain loop-based reimplementation
that imports nothing from neoxt.data's index builders, sampling, blend or loader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from neoxt.cli import main
from neoxt.data.indexed import IndexedDatasetWriter

SEQ = 32


def reference_stream(docs, documents, num_samples, seq_length, seed, global_batch, positions):
    """Upstream's samples for stream positions ``positions`` (one packed dataset, no blend)."""
    sizes = [len(d) for d in docs]
    tokens_per_epoch = sum(sizes[d] for d in documents)
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    rng = np.random.RandomState(seed=seed)
    doc_idx = np.array(list(documents) * epochs, dtype=np.int32)
    rng.shuffle(doc_idx)
    n = (epochs * tokens_per_epoch - 1) // seq_length
    starts = [(0, 0)]
    di = off = 0
    for _ in range(n):
        need = seq_length + 1
        while True:
            avail = sizes[doc_idx[di]] - off
            if avail >= need:  # the sample ends inside this document, on its last token
                off += need - 1
                break
            need -= avail
            di += 1
            off = 0
        starts.append((di, off))
    shuffle = np.arange(n, dtype=np.uint32)
    rng.shuffle(shuffle)
    length = min(len(shuffle) - 1, len(starts) - 1)  # upstream __len__
    num_batches = length // global_batch  # drop_last
    out = []
    for p in positions:
        step, row = divmod(p, global_batch)
        idx = (step % num_batches) * global_batch + row  # the stream starts over after the last batch
        j = int(shuffle[idx])
        (f, of), (e, oe) = starts[j], starts[j + 1]
        if f == e:
            toks = docs[doc_idx[f]][of : oe + 1]
        else:
            toks = list(docs[doc_idx[f]][of:])
            for k in range(f + 1, e):
                toks += list(docs[doc_idx[k]])
            toks += list(docs[doc_idx[e]][: oe + 1])
        out.append([int(t) for t in toks])
    return out, length


def make_docs(num_docs, seed):
    rng = np.random.RandomState(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.randint(1, 3 * SEQ))
        docs.append([int(x) for x in rng.randint(1, 60000, size=n)])
    return docs


def write(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(np.array(d))
    w.finalize()


def run_samples(capsys, *argv):
    code = main(["data", "samples", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_packed_samples_match_gpt_neox_in_global_order(tmp_path, capsys):
    docs = make_docs(120, 0)
    prefix = tmp_path / "corpus_text_document"
    write(prefix, docs)
    cfg = tmp_path / "run.yml"
    cfg.write_text(
        f"data_path: {prefix}\nsplit: '90,8,2'\nseq_length: {SEQ}\nseed: 4321\n"
        "train_iters: 25\ntrain_micro_batch_size_per_gpu: 3\ngradient_accumulation_steps: 2\n"
        "eval_interval: 10\neval_iters: 2\n"
    )
    train_docs = list(range(0, 108))  # round(0.9*120)=108, upstream's split rounding
    num_samples = 25 * 6
    code, out, err = run_samples(capsys, cfg, "--json", "--start", 0, "--count", 400)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["position"] for r in records] == list(range(400))
    want, length = reference_stream(docs, train_docs, num_samples, SEQ, 4321, 3, range(400))
    assert length < 400 and length % 3  # the stream wraps, dropping an incomplete last batch
    assert [r["text"] for r in records] == want
    assert all(len(r["text"]) == SEQ + 1 for r in records)
    assert records[-1]["index"] < records[-1]["position"]  # 400 samples run past the stream: it wrapped
    assert records[7]["iteration"] == 2 and records[7]["dp_rank"] == 0 and records[7]["micro_batch"] == 2
    # A window further on (past the end of the stream: it wraps) and with two data-parallel ranks.
    code, out, _ = run_samples(capsys, cfg, "--json", "--start", 95, "--count", 20, "--world-size", 2)
    records = [json.loads(line) for line in out.splitlines()]
    want, _ = reference_stream(docs, train_docs, 2 * num_samples, SEQ, 4321, 6, range(95, 115))
    assert [r["text"] for r in records] == want
    assert [r["dp_rank"] for r in records[:5]] == [1, 0, 0, 0, 1]  # 95 = batch 15 row 5; rank 1 has rows 3-5
    # The validation split uses its own document range and its own index maps.
    code, out, _ = run_samples(capsys, cfg, "--json", "--split", "valid", "--count", 6)
    records = [json.loads(line) for line in out.splitlines()]
    want, _ = reference_stream(docs, list(range(108, 118)), (25 // 10 + 1) * 2 * 6, SEQ, 4321, 3, range(6))
    assert [r["text"] for r in records] == want


def test_other_seed_other_samples_same_seed_same(tmp_path, capsys):
    docs = make_docs(50, 1)
    prefix = tmp_path / "c_text_document"
    write(prefix, docs)
    cfg = tmp_path / "run.yml"
    cfg.write_text(f"data_path: {prefix}\nseq_length: {SEQ}\ntrain_iters: 5\ntrain_micro_batch_size_per_gpu: 2\n")
    runs = [run_samples(capsys, cfg, "--json", "--count", 8, "--set", f"seed={s}")[1] for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_labels_are_shown_and_text_output(tmp_path, capsys, tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?"] * 10
    docs = [tok.encode(t).ids for t in texts]
    labels = [[-100] * (len(d) // 2) + d[len(d) // 2 :] for d in docs]
    write(tmp_path / "sft_messages_document", docs, np.int32)
    write(tmp_path / "sft_messages_label_document", labels, np.int32)
    cfg = tmp_path / "sft.yml"
    cfg.write_text(
        f"train_data_paths: ['{tmp_path / 'sft_messages_document'}']\n"
        f"train_label_data_paths: ['{tmp_path / 'sft_messages_label_document'}']\n"
        f"valid_data_paths: ['{tmp_path / 'sft_messages_document'}']\n"
        f"test_data_paths: ['{tmp_path / 'sft_messages_document'}']\n"
        f"seq_length: 16\ntrain_iters: 4\ntrain_micro_batch_size_per_gpu: 1\n"
        f"tokenizer_type: HFTokenizer\nvocab_file: {tiny_tokenizer_dir / 'tokenizer.json'}\n"
    )
    code, out, err = run_samples(capsys, cfg, "--json", "--count", 3, "--decode")
    assert code == 0, err
    for r in map(json.loads, out.splitlines()):
        assert len(r["label"]) == 17 and len(r["text"]) == 17
        assert all(lab in (-100, t) for lab, t in zip(r["label"], r["text"]))
        assert r["source"].endswith("sft_messages_document") and isinstance(r["decoded"], str)
    code, out, _ = run_samples(capsys, cfg, "--count", 2)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("sample 0 (iteration 1, micro-batch 0, dp rank 0) <- ")
    assert lines[1].split()[0] == "tokens" and lines[1].split()[1].startswith("[")
    assert lines[2].split()[0] == "labels" and lines[3].startswith("sample 1 ")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("seq_length: 8\ntrain_iters: 3\n", "no training data"),
        ("data_path: {missing}\nseq_length: 8\ntrain_iters: 3\n", "not found"),
        ("data_path: {prefix}\nseq_length: 8\n", "draws no train samples"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, yaml_text, message):
    write(tmp_path / "x_text_document", make_docs(10, 2))
    cfg = tmp_path / "bad.yml"
    cfg.write_text(yaml_text.format(missing=tmp_path / "nope_text_document", prefix=tmp_path / "x_text_document"))
    code, out, err = run_samples(capsys, cfg)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_preference_pairs_show_both_sides(tmp_path, capsys):
    chosen = [[1, 2, 3, 10 + k] for k in range(12)]
    rejected = [[1, 2, 3, 50 + k, 60 + k] for k in range(12)]
    write(tmp_path / "pos_document", chosen, np.int32)
    write(tmp_path / "neg_document", rejected, np.int32)
    cfg = tmp_path / "dpo.yml"
    cfg.write_text(
        f"dataset_impl: pairwise\npack_impl: unpacked\ntrain_impl: dpo\n"
        f"pos_train_data_paths: ['{tmp_path / 'pos_document'}']\nneg_train_data_paths: ['{tmp_path / 'neg_document'}']\n"
        "seq_length: 8\ntrain_iters: 3\ntrain_micro_batch_size_per_gpu: 2\n"
    )
    code, out, err = run_samples(capsys, cfg, "--json", "--count", 6)
    assert code == 0, err
    for r in map(json.loads, out.splitlines()):
        k = r["pos"][3] - 10
        assert r["pos"] == chosen[k] + [1] + [0] * 4  # the document, upstream's carried token, padding
        assert r["neg"][:5] == rejected[k]
