"""Issue 12, acceptance 1: a checkpoint never runs code. Every command that reads a checkpoint is given
files whose pickles would create a marker file when unpickled (neoxt DCP ``.metadata`` and DCP values,
GPT-NeoX sequential and pipeline ``.pt``, a single ``.pt``, HF ``pytorch_model.bin``): no marker, one
error line naming the file and the class, exit 2. Real files of each kind still load, and
``--trust-checkpoint`` is the explicit way past the allowlist."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from test_neox_import import build_hf, hf_to_neox_shards, write_neox

from neoxt.checkpoint.integrity import write_manifest
from neoxt.cli import main

MARKER_NAME = "PWNED"
SCHEDULE = {"start_lr": 1e-3, "warmup_iter": 0.0, "num_iters": 3, "decay_style": "cosine", "end_iter": 2, "min_lr": 0.0}


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("neoxt:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _refused(argv: list[str], marker: Path, capsys, names: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    line = _error_line(capsys)
    assert not marker.exists(), f"{argv}: the payload ran"
    assert "refused to unpickle" in line and "open" in line.split("unpickle", 1)[1] and names in line, line
    return line


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_dir):
    """A good and a poisoned file of every kind, plus configs that point commands at them."""
    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_from_dict, config_to_yaml, with_overrides
    from neoxt.model import Transformer

    root = tmp_path_factory.mktemp("hostile")
    marker = root / MARKER_NAME
    cfg = config_from_dict({"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                            "max_position_embeddings": 32, "tokenizer_type": "HFTokenizer",
                            "vocab_file": str(tiny_tokenizer_dir / "tokenizer.json")})
    cfg = with_overrides(cfg, model={"padded_vocab_size": 384})
    torch.manual_seed(0)
    sd = Transformer(cfg.model).state_dict()
    good = save_checkpoint(root / "good", 3, {"model": sd, "scheduler": {"num_iters": 3}}, config_to_yaml(cfg))

    # .metadata: the real Metadata object carrying a payload (a plain unpickler would load it and go on).
    bad_md = save_checkpoint(root / "bad_md", 3, {"model": sd}, config_to_yaml(cfg))
    with open(bad_md / ".metadata", "rb") as f:
        md = pickle.load(f)
    md.planner_data = Payload(marker)
    (bad_md / ".metadata").write_bytes(pickle.dumps(md))
    write_manifest(bad_md)  # the author of a hostile file makes its checksums match too
    # A DCP non-tensor value (what resuming a run reads: schedule, RNG, data position).
    bad_value = save_checkpoint(root / "bad_value", 3, {"model": sd, "scheduler": {**SCHEDULE, "decay_style": Payload(marker)}},
                                config_to_yaml(cfg))

    hf = build_hf("llama")
    shards = hf_to_neox_shards(hf, "llama", 1)
    seq_good = write_neox(shards, root / "neox_seq", "sequential")
    seq_bad = write_neox(shards, root / "neox_seq_bad", "sequential")
    mp = seq_bad / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(mp, weights_only=False), "payload": Payload(marker)}, mp)
    pipe_good = write_neox(shards, root / "neox_pipe", "pipeline")
    pipe_bad = write_neox(shards, root / "neox_pipe_bad", "pipeline")
    layer = pipe_bad / "layer_03-model_00-model_states.pt"
    torch.save({**torch.load(layer), "payload": Payload(marker)}, layer)

    hf_bin = _hf_bin_dir(hf, root / "hf_bin", tiny_tokenizer_dir)
    hf_bad = _hf_bin_dir(hf, root / "hf_bad", tiny_tokenizer_dir, extra={"payload": Payload(marker)})

    single = root / "single.pt"
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, single)
    llama_yml = root / "llama.yml"
    llama_yml.write_text(yaml.safe_dump({
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "seq_length": 32,
        "max_position_embeddings": 64, "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-6, "pos_emb": "rotary",
        "activation": "swiglu", "intermediate_size": 96, "use_bias_in_attn_linear": False,
        "use_bias_in_mlp": False, "use_bias_in_norms": False, "no_weight_tying": True}))
    assert not marker.exists()
    return {"root": root, "marker": marker, "good": good, "bad_md": bad_md, "bad_value": bad_value,
            "seq_good": seq_good, "seq_bad": seq_bad, "pipe_good": pipe_good, "pipe_bad": pipe_bad,
            "hf_bin": hf_bin, "hf_bad": hf_bad, "single": single, "llama_yml": llama_yml, "cfg": cfg}


def test_dcp_metadata_payload_is_refused_by_every_command(world, tmp_path, capsys, corpus_dataset):
    bad, marker = world["bad_md"], world["marker"]
    name = str(bad / ".metadata")
    _refused(["convert", "inspect", str(bad)], marker, capsys, name)
    _refused(["generate", "--model", str(bad), "--device", "cpu", "--text-gen-type", "unconditional",
              "--num-samples", "1"], marker, capsys, name)
    _refused(["eval", "--model", str(bad), "--tasks", "tiny_mc", "--device", "cpu"], marker, capsys, name)
    _refused(["convert", "neoxt-to-hf", "--checkpoint", str(bad), "--output-dir", str(tmp_path / "hf")],
             marker, capsys, name)
    _refused(["convert", "neoxt-to-neox", "--checkpoint", str(bad), "--output-dir", str(tmp_path / "nx")],
             marker, capsys, name)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "nx").exists()
    for extra in ({"load": str(bad)}, {"load": str(bad), "finetune": True}):
        _refused(["train", str(_train_config(tmp_path, corpus_dataset, **extra))], marker, capsys, name)
        assert not any((tmp_path / "save").glob("*"))  # at most the (checked-writable) empty save dir


def test_dcp_value_payload_is_refused_on_resume(world, tmp_path, capsys, corpus_dataset):
    bad = world["bad_value"]
    _refused(["train", str(_train_config(tmp_path, corpus_dataset, load=str(bad)))], world["marker"], capsys,
             "scheduler.decay_style")


def test_gpt_neox_payloads_are_refused(world, tmp_path, capsys):
    marker = world["marker"]
    for step, name in ((world["seq_bad"], "mp_rank_00_model_states.pt"),
                       (world["pipe_bad"], "layer_03-model_00-model_states.pt")):
        _refused(["convert", "neox-to-neoxt", "--input-dir", str(step), "--config", str(world["llama_yml"]),
                  "--output-dir", str(tmp_path / "out")], marker, capsys, name)
        assert not (tmp_path / "out").exists()
    _refused(["convert", "inspect", str(world["seq_bad"])], marker, capsys, "mp_rank_00_model_states.pt")
    _refused(["convert", "inspect", str(world["seq_bad"] / "mp_rank_00_model_states.pt")], marker, capsys,
             "mp_rank_00_model_states.pt")
    _refused(["convert", "inspect", str(world["single"])], marker, capsys, "single.pt")


def test_hf_pytorch_model_bin_payload_is_refused(world, tmp_path, capsys, corpus_dataset):
    bad, marker = world["hf_bad"], world["marker"]
    name = "pytorch_model.bin"
    _refused(["convert", "inspect", str(bad)], marker, capsys, name)
    _refused(["convert", "hf-to-neoxt", "--hf-model", str(bad), "--output-dir", str(tmp_path / "o")], marker,
             capsys, name)
    _refused(["generate", "--model", str(bad), "--device", "cpu", "--text-gen-type", "unconditional",
              "--num-samples", "1"], marker, capsys, name)
    _refused(["eval", "--model", str(bad), "--tasks", "tiny_mc", "--device", "cpu"], marker, capsys, name)
    assert not (tmp_path / "o").exists()


def test_real_files_of_every_kind_still_load(world, tmp_path, capsys):
    """DeepSpeed-layout engine pickles (numpy RNG, sets, OrderedDict of sizes, Namespace), DCP values,
    HF .bin: all plain data, all load through the allowlist."""
    import neoxt
    from neoxt.checkpoint import load_state

    assert main(["convert", "inspect", str(world["good"])]) == 0
    state = {"scheduler": {"num_iters": 0}}
    assert load_state(world["good"], state)["scheduler"]["num_iters"] == 3
    for i, step in enumerate((world["seq_good"], world["pipe_good"])):
        assert main(["convert", "neox-to-neoxt", "--input-dir", str(step), "--config", str(world["llama_yml"]),
                     "--output-dir", str(tmp_path / f"n{i}")]) == 0
    assert main(["convert", "inspect", str(world["seq_good"] / "mp_rank_00_model_states.pt")]) == 0
    assert main(["convert", "inspect", str(world["hf_bin"])]) == 0
    assert neoxt.load_model(world["hf_bin"]) is not None
    assert not world["marker"].exists()


def test_trust_checkpoint_is_the_explicit_escape_hatch(world, tmp_path, capsys, monkeypatch):
    """With --trust-checkpoint the payload runs (that is what the flag says it allows)."""
    monkeypatch.delenv("NEOXT_TRUST_CHECKPOINT", raising=False)
    marker = world["marker"]
    try:
        assert main(["convert", "inspect", str(world["single"]), "--trust-checkpoint"]) == 0
        assert marker.exists()
        assert "without restriction" in capsys.readouterr().err
    finally:
        marker.unlink(missing_ok=True)
        os.environ.pop("NEOXT_TRUST_CHECKPOINT", None)  # main() set it; monkeypatch would restore it


def _hf_bin_dir(hf, out: Path, tokenizer_dir: Path, extra: dict | None = None) -> Path:
    """An HF model directory with ``pytorch_model.bin`` (the pickle format) instead of safetensors."""
    from transformers import AutoTokenizer

    hf.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    (out / "model.safetensors").unlink()
    torch.save({**hf.state_dict(), **(extra or {})}, out / "pytorch_model.bin")
    return out


def _train_config(tmp_path: Path, corpus_dataset, **extra) -> Path:
    tok, prefix = corpus_dataset
    d = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
         "max_position_embeddings": 32, "padded_vocab_size": 384, "make_vocab_size_divisible_by": 128,
         "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}}, "train_micro_batch_size_per_gpu": 2,
         "train_iters": 2, "precision": "fp32", "train_data_paths": [prefix], "tokenizer_type": "HFTokenizer",
         "vocab_file": tok.vocab_file, "save": str(tmp_path / "save"), "log_interval": 1}
    d.update(extra)
    path = tmp_path / "train.yml"
    path.write_text(yaml.safe_dump(d))
    return path
