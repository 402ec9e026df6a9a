"""`neoxt prepare-hf` on local saved datasets: text and messages variants, count-only, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neoxt.cli import main
from neoxt.data.indexed import IndexedDataset
from neoxt.errors import DataError
from neoxt.tokenizer import load_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "", "Hello world! How are you today?",
         "Numbers like 12345 and 67890 appear in text as well."]
CHATS = [
    [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "Hi, how are you?"}],
    [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Numbers?"},
     {"role": "assistant", "content": "12345 and 67890."}],
]


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory) -> Path:
    import datasets

    root = tmp_path_factory.mktemp("hf")
    datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))}).save_to_disk(str(root / "texts"))
    datasets.Dataset.from_dict({"messages": CHATS, "score": [1, 0]}).save_to_disk(str(root / "chats"))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": ["train doc"]}),
        "validation": datasets.Dataset.from_dict({"body": ["valid doc one", "valid doc two"]}),
    }).save_to_disk(str(root / "dict"))
    return root


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["prepare-hf", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text_dataset_end_to_end(datasets_dir, tiny_tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, stdout, _ = run(["--dataset", str(datasets_dir / "texts"), "--vocab-file", str(tiny_tokenizer_dir),
                         "--output-dir", str(out_dir), "--num-proc", "2", "--tokenize-workers", "1"], capsys)
    assert rc == 0
    res = json.loads((out_dir / "pipeline_results.json").read_text())
    prefix = str(out_dir.resolve() / "texts_text_document")
    assert res["column"] == "text" and res["pipeline"] == "preprocess"
    assert res["rows"] == 4 and res["exported_rows"] == 4 and res["empty_documents"] == 1
    ds = IndexedDataset(prefix)
    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(tiny_tokenizer_dir))
    assert [tok.decode(d) for d in ds] == [t + "<|endoftext|>" for t in TEXTS if t]
    assert res["documents"] == {"counted": 3, "written": 3}
    assert res["tokens"] == {"counted": ds.num_tokens, "written": ds.num_tokens}
    assert res["paths"]["train_data_paths"] == [prefix]
    assert set(res["timings_s"]) >= {"load", "count", "export", "tokenize", "total"}
    line = f'"train_data_paths": ["{prefix}"],'
    assert line in stdout.splitlines() and res["config_lines"] == line
    exported = [json.loads(x) for x in Path(res["paths"]["jsonl"]).read_text().splitlines()]
    assert exported == [{"text": t} for t in TEXTS]
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "pipeline_results.json", "texts.jsonl", "texts_text_document.bin", "texts_text_document.idx"]


def test_messages_dataset_uses_chat_pipeline(datasets_dir, tiny_tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, stdout, _ = run(["--dataset", str(datasets_dir / "chats"), "--vocab-file", str(tiny_tokenizer_dir),
                         "--output-dir", str(out_dir)], capsys)
    assert rc == 0
    res = json.loads((out_dir / "pipeline_results.json").read_text())
    assert res["column"] == "messages" and res["pipeline"] == "preprocess-chat"
    tokens = IndexedDataset(res["paths"]["train_data_paths"][0])
    labels = IndexedDataset(res["paths"]["train_label_data_paths"][0])
    assert res["paths"]["train_label_data_paths"][0].endswith("chats_messages_label_document")
    assert len(tokens) == len(labels) == 2 and (tokens.sizes == labels.sizes).all()
    assert res["documents"] == {"counted": 2, "written": 2}
    assert res["tokens"] == {"counted": tokens.num_tokens, "written": tokens.num_tokens}
    assert '"train_label_data_paths": ["' in stdout
    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(tiny_tokenizer_dir))
    trained = [t for t in labels[0].tolist() if t != -100]
    assert tok.decode(trained) == "Hi, how are you?<|end|>\n<|endoftext|>"


def test_count_only_writes_counts_only(datasets_dir, tiny_tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, stdout, _ = run(["--dataset", str(datasets_dir / "texts"), "--vocab-file", str(tiny_tokenizer_dir),
                         "--output-dir", str(out_dir), "--count-only"], capsys)
    assert rc == 0
    assert [p.name for p in out_dir.iterdir()] == ["pipeline_results.json"]
    res = json.loads((out_dir / "pipeline_results.json").read_text())
    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(tiny_tokenizer_dir))
    assert res["tokens"] == {"counted": sum(len(tok.encode(t)) + 1 for t in TEXTS if t)}
    assert res["documents"] == {"counted": 3}
    assert "train_data_paths" not in stdout


def test_skip_count_skip_tokenize_split_and_key(datasets_dir, tiny_tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, _, _ = run(["--dataset", str(datasets_dir / "dict"), "--split", "validation", "--text-key", "body",
                    "--vocab-file", str(tiny_tokenizer_dir), "--output-dir", str(out_dir),
                    "--skip-count", "--skip-tokenize"], capsys)
    assert rc == 0
    res = json.loads((out_dir / "pipeline_results.json").read_text())
    assert "count" not in res["timings_s"] and "tokenize" not in res["timings_s"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["dict_validation.jsonl", "pipeline_results.json"]
    assert (out_dir / "dict_validation.jsonl").read_text().splitlines() == [
        '{"body": "valid doc one"}', '{"body": "valid doc two"}']


def test_errors(datasets_dir, tiny_tokenizer_dir, tmp_path, capsys):
    rc, _, err = run(["--dataset", str(datasets_dir / "dict"), "--vocab-file", str(tiny_tokenizer_dir),
                      "--output-dir", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no 'text' or 'messages' column (columns: body)" in err
    rc, _, err = run(["--dataset", str(datasets_dir / "dict"), "--split", "test", "--vocab-file",
                      str(tiny_tokenizer_dir), "--output-dir", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no split 'test' (splits: train, validation)" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError, match="not a dataset saved"):
        from neoxt.data.prepare_hf import PrepareOptions, prepare_hf

        (tmp_path / "empty").mkdir()
        prepare_hf(PrepareOptions(dataset=str(tmp_path / "empty"), tokenizer=str(tiny_tokenizer_dir),
                                  output_dir=str(tmp_path / "o2")))


def test_disk_full_while_exporting_is_one_line_and_leaves_nothing(datasets_dir, tiny_tokenizer_dir, tmp_path,
                                                                 capsys, monkeypatch):
    import builtins
    import errno

    import neoxt.io as io_mod  # prepare-hf streams its export through neoxt.io.atomic_open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "w" in mode and ".jsonl.tmp." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(io_mod, "open", full_disk_open, raising=False)
    out_dir = tmp_path / "out"
    rc, _, err = run(["--dataset", str(datasets_dir / "texts"), "--vocab-file", str(tiny_tokenizer_dir),
                      "--output-dir", str(out_dir), "--skip-count"], capsys)
    assert rc == 2
    assert err.strip().splitlines() == [f"neoxt: {out_dir.resolve() / 'texts.jsonl'}: cannot write (no space left on "
                                        "device); nothing was written under the final names"]
    assert list(out_dir.iterdir()) == []  # no temporary file, no lock


def test_second_prepare_hf_on_one_output_fails_at_once(datasets_dir, tiny_tokenizer_dir, tmp_path, capsys):
    from neoxt.data.outputs import claim_output

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with claim_output(out_dir / "texts"):  # as a running prepare-hf holds it
        rc, _, err = run(["--dataset", str(datasets_dir / "texts"), "--vocab-file", str(tiny_tokenizer_dir),
                          "--output-dir", str(out_dir)], capsys)
    assert rc == 2 and "another run is writing this output" in err and len(err.strip().splitlines()) == 1
    assert list(out_dir.iterdir()) == []
