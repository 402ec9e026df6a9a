"""Issue 12, "Why" item 8: config values the model or loop cannot use are one line naming the key and
file, exit 2, no traceback (before: ZeroDivisionError, an error blaming rotary_pct, NaN training)."""

from __future__ import annotations

import json

import pytest

from neoxt.cli import main

BASE = ("num_layers: 2\nhidden_size: 32\nnum_attention_heads: 4\nseq_length: 16\n"
        "max_position_embeddings: 32\ntrain_iters: 10\n")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("line, named", [
    ("num_attention_heads: 0", "num_attention_heads = 0 must be at least 1"),
    ("num_kv_heads: 0", "num_kv_heads = 0 must be at least 1"),
    ("hidden_size: -8", "hidden_size = -8 must be at least 1"),
    ("hidden_size: 0", "hidden_size = 0 must be at least 1"),
    ("hidden_size: 1e30", "hidden_size = 1e+30 must be at most"),
    ("train_iters: 1e18", "train_iters = 1e+18 must be at most"),
    ("rotary_pct: 5.0", "rotary_pct = 5.0 must be at most 1"),
    ("lr: .nan", "lr = nan is not a number"),
    ("optimizer: {type: Adam, params: {lr: .nan}}", "optimizer.params.lr = nan is not a number"),
    ("hidden_dropout: 1.5", "hidden_dropout = 1.5 must be at most"),
])
def test_out_of_range_values_name_key_and_file(tmp_path, capsys, line, named):
    cfg = tmp_path / "bad.yml"
    key = line.split(":", 1)[0]
    cfg.write_text("".join(ln + "\n" for ln in BASE.splitlines() if not ln.startswith(key + ":")) + line + "\n")
    assert main(["config", str(cfg)]) == 2
    msg = _one_line(capsys)
    assert named in msg and str(cfg) in msg, msg


def test_non_utf8_config_file_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "latin1.yml"
    cfg.write_bytes(BASE.encode() + "# caf\xe9\n".encode("latin-1"))
    assert main(["config", str(cfg)]) == 2
    msg = _one_line(capsys)
    assert f"{cfg}:7: not UTF-8 text (byte 0xe9" in msg, msg


def test_meta_json_with_a_non_integer_iteration_is_one_line(tmp_path, capsys):
    import torch

    from neoxt.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "run", 6, {"model": {"w": torch.zeros(2)}}, "")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["iteration"] = "six"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "checksums.sha256").unlink()  # a hand edit, not corruption: the value itself is checked
    assert main(["convert", "inspect", str(tmp_path / "run")]) == 2
    msg = capsys.readouterr().err.strip()
    assert msg == f"neoxt: {ckpt / 'meta.json'}: 'iteration' must be a non-negative integer, found 'six'"
