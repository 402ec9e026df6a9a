"""``neoxt prepare-data``: upstream's corpus registry, resumable checksummed downloads from a local
server, extraction, and the same tokens as ``neoxt preprocess`` on the same text."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zipfile

import local_http
import pytest

from neoxt.cli import main
from neoxt.data.corpora import corpus_names, get_corpus
from neoxt.data.download import download, extract
from neoxt.errors import DataError


@pytest.fixture
def http_server():
    yield from local_http.serve()


TEXT = "".join(f"<page><title>Page {i}</title><text>The quick brown fox {i} jumps over the lazy dog. "
               f"A language model predicts the next token.</text></page>\n" for i in range(300))


def enwik8_zip(text: str = TEXT) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", text)
    return buf.getvalue()


def read_pair(prefix) -> tuple[bytes, bytes]:
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


def preprocess_reference(tmp_path, tokenizer_args: list[str]) -> tuple[bytes, bytes]:
    src = tmp_path / "ref" / "enwik8.txt"
    src.parent.mkdir()
    src.write_text(TEXT)
    assert main(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "ref" / "enwik8"),
                 "--append-eod", *tokenizer_args]) == 0
    return read_pair(tmp_path / "ref" / "enwik8_text_document")


def test_registry_keeps_upstreams_corpora_and_urls():
    names = corpus_names()
    for name in ("enwik8", "enron", "pile_subset", "pile", "github", "arxiv", "europarl", "freelaw", "nih",
                 "pubmed", "books1", "books3", "hackernews", "openwebtext2", "stackexchange", "ubuntu_irc",
                 "youtube_subtitles", "c4", "c4_openwebtext"):
        assert name in names
    assert get_corpus("enwik8").urls == ("http://mattmahoney.net/dc/enwik8.zip",)
    assert get_corpus("pile_subset").name == "pile_00"
    pile = get_corpus("pile").urls
    assert len(pile) == 30 and pile[7] == "https://the-eye.eu/public/AI/pile/train/07.jsonl.zst"
    c4 = get_corpus("c4").urls
    assert len(c4) == 1024 and c4[-1].endswith("c4-train.01023-of-01024.json.gz")
    assert get_corpus("enron").num_docs == 517401
    with pytest.raises(DataError, match="unknown corpus 'nope'"):
        get_corpus("nope")


def test_enwik8_from_mirror_equals_preprocess(tmp_path, http_server, tiny_tokenizer_dir, capsys):
    tok = ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(tiny_tokenizer_dir / "tokenizer.json")]
    http_server.files["/mirror/enwik8.zip"] = enwik8_zip()
    rc = main(["prepare-data", "enwik8", "-d", str(tmp_path / "data"), "--mirror", f"{http_server.url}/mirror/", *tok])
    assert rc == 0, capsys.readouterr().err
    assert read_pair(tmp_path / "data" / "enwik8" / "enwik8_text_document") == preprocess_reference(tmp_path, tok)
    assert (tmp_path / "data" / "enwik8" / "enwik8").read_text() == TEXT  # unpacked as upstream's layout
    assert http_server.requests == [("/mirror/enwik8.zip", None)]


def test_enwik8_from_url_equals_the_mirror_path(tmp_path, http_server, tiny_tokenizer_dir, capsys):
    tok = ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(tiny_tokenizer_dir / "tokenizer.json")]
    data = enwik8_zip()
    http_server.files.update({"/mirror/enwik8.zip": data, "/elsewhere/v2/enwik8.zip": data})
    assert main(["prepare-data", "enwik8", "-d", str(tmp_path / "m"), "--mirror", f"{http_server.url}/mirror/",
                 *tok]) == 0
    rc = main(["prepare-data", "enwik8", "-d", str(tmp_path / "u"), "--url", f"{http_server.url}/elsewhere/v2/enwik8.zip",
               "--sha256", hashlib.sha256(data).hexdigest(), *tok])
    assert rc == 0, capsys.readouterr().err
    got = read_pair(tmp_path / "u" / "enwik8" / "enwik8_text_document")
    assert got == read_pair(tmp_path / "m" / "enwik8" / "enwik8_text_document")
    assert got == preprocess_reference(tmp_path, tok)
    assert http_server.requests == [("/mirror/enwik8.zip", None), ("/elsewhere/v2/enwik8.zip", None)]


def gpt2_files(tokenizer_json) -> tuple[bytes, bytes]:
    """The tiny tokenizer as GPT-2's vocab.json + merges.txt."""
    model = json.loads(tokenizer_json.read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return json.dumps(model["vocab"]).encode(), ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()


def test_default_gpt2_tokenizer_files_come_from_the_mirror_too(tmp_path, http_server, tiny_tokenizer_dir, capsys):
    vocab, merges = gpt2_files(tiny_tokenizer_dir / "tokenizer.json")
    http_server.files.update({"/m/enwik8.zip": enwik8_zip(), "/m/gpt2-vocab.json": vocab, "/m/gpt2-merges.txt": merges})
    assert main(["prepare-data", "enwik8", "-d", str(tmp_path / "data"), "--mirror", f"{http_server.url}/m"]) == 0
    assert (tmp_path / "data" / "gpt2-vocab.json").read_bytes() == vocab
    ref = preprocess_reference(tmp_path, ["--tokenizer-type", "GPT2BPETokenizer",
                                          "--vocab-file", str(tmp_path / "data" / "gpt2-vocab.json"),
                                          "--merge-file", str(tmp_path / "data" / "gpt2-merges.txt")])
    assert read_pair(tmp_path / "data" / "enwik8" / "enwik8_text_document") == ref


def test_download_interrupted_halfway_resumes_with_a_range_request(tmp_path, http_server):
    data = enwik8_zip() * 3
    http_server.files["/f.zip"] = data
    http_server.cut_after["/f.zip"] = len(data) // 2
    out = download(f"{http_server.url}/f.zip", tmp_path / "f.zip", sha256=hashlib.sha256(data).hexdigest(),
                   backoff_s=0)
    assert out.read_bytes() == data
    assert http_server.requests == [("/f.zip", None), ("/f.zip", f"bytes={len(data) // 2}-")]
    assert not (tmp_path / "f.zip.part").exists()


def test_interrupted_run_keeps_only_the_part_file_and_the_next_run_resumes(tmp_path, http_server, tiny_tokenizer_dir,
                                                                            capsys):
    data = enwik8_zip()
    http_server.files["/enwik8.zip"] = data
    http_server.cut_after["/enwik8.zip"] = 1000
    tok = ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(tiny_tokenizer_dir / "tokenizer.json")]
    args = ["prepare-data", "enwik8", "-d", str(tmp_path / "data"), "--mirror", http_server.url, *tok]
    assert main([*args, "--retries", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted after 1000 bytes" in err and "run again to resume" in err
    folder = tmp_path / "data" / "enwik8"
    assert sorted(p.name for p in folder.iterdir()) == ["enwik8.zip.part"]
    assert main(args) == 0
    assert http_server.requests[-1] == ("/enwik8.zip", "bytes=1000-")
    assert (folder / "enwik8.zip").read_bytes() == data
    assert (folder / "enwik8_text_document.bin").exists()


def test_wrong_checksum_is_refused_in_one_line_and_nothing_is_kept(tmp_path, http_server, tiny_tokenizer_dir, capsys):
    http_server.files["/enwik8.zip"] = enwik8_zip()
    tok = ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(tiny_tokenizer_dir / "tokenizer.json")]
    rc = main(["prepare-data", "enwik8", "-d", str(tmp_path / "data"), "--mirror", http_server.url,
               "--sha256", "0" * 64, *tok])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if not line.startswith("enwik8.zip: ")]  # the download's progress line
    assert rc == 2 and len(errors) == 1 and "checksum mismatch" in errors[0] and "0" * 64 in errors[0]
    assert list((tmp_path / "data" / "enwik8").iterdir()) == []


def test_http_error_and_unreachable_server_are_one_line_errors(tmp_path, http_server):
    with pytest.raises(DataError, match="HTTP 404"):
        download(f"{http_server.url}/missing.zip", tmp_path / "x.zip")
    with pytest.raises(DataError, match="cannot connect"):
        download("http://127.0.0.1:9/x.zip", tmp_path / "y.zip", timeout=2)
    assert list(tmp_path.iterdir()) == []  # no empty .part left behind


def test_extract_tar_gz_gz_and_zst(tmp_path):
    import zstandard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, body in (("d/a.jsonl", b'{"text": "a"}\n'), ("d/b.txt", b"bee")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    (tmp_path / "x.tar.gz").write_bytes(buf.getvalue())
    files = extract(tmp_path / "x.tar.gz", tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in files] == ["d/a.jsonl", "d/b.txt"]
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"sea"))
    assert extract(tmp_path / "c.txt.gz", tmp_path / "out")[0].read_bytes() == b"sea"
    (tmp_path / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "e"}\n'))
    assert extract(tmp_path / "e.jsonl.zst", tmp_path / "out")[0].name == "e.jsonl"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".extract")]


def test_extract_refuses_members_outside_the_target(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DataError, match="outside"):
        extract(tmp_path / "evil.zip", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_jsonl_zst_corpus_is_read_as_it_is_and_matches_preprocess(tmp_path, http_server, tiny_tokenizer_dir):
    import zstandard

    records = "".join(json.dumps({"text": f"Email {i}: the quick brown fox."}) + "\n" for i in range(50))
    (tmp_path / "enron_emails.jsonl").write_text(records)
    http_server.files["/enron_emails.jsonl.zst"] = zstandard.ZstdCompressor().compress(records.encode())
    tok = ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(tiny_tokenizer_dir / "tokenizer.json")]
    assert main(["prepare-data", "enron", "-d", str(tmp_path / "data"), "--mirror", http_server.url, *tok,
                 "--workers", "1"]) == 0
    assert main(["preprocess", "--input", str(tmp_path / "enron_emails.jsonl"), "--output-prefix",
                 str(tmp_path / "ref"), "--append-eod", *tok]) == 0
    assert read_pair(tmp_path / "data" / "enron" / "enron_text_document") == read_pair(tmp_path / "ref_text_document")
    assert sorted(p.name for p in (tmp_path / "data" / "enron").iterdir()) == [
        "enron_emails.jsonl.zst", "enron_text_document.bin", "enron_text_document.idx"]


def test_progress_without_a_terminal_logs_rate_and_eta(capsys):
    from neoxt.progress import Progress

    with Progress(1000, "downloading", unit="B", every_s=0) as bar:
        bar.update(250)
    line = capsys.readouterr().err.strip()
    assert line.startswith("downloading:  25%") and "B/s" in line and "<" in line  # tqdm's "elapsed<eta"


def test_disk_full_while_downloading_is_one_line(tmp_path, http_server, monkeypatch):
    import errno

    import neoxt.data.download as download_mod
    from neoxt.errors import DataError

    http_server.files["/f.zip"] = enwik8_zip()

    def full_disk(url, part, timeout, desc):
        part.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_mod, "_fetch_once", full_disk)
    with pytest.raises(DataError) as info:
        download(f"{http_server.url}/f.zip", tmp_path / "f.zip", backoff_s=0)
    assert str(info.value) == (f"{tmp_path / 'f.zip.part'}: cannot write (no space left on device); nothing was "
                               "written under the final names")
    assert not (tmp_path / "f.zip").exists()
