"""Acceptance 3: `neoxt generate` modes — input-file JSONL records, unconditional, interactive on a pty."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neoxt.cli import main

REPO = Path(__file__).resolve().parents[2]
KEYS = {"context", "text", "length", "finished", "message", "duration_seconds"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    out = tmp_path_factory.mktemp("gen") / "hf"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_input_file_writes_one_record_per_prompt(hf_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nHello world!\n  A language model  \n")
    rc = main(["generate", "--model", str(hf_dir), "--text-gen-type", "input-file", "--sample-input-file",
               str(prompts), "--maximum-tokens", "6", "--temperature", "0.8", "--top-k", "40", "--seed", "7",
               "--device", "cpu", "--batch-size", "2"])
    assert rc == 0
    out = Path(f"{prompts}.output.jsonl")  # GPT-NeoX's default output name
    records = _records(out)
    assert [r["context"] for r in records] == ["The quick brown fox", "Hello world!", "A language model"]
    for r in records:
        assert set(r) == KEYS
        assert 0 <= r["length"] <= 6 and r["duration_seconds"] >= 0
        assert (r["text"] is None) == (r["length"] == 0)
    # Another seed gives other samples (same-seed reproducibility: test_generate_sampling.py).
    first = [r["text"] for r in records]
    main(["generate", "--model", str(hf_dir), "--text-gen-type", "input-file", "--sample-input-file",
          str(prompts), "--maximum-tokens", "6", "--temperature", "0.8", "--top-k", "40", "--device", "cpu",
          "--batch-size", "2", "--seed", "8"])
    assert [r["text"] for r in _records(out)] != first


def test_config_keys_drive_unconditional_mode_and_chat(hf_dir, tmp_path, capsys):
    cfg = tmp_path / "gen.yml"
    out = tmp_path / "samples.jsonl"
    cfg.write_text(f"load: {hf_dir}\ntext_gen_type: unconditional\nnum_samples: 3\nmaximum_tokens: 5\n"
                   f"temperature: 1.0\nsample_output_file: {out}\n")
    assert main(["generate", str(cfg), "--device", "cpu"]) == 0
    records = _records(out)
    assert len(records) == 3 and all(r["context"] == "" and r["length"] <= 5 for r in records)
    # Without an output file the records go to stdout; chat template + system prompt accepted.
    cfg.write_text(f"load: {hf_dir}\nnum_samples: 2\nmaximum_tokens: 3\n")
    capsys.readouterr()
    assert main(["generate", str(cfg), "--device", "cpu", "--apply-chat-template", "--system-prompt", "Be brief."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(set(json.loads(line)) == KEYS for line in lines)


def test_chat_prompt_uses_the_template_and_system_prompt(tiny_tokenizer_dir):
    from neoxt.generate import build_prompt
    from neoxt.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(tiny_tokenizer_dir))
    ids = build_prompt(tok, "Hello", apply_chat_template=True, system_prompt="Be brief.")
    text = tok.decode(ids)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n"
    assert build_prompt(tok, "", apply_chat_template=False, system_prompt=None) == [tok.eod_id]


def test_missing_input_file_is_a_one_line_error(hf_dir, tmp_path, capsys):
    rc = main(["generate", "--model", str(hf_dir), "--text-gen-type", "input-file", "--sample-input-file",
               str(tmp_path / "nope.txt"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "nope.txt" in err and "\n" not in err


def _read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    buf = b""
    end = time.time() + timeout
    while marker not in buf:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_mode_on_a_pseudo_terminal(hf_dir):
    leader, follower = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "neoxt.cli", "generate", "--model", str(hf_dir), "--text-gen-type", "interactive",
         "--maximum-tokens", "4", "--device", "cpu"],
        stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True,
    )
    os.close(follower)
    try:
        _read_until(leader, b"Context prompt >>> ")
        os.write(leader, b"The quick brown fox\n")
        out = _read_until(leader, b"Context prompt >>> ")
        assert b"Generated Text: " in out and b"tokens" in out
        os.write(leader, b"Hello world\n")
        _read_until(leader, b"Context prompt >>> ")
        os.write(leader, b"\n")  # an empty prompt ends the session
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_generate_from_a_neoxt_checkpoint_and_its_config(tmp_path, tiny_tokenizer_dir):
    """`load` names a neoxt run dir; the tokenizer comes from the checkpoint's saved config."""
    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_from_dict, config_to_yaml, with_overrides
    from neoxt.generate import SamplingParams, generate_tokens
    from neoxt.model import Transformer
    from neoxt.tokenizer import load_tokenizer

    cfg = config_from_dict({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                            "max_position_embeddings": 128, "tokenizer_type": "HFTokenizer",
                            "vocab_file": str(tiny_tokenizer_dir / "tokenizer.json")})
    cfg = with_overrides(cfg, model={"padded_vocab_size": 384})
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    save_checkpoint(tmp_path / "run", 10, {"model": model.state_dict()}, config_to_yaml(cfg))

    prompts = tmp_path / "in.txt"
    prompts.write_text("Hello world!\nThe quick brown fox\n")
    gen_cfg = tmp_path / "gen.yml"
    gen_cfg.write_text(f"load: {tmp_path / 'run'}\ntext_gen_type: input-file\nsample_input_file: {prompts}\n"
                       f"sample_output_file: {tmp_path / 'out.jsonl'}\nmaximum_tokens: 7\n")
    assert main(["generate", str(gen_cfg), "--device", "cpu"]) == 0
    records = _records(tmp_path / "out.jsonl")
    tok = load_tokenizer(cfg.tokenizer)
    expected = generate_tokens(model, [tok.encode("Hello world!"), tok.encode("The quick brown fox")],
                               SamplingParams(maximum_tokens=7, stop_token_ids=(tok.eod_id,)), pad_id=tok.eod_id)
    assert [r["text"] for r in records] == [tok.decode(list(e.tokens)) or None for e in expected]


def test_interactive_loop_joins_lines_until_prompt_end(hf_dir):
    import io

    from neoxt import load_model
    from neoxt.generate import SamplingParams, interactive_loop
    from neoxt.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(hf_dir))
    stdin = io.StringIO("def f():\n    return 1###\nHello###\n/quit\n")
    stdout = io.StringIO()
    count = interactive_loop(load_model(hf_dir), tok, SamplingParams(maximum_tokens=3), prompt_end="###",
                             stdin=stdin, stdout=stdout)
    assert count == 2
    text = stdout.getvalue()
    assert text.count("Context prompt >>> ") == 3 and text.count("... ") == 1
    assert text.count("Generated Text: ") == 2


def test_interactive_chat_keeps_the_conversation_until_reset(hf_dir):
    import io

    from neoxt import load_model
    from neoxt.generate import SamplingParams, interactive_loop
    from neoxt.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(hf_dir))
    seen = []
    original = tok.apply_chat_template

    def recording(messages, add_generation_prompt=False):
        seen.append([m["role"] for m in messages])
        return original(messages, add_generation_prompt=add_generation_prompt)

    tok.apply_chat_template = recording
    stdin = io.StringIO("Hello\nHow are you?\n/reset\nAgain\n")
    count = interactive_loop(load_model(hf_dir), tok, SamplingParams(maximum_tokens=2), apply_chat_template=True,
                             system_prompt="Be brief.", stdin=stdin, stdout=io.StringIO())
    assert count == 3
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
