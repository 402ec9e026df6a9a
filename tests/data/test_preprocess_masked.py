"""``neoxt preprocess-masked``: byte-identical to upstream's preprocess_data_with_mask.py on files its
script wrote (tests/data/fixtures/upstream_mask/README.md says how), and the loader masks exactly the
prompt tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neoxt.cli import main
from neoxt.config import config_from_dict
from neoxt.data.indexed import IndexedDataset
from neoxt.data.loader import build_loader
from neoxt.data.masked import mask_before
from neoxt.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "upstream_mask"
TOKENIZER = Path(__file__).resolve().parents[2] / "src" / "neoxt" / "data" / "corpus" / "tokenizer.json"
DELIM = "457,84,88,292,27"  # " Answer:" in the demo tokenizer
TOK = ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(TOKENIZER)]


def pair(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


@pytest.mark.parametrize("variant,eod", [("masked_eod", ["--append-eod"]), ("masked_noeod", [])])
def test_byte_identical_to_upstream_script(tmp_path, variant, eod):
    out = tmp_path / variant
    assert main(["preprocess-masked", "--input", str(FIXTURES / "masked.jsonl"), "--output-prefix", str(out),
                 "--mask-before-token", DELIM, *TOK, *eod]) == 0
    for name in ("text", "label"):
        assert pair(f"{out}_{name}_document") == pair(FIXTURES / f"{variant}_{name}_document"), name


def test_mask_before_first_occurrence_only():
    assert mask_before([5, 1, 2, 7, 1, 2, 9], [1, 2]) == [-100, -100, -100, 7, 1, 2, 9]
    assert mask_before([5, 6], [1, 2]) == [5, 6]
    assert mask_before([1, 1, 2], [1, 2]) == [-100, -100, -100]


def prompt_end(tok, ids: list[int]) -> int:
    """Independent of the mask code: the shortest prefix whose text ends the first ' Answer:' (0 if none)."""
    for j in range(1, len(ids) + 1):
        if tok.decode(ids[:j]).endswith(" Answer:"):
            return j
    return 0


def test_loader_labels_are_minus_100_exactly_on_prompt_tokens(tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    text = IndexedDataset(FIXTURES / "masked_eod_text_document")
    docs = [text[i].tolist() for i in range(len(text))]
    cfg = config_from_dict({
        "seq_length": max(map(len, docs)) + 1, "train_iters": 7, "train_micro_batch_size_per_gpu": 4,
        "eval_interval": 100, "eval_iters": 0, "seed": 1, "pack_impl": "unpacked",
        "index_cache_dir": str(tmp_path / "cache"),
        "train_data_paths": [str(FIXTURES / "masked_eod_text_document")],
        "train_label_data_paths": [str(FIXTURES / "masked_eod_label_document")],
        "valid_data_paths": [str(FIXTURES / "masked_eod_text_document")],
        "test_data_paths": [str(FIXTURES / "masked_eod_text_document")],
    }, world_size=1)
    loader = build_loader(cfg, "train", eod_id=0)
    seen_masked = seen_unmasked_doc = 0
    for _ in range(7):
        batch = next(loader)
        raw = loader.samples(batch.sample_indices)
        for row_text, row_label, row_mask in zip(raw["text"], raw["label"], batch.loss_mask.numpy()):
            doc = next(d for d in docs if row_text[: len(d)].tolist() == d)
            end = prompt_end(tok, doc)
            masked = row_label[: len(doc)] == -100
            assert masked.tolist() == [j < end for j in range(len(doc))]
            assert np.array_equal(row_label[: len(doc)][~masked], row_text[: len(doc)][~masked])
            assert row_mask[: len(doc) - 1].tolist() == [float(j + 1 >= end) for j in range(len(doc) - 1)]
            seen_masked += end > 0
            seen_unmasked_doc += end == 0
    assert seen_masked and seen_unmasked_doc  # both kinds of document went through the loader


def test_prompt_completion_records_mask_exactly_the_prompt(tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    recs = [{"prompt": f"Where did Tom go on day {i}?", "completion": f" Tom went home {i}."} for i in range(5)]
    src = tmp_path / "pc.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["preprocess-masked", "--input", str(src), "--output-prefix", str(tmp_path / "pc"),
                 "--prompt-key", "prompt", "--completion-key", "completion", "--append-eod", *TOK]) == 0
    text, label = IndexedDataset(tmp_path / "pc_text_document"), IndexedDataset(tmp_path / "pc_label_document")
    for i, r in enumerate(recs):
        p, c = tok.encode(r["prompt"]).ids, tok.encode(r["completion"]).ids
        assert text[i].tolist() == p + c + [0]
        assert label[i].tolist() == [-100] * len(p) + c + [0]


def test_bad_flags_and_records_are_one_line_errors(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "Question: a? Answer: b"}\n{"txt": "oops"}\n')
    out = tmp_path / "o"
    assert main(["preprocess-masked", "--input", str(src), "--output-prefix", str(out), *TOK,
                 "--mask-before-token", DELIM]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:2" in err and "missing key 'text'" in err
    assert list(tmp_path.iterdir()) == [src]  # nothing half-written
    assert main(["preprocess-masked", "--input", str(src), "--output-prefix", str(out), *TOK,
                 "--mask-before-token", "1,x"]) == 2
    assert "comma-separated token ids" in capsys.readouterr().err
    assert main(["preprocess-masked", "--input", str(src), "--output-prefix", str(out), *TOK]) == 2
    assert "exactly one of --mask-before-token" in capsys.readouterr().err


def test_needs_exactly_one_way_to_mask(tmp_path):
    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.masked import preprocess_masked

    cfg = TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(TOKENIZER))
    with pytest.raises(DataError, match="exactly one of"):
        preprocess_masked([str(FIXTURES / "masked.jsonl")], str(tmp_path / "x"), cfg)
    with pytest.raises(DataError, match="exactly one of"):
        preprocess_masked([str(FIXTURES / "masked.jsonl")], str(tmp_path / "x"), cfg, mask_before_tokens=[1],
                          mask_before_text=" Answer:")


def test_mask_before_text_is_the_same_as_its_token_ids(tmp_path):
    out = tmp_path / "t"
    assert main(["preprocess-masked", "--input", str(FIXTURES / "masked.jsonl"), "--output-prefix", str(out),
                 "--mask-before-text", " Answer:", "--append-eod", *TOK]) == 0
    assert pair(f"{out}_label_document") == pair(FIXTURES / "masked_eod_label_document")
