"""Tiny random HF models (built from transformers configs, no download) and a CLI runner for the
convert tests."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from neoxt.errors import NeoxtError
from neoxt.model import KVCache

VOCAB = 320  # the conftest tokenizer's vocabulary
ARCHS = ("gpt_neox", "llama", "llama_tied", "olmo3")


def hf_config(arch: str):
    from transformers import GPTNeoXConfig, LlamaConfig, Olmo3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if arch == "gpt_neox":  # partial rotary 0.25, parallel residual, biases, untied head
        return GPTNeoXConfig(**common, num_hidden_layers=2, intermediate_size=128, rotary_pct=0.25,
                             rotary_emb_base=10000, use_parallel_residual=True)
    if arch in ("llama", "llama_tied"):  # grouped-query attention: 4 query heads share 2 kv heads
        return LlamaConfig(**common, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=96,
                           tie_word_embeddings=arch == "llama_tied", rms_norm_eps=1e-6)
    # OLMo-3: window 8 < sequence, a mix of sliding and full layers
    return Olmo3Config(**common, num_hidden_layers=4, intermediate_size=96, sliding_window=8,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])


def hf_model(arch: str, seed: int = 0):
    """A random HF causal LM with non-trivial norms and biases (so any mapping slip changes logits)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(4.0)  # sharper logits: greedy decoding has no near-ties
    return model


def save_hf_dir(model, tokenizer_dir: Path, out: Path, max_shard_size: str = "60KB") -> Path:
    """save_pretrained (sharded, to exercise the index path) plus the tokenizer files."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def round_trip(model, tokenizer_dir: Path, root: Path, max_shard_size: str = "60KB",
               back_shard_size: str | None = "100KB") -> tuple[Path, Path, Path]:
    """Save ``model`` as an HF dir, then `hf-to-neoxt` and `neoxt-to-hf` through the CLI: (hf, neoxt, back)."""
    hf_dir = save_hf_dir(model, tokenizer_dir, root / "hf", max_shard_size)
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(hf_dir), "--output-dir", str(root / "neoxt")]) == 0
    shard = ["--max-shard-size", back_shard_size] if back_shard_size else []
    assert run_cli(["convert", "neoxt-to-hf", "--checkpoint", str(root / "neoxt"),
                    "--output-dir", str(root / "back"), *shard]) == 0
    return hf_dir, root / "neoxt", root / "back"


def assert_same_state_dict(a_model, b_model) -> None:
    """Same tensor names, dtypes and values, bit for bit."""
    a, b = a_model.state_dict(), b_model.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def run_cli(argv: list[str]) -> int:
    """What `neoxt convert …` does (parser from our commands module, NeoxtError → exit 2 + one line)."""
    from neoxt.convert import commands

    parser = argparse.ArgumentParser(prog="neoxt")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except NeoxtError as err:
        print(f"neoxt: {err}")
        return 2


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with our KV cache: prefill once, then one token per forward."""
    param = model.embed.weight
    cache = KVCache(model.cfg, prompt.shape[0], prompt.shape[1] + steps, param.device, param.dtype)
    logits = model(prompt, kv_cache=cache)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, kv_cache=cache)
    return torch.cat(out, dim=1)
