"""Helpers shared by the evaluate tests: local lm-eval task folders and tiny HF model directories."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "lmeval"


def write_tasks(dest: Path, names: tuple[str, ...] = ("tiny_mc",), system_prompts: dict | None = None) -> Path:
    """Write task YAMLs (data paths made absolute) into ``dest``; optionally a system_prompts.json."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        text = (DATA / f"{name}.yaml.in").read_text().replace("@DATA_DIR@", str(DATA))
        (dest / f"{name}.yaml").write_text(text)
    if system_prompts is not None:
        (dest / "system_prompts.json").write_text(json.dumps(system_prompts))
    return dest


def make_hf_model_dir(dest: Path, tokenizer_dir: Path, *, arch: str = "neox", seed: int = 0,
                      chat_template: bool = True) -> Path:
    """A randomly initialised tiny HF causal LM (plus its tokenizer) saved with save_pretrained."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not chat_template:
        tok.chat_template = None
    common = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    # Larger weights than the default init so the tiny model has confident, distinct predictions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)
    model.eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    if not chat_template:
        cfg_path = dest / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(cfg))
        for extra in ("chat_template.jinja", "chat_template.json"):
            (dest / extra).unlink(missing_ok=True)
    return dest
