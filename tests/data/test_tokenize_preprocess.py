"""`neoxt preprocess`: every input format round-trips, in order, with 1 and 2 workers; bad input fails cleanly."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from neoxt.cli import main
from neoxt.config.schema import TokenizerConfig
from neoxt.data.indexed import IndexedDataset
from neoxt.data.tokenize import preprocess
from neoxt.errors import DataError
from neoxt.tokenizer import load_tokenizer

TEXTS = [
    f"Document {i}: " + " ".join(["The quick brown fox jumps over the lazy dog."] * (i % 5 + 1)) + f" #{i}"
    for i in range(37)
] + ["Ünïcödé ✓ and emoji 🦊 survive the round trip.", "  leading and trailing spaces  "]


def write_jsonl(path: Path, rows: list[dict], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def make_input(kind: str, tmp: Path, texts: list[str]) -> str:
    rows = [{"text": t, "meta": {"i": i}} for i, t in enumerate(texts)]
    if kind == "jsonl":
        return str(write_jsonl(tmp / "in.jsonl", rows))
    if kind == "jsonl.gz":
        return str(write_jsonl(tmp / "in.jsonl.gz", rows, gzip.open))
    if kind == "jsonl.zst":
        import zstandard

        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
        half = raw.index(b"\n", len(raw) // 2) + 1  # two frames back to back, as archives often are
        comp = zstandard.ZstdCompressor()
        (tmp / "in.jsonl.zst").write_bytes(comp.compress(raw[:half]) + comp.compress(raw[half:]))
        return str(tmp / "in.jsonl.zst")
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), tmp / "in.parquet",
                       row_group_size=7)
        return str(tmp / "in.parquet")
    if kind == "hf_disk":
        import datasets

        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp / "hfds"))
        return str(tmp / "hfds")
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def tok_cfg(tiny_tokenizer_dir) -> TokenizerConfig:
    return TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(tiny_tokenizer_dir / "tokenizer.json"))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf_disk"])
def test_round_trip_in_order_for_1_and_2_workers(tmp_path, tok_cfg, kind):
    src = make_input(kind, tmp_path, TEXTS)
    tok = load_tokenizer(tok_cfg)
    outputs = []
    for workers in (1, 2):
        res = preprocess(src, str(tmp_path / f"w{workers}"), tok_cfg, append_eod=True, workers=workers,
                         batch_size=4)
        ds = IndexedDataset(res.outputs["text"])
        assert ds.dtype == np.uint16  # vocab 320 < 65500
        assert len(ds) == ds.num_documents == len(TEXTS) == res.stats.documents
        for i, text in enumerate(TEXTS):
            assert tok.decode(ds[i]) == text + "<|endoftext|>"
            assert ds[i][-1] == tok.eod_id
        outputs.append(Path(res.outputs["text"] + ".bin").read_bytes())
        assert res.stats.tokens["text"] == ds.num_tokens
    assert outputs[0] == outputs[1]  # 2 workers write exactly what 1 worker writes


def test_ids_match_upstream_tokenizer_and_no_eod_without_flag(tmp_path, tok_cfg, tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    upstream = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))  # upstream HFTokenizer
    res = preprocess(make_input("jsonl", tmp_path, TEXTS), str(tmp_path / "o"), tok_cfg)
    ds = IndexedDataset(res.outputs["text"])
    for i, text in enumerate(TEXTS):
        assert ds[i].tolist() == upstream.encode(text).ids
    assert Path(res.outputs["text"] + ".bin").exists()
    assert res.outputs["text"] == str(tmp_path / "o_text_document")


def test_several_keys_globs_and_comma_lists(tmp_path, tok_cfg):
    tok = load_tokenizer(tok_cfg)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha one", "title": "A"}, {"text": "alpha two", "title": "B"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "beta", "title": "C"}])
    write_jsonl(tmp_path / "c.jsonl", [{"text": "gamma", "title": "D"}])
    res = preprocess([str(tmp_path / "[ab].jsonl"), str(tmp_path / "c.jsonl")], str(tmp_path / "o"),
                     tok_cfg, keys=["text", "title"])
    texts = [tok.decode(d) for d in IndexedDataset(res.outputs["text"])]
    titles = [tok.decode(d) for d in IndexedDataset(res.outputs["title"])]
    assert texts == ["alpha one", "alpha two", "beta", "gamma"]
    assert titles == ["A", "B", "C", "D"]
    res2 = preprocess(f"{tmp_path / 'c.jsonl'},{tmp_path / 'a.jsonl'}", str(tmp_path / "p"), tok_cfg)
    assert [tok.decode(d) for d in IndexedDataset(res2.outputs["text"])] == ["gamma", "alpha one", "alpha two"]


def test_empty_documents_are_dropped_and_counted(tmp_path, tok_cfg):
    tok = load_tokenizer(tok_cfg)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two"}])
    with open(src, "a") as f:
        f.write("\n   \n")  # blank lines are not records
    res = preprocess(str(src), str(tmp_path / "o"), tok_cfg, workers=1)
    assert res.stats.dropped_empty == 1 and res.stats.documents == 2
    assert [tok.decode(d) for d in IndexedDataset(res.outputs["text"])] == ["one", "two"]


def final_and_temp_files(tmp_path: Path, stem: str) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(stem))


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_json_names_file_and_line_and_leaves_nothing(tmp_path, tok_cfg, workers):
    src = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(40)]
    lines[30] = '{"text": "unterminated'
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:31: malformed JSON"):
        preprocess(str(src), str(tmp_path / "o"), tok_cfg, workers=workers, batch_size=4)
    assert final_and_temp_files(tmp_path, "o_") == []

    res = preprocess(str(src), str(tmp_path / "o"), tok_cfg, workers=workers, batch_size=4, skip_bad_lines=True)
    assert res.stats.skipped_bad == 1 and res.stats.documents == 39
    assert "bad.jsonl:31" in res.stats.first_bad[0]


def test_missing_key_and_wrong_type(tmp_path, tok_cfg):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"body": "no text key"}])
    with pytest.raises(DataError, match=r"in\.jsonl:2: missing key 'text' \(keys: body\)"):
        preprocess(str(src), str(tmp_path / "o"), tok_cfg)
    src2 = write_jsonl(tmp_path / "in2.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"in2\.jsonl:1: key 'text' holds int"):
        preprocess(str(src2), str(tmp_path / "o"), tok_cfg)
    src3 = write_jsonl(tmp_path / "in3.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="no documents to write"):
        preprocess(str(src3), str(tmp_path / "o"), tok_cfg)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text' \(columns: body\)"):
        preprocess(str(tmp_path / "t.parquet"), str(tmp_path / "o"), tok_cfg)
    (tmp_path / "array.json").write_text('[\n  {"text": "a"}\n]\n')
    with pytest.raises(DataError, match=r"array\.json:1: malformed JSON .*one JSON array"):
        preprocess(str(tmp_path / "array.json"), str(tmp_path / "o"), tok_cfg)
    assert final_and_temp_files(tmp_path, "o_") == []


def test_interrupted_run_leaves_no_output(tmp_path, tok_cfg, monkeypatch):
    """An exception half-way through the stream (Ctrl-C here) discards everything written so far."""
    import neoxt.data.tokenize as tokenize_mod

    real = tokenize_mod.iter_batches

    def interrupted(*args, **kwargs):
        for n, batch in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(tokenize_mod, "iter_batches", interrupted)
    src = make_input("jsonl", tmp_path, TEXTS)
    # a previous complete dataset under the same name must survive untouched
    (tmp_path / "o_text_document.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        preprocess(src, str(tmp_path / "o"), tok_cfg, batch_size=4)
    assert final_and_temp_files(tmp_path, "o_") == ["o_text_document.bin"]
    assert (tmp_path / "o_text_document.bin").read_bytes() == b"old"


def test_unreadable_inputs(tmp_path, tok_cfg):
    with pytest.raises(DataError, match=r"nope\.jsonl: input file not found"):
        preprocess(str(tmp_path / "nope.jsonl"), str(tmp_path / "o"), tok_cfg)
    with pytest.raises(DataError, match="no input file matches"):
        preprocess(str(tmp_path / "*.jsonl"), str(tmp_path / "o"), tok_cfg)
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"x\.jsonl\.gz: cannot read"):
        preprocess(str(tmp_path / "x.jsonl.gz"), str(tmp_path / "o"), tok_cfg)
    assert final_and_temp_files(tmp_path, "o_") == []


def test_cli_preprocess_and_inspect(tmp_path, tiny_tokenizer_dir, capsys):
    src = make_input("jsonl", tmp_path, TEXTS[:5])
    rc = main(["preprocess", "--input", src, "--output-prefix", str(tmp_path / "cli"),
               "--tokenizer-type", "HFTokenizer", "--vocab-file", str(tiny_tokenizer_dir / "tokenizer.json"),
               "--append-eod", "--dataset-impl", "mmap", "--workers", "1", "--log-interval", "10"])
    out = capsys.readouterr().out
    assert rc == 0 and "5 documents" in out and "tokens/s" in out
    assert f'"train_data_paths": ["{tmp_path / "cli_text_document"}"],' in out.splitlines()
    rc = main(["data", "inspect", str(tmp_path / "cli_text_document"), "--doc", "2",
               "--tokenizer", str(tiny_tokenizer_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "documents  5 (5 items)" in out and "uint16 (code 8)" in out
    assert TEXTS[2] + "<|endoftext|>" in out

    # user errors: one line on stderr, exit code 2, nothing written
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    rc = main(["preprocess", "--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "bad"),
               "--tokenizer-type", "HFTokenizer", "--vocab-file", str(tiny_tokenizer_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2: malformed JSON" in err and err.count("\n") == 1
    assert final_and_temp_files(tmp_path, "bad_") == []
    rc = main(["data", "inspect", str(tmp_path / "missing")])
    assert rc == 2 and "missing.idx: indexed dataset file not found" in capsys.readouterr().err


def test_streams_with_bounded_lookahead(tmp_path, tok_cfg, monkeypatch):
    """The reader never runs more than a few batches ahead of the writer, however long the input."""
    import neoxt.data.tokenize as tokenize_mod
    from neoxt.data.indexed import IndexedDatasetWriter

    read = {"n": 0}
    written = {"n": 0}
    lookahead = []
    real_batches, real_add = tokenize_mod.iter_batches, IndexedDatasetWriter.add_documents

    def counting_batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            read["n"] += 1
            lookahead.append(read["n"] - written["n"])
            yield batch

    def counting_add(self, tokens, lengths):
        written["n"] += 1
        return real_add(self, tokens, lengths)

    monkeypatch.setattr(tokenize_mod, "iter_batches", counting_batches)
    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", counting_add)
    src = write_jsonl(tmp_path / "long.jsonl", [{"text": f"doc {i}"} for i in range(400)])
    res = preprocess(str(src), str(tmp_path / "o"), tok_cfg, workers=2, batch_size=2)
    assert res.stats.documents == 400 and written["n"] == 200
    assert max(lookahead) <= 2 * 2 + 2


def test_text_files_and_null_cells(tmp_path, tok_cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = load_tokenizer(tok_cfg)
    (tmp_path / "a.txt").write_text("A whole file\nis one document.\n")
    pq.write_table(pa.table({"text": ["x", None, "y"]}), tmp_path / "n.parquet")
    res = preprocess([str(tmp_path / "a.txt"), str(tmp_path / "n.parquet")], str(tmp_path / "o"), tok_cfg)
    assert [tok.decode(d) for d in IndexedDataset(res.outputs["text"])] == [
        "A whole file\nis one document.\n", "x", "y"]
    assert res.stats.dropped_empty == 1


def test_jsonl_batches_cut_by_bytes_keep_line_numbers(tmp_path, monkeypatch):
    import neoxt.data.readers as readers

    monkeypatch.setattr(readers, "MAX_BATCH_BYTES", 100)
    src = write_jsonl(tmp_path / "b.jsonl", [{"text": "x" * n} for n in (10, 200, 5, 5, 5, 300, 1)])
    batches = list(readers.iter_batches([str(src)], ["text"], batch_size=4))
    assert [len(b.payloads) for b in batches] == [2, 4, 1]
    locations = [b.location(i) for b in batches for i in range(len(b.payloads))]
    assert locations == [f"{src}:{n}" for n in range(1, 8)]


def test_progress_logs_one_line_per_interval_off_a_terminal(capsys):
    from neoxt.data.tokenize import Progress

    p = Progress(None, "preprocess", every_s=0.0)
    p.update(10, 1000, 4000)
    p.close()
    err = capsys.readouterr().err
    assert err.startswith("preprocess: 10 documents, 1,000 tokens (") and "tokens/s" in err
    p = Progress(None, "preprocess", every_s=3600.0)
    p.update(10, 1000, 4000)
    assert capsys.readouterr().err == ""  # at most one line per interval


def test_ftfy_is_applied_or_asked_for(tmp_path, tok_cfg, monkeypatch):
    import sys
    import types

    tok = load_tokenizer(tok_cfg)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}, {"text": "world"}])
    monkeypatch.setitem(sys.modules, "ftfy", None)  # not installed
    with pytest.raises(DataError, match="pip install ftfy"):
        preprocess(str(src), str(tmp_path / "o"), tok_cfg, ftfy=True)
    assert final_and_temp_files(tmp_path, "o_") == []
    monkeypatch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=str.upper))
    res = preprocess(str(src), str(tmp_path / "o"), tok_cfg, ftfy=True)
    assert [tok.decode(d) for d in IndexedDataset(res.outputs["text"])] == ["HELLO", "WORLD"]


def test_hub_name_is_tried_through_datasets_and_fails_cleanly_offline(tmp_path, tok_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="someorg/somedata: cannot load Hub dataset"):
        preprocess("someorg/somedata", str(tmp_path / "o"), tok_cfg)
    assert final_and_temp_files(tmp_path, "o_") == []


def test_large_vocabulary_writes_int32(tmp_path):
    """A vocabulary of 65500 or more ids needs int32 files (upstream's best_fitting_dtype)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    cfg = TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(tmp_path / "big.json"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "w1 w65535 w69999"}, {"text": "w70000"}])
    res = preprocess(str(src), str(tmp_path / "o"), cfg, append_eod=True)
    ds = IndexedDataset(res.outputs["text"])
    assert res.dtype == ds.dtype == np.int32
    assert [d.tolist() for d in ds] == [[1, 65535, 69999, 0], [0, 0]]  # w70000 is unknown -> unk (0)
