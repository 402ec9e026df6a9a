"""Token ids outside the vocabulary: one line naming file, document, id and size — at open, not mid-run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import neoxt.data.token_check as token_check
from neoxt.cli import main
from neoxt.data.indexed import IndexedDataset, IndexedDatasetWriter
from neoxt.data.token_check import check_token_ids, token_range
from neoxt.errors import DataError

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "src" / "neoxt" / "data" / "corpus" / "tokenizer.json"


def _write(prefix, docs, dtype=np.uint16) -> IndexedDataset:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(prefix)


def test_id_past_the_vocabulary_names_file_document_id_and_size(tmp_path):
    ds = _write(tmp_path / "d", [[1, 2, 3], [4, 5], [6, 700, 8], [900]])
    with pytest.raises(DataError) as info:
        check_token_ids(ds, 512)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'd'}.bin: document 2 holds token id 700")
    assert "vocabulary of 512 ids" in msg
    check_token_ids(ds, 901)  # everything fits a larger vocabulary


def test_negative_ids_fail_in_token_files_but_minus_100_is_fine_in_label_files(tmp_path):
    tokens = _write(tmp_path / "t", [[1, 2], [3, -5]], np.int32)
    with pytest.raises(DataError, match="document 1 holds token id -5"):
        check_token_ids(tokens, 512)
    labels = _write(tmp_path / "l_label_document", [[-100, 2], [3, -100]], np.int32)
    check_token_ids(labels, 512, labels=True)
    bad = _write(tmp_path / "b_label_document", [[-100, 2], [3, 600]], np.int32)
    with pytest.raises(DataError, match="document 1 holds label 600"):
        check_token_ids(bad, 512, labels=True)


def test_range_is_cached_per_file_version(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = _write(tmp_path / "d", [[1, 2, 3], [40]])
    assert token_range(ds, str(cache)) == (1, 40)
    assert len(os.listdir(cache)) == 1

    def no_scan(ds):
        raise AssertionError("scanned again although the file did not change")

    monkeypatch.setattr(token_check, "scan_token_range", no_scan)
    assert token_range(IndexedDataset(tmp_path / "d"), str(cache)) == (1, 40)
    check_token_ids(IndexedDataset(tmp_path / "d"), 41, str(cache))
    monkeypatch.undo()
    ds = _write(tmp_path / "d", [[1, 2, 3], [400]])  # rewritten: another size, so scanned again
    assert token_range(ds, str(cache)) == (1, 400)


def test_sidecar_beside_the_data_is_skipped_when_it_cannot_be_written(tmp_path, monkeypatch):
    ds = _write(tmp_path / "d", [[1, 2]])

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(token_check, "write_text_atomic", refuse)
    assert token_range(ds) == (1, 2)


def test_scan_of_an_unusual_layout_reads_item_by_item(tmp_path):
    from neoxt.data.merge import merge_datasets

    _write(tmp_path / "a", [[1, 2]])
    _write(tmp_path / "b", [[3, 999]])
    merge_datasets(str(tmp_path / "m"), [str(tmp_path / "a"), str(tmp_path / "b")])
    with open(tmp_path / "m.bin", "ab") as f:  # bytes past the items: not tokens, so never reported
        f.write(np.array([60000], dtype=np.uint16).tobytes())
    ds = IndexedDataset(tmp_path / "m")
    assert token_range(ds) == (1, 999)


def test_data_inspect_warns_about_ids_outside_the_vocabulary(tmp_path, capsys):
    _write(tmp_path / "d", [[1, 2], [3, 700]])
    assert main(["data", "inspect", str(tmp_path / "d"), "--vocab-size", "512"]) == 0
    out = capsys.readouterr().out
    assert "token ids  min 1 / max 700 (vocabulary 512)" in out
    assert "warning: " in out and "document 1 holds token id 700" in out
    assert main(["data", "inspect", str(tmp_path / "d"), "--vocab-size", "1024"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_build_loader_checks_the_vocabulary(tmp_path):
    from neoxt.config import load_config
    from neoxt.data.loader import build_loader

    _write(tmp_path / "d", [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3, [5, 600, 7] * 10])
    cfg_path = tmp_path / "c.yml"
    cfg_path.write_text(yaml.safe_dump({
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 8, "train_iters": 2,
        "train_micro_batch_size_per_gpu": 2, "train_data_paths": [str(tmp_path / "d")],
        "tokenizer_type": "CharLevelTokenizer", "index_cache_dir": str(tmp_path / "cache"), "eval_iters": 0,
    }))
    cfg = load_config([cfg_path])
    assert build_loader(cfg, "train", vocab_size=601) is not None
    with pytest.raises(DataError, match="document 1 holds token id 600, outside the vocabulary of 512"):
        build_loader(cfg, "train", vocab_size=512)


def test_neoxt_train_on_ids_past_the_vocabulary_exits_2_in_one_line(tmp_path):
    from neoxt.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(TOKENIZER)).vocab_size
    padded = -(-vocab // 128) * 128
    prefix = tmp_path / "bad_text_document"
    _write(prefix, [list(range(1, 40)), [3, 4, padded + 5, 6] * 10, list(range(5, 50))])
    cfg = {
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "max_position_embeddings": 64, "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}},
        "train_micro_batch_size_per_gpu": 2, "train_iters": 2, "tokenizer_type": "HFTokenizer",
        "vocab_file": str(TOKENIZER), "save": str(tmp_path / "run"), "eval_interval": 100, "eval_iters": 0,
        "train_data_paths": [str(prefix)], "index_cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-m", "neoxt.cli", "train", str(tmp_path / "c.yml")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("neoxt:")]
    assert errors == [f"neoxt: {prefix}.bin: document 1 holds token id {padded + 5}, outside the vocabulary of "
                      f"{padded} ids (0..{padded - 1}); was it tokenized with another tokenizer?"], out.stderr


def test_data_inspect_warns_when_the_bin_holds_more_than_its_index(tmp_path, capsys):
    _write(tmp_path / "d", [[1, 2], [3, 4]])
    assert main(["data", "inspect", str(tmp_path / "d")]) == 0
    assert "warning" not in capsys.readouterr().out
    _write(tmp_path / "other", [[1, 2], [3, 4], [5, 6, 7]])
    os.replace(tmp_path / "other.bin", tmp_path / "d.bin")  # another run's .bin beside this .idx
    assert main(["data", "inspect", str(tmp_path / "d")]) == 0
    assert "has 14 bytes but its index describes 8; the .bin and .idx may come from different runs" in (
        capsys.readouterr().out)


def test_data_inspect_takes_the_vocabulary_from_a_config(tmp_path, capsys):
    _write(tmp_path / "d", [[1, 2, 600]])
    (tmp_path / "c.yml").write_text(yaml.safe_dump({"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                                     "seq_length": 8, "tokenizer_type": "CharLevelTokenizer"}))
    assert main(["data", "inspect", str(tmp_path / "d"), "--config", str(tmp_path / "c.yml")]) == 0
    out = capsys.readouterr().out
    assert "(vocabulary 512)" in out and "document 0 holds token id 600" in out  # CharLevel: 512, padded to 128s
