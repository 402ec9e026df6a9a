"""SFT: label files, weighted blends and every pack_impl together; all-masked windows; HF finetune."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from neoxt.config import config_from_dict
from neoxt.data.indexed import IndexedDatasetWriter
from neoxt.train.loop import train
from neoxt.train.objectives.lm import accumulate_gradients
from neoxt.train.setup import open_train_data

SEQ = 16


def _write_sft(prefix, rng, n_docs, long_prompt_every):
    """Conversations as (prompt tokens: label -100, answer tokens: label = token, EOD).

    Every ``long_prompt_every``-th prompt is longer than 2 windows, so packing yields windows whose
    labels are all -100.
    """
    with IndexedDatasetWriter(str(prefix) + "_text_document", np.uint16) as text, \
            IndexedDatasetWriter(str(prefix) + "_label_document", np.int32) as label:
        for d in range(n_docs):
            p_len = 3 * SEQ + 5 if d % long_prompt_every == 0 else int(rng.integers(3, 10))
            a_len = int(rng.integers(4, 12))
            prompt = rng.integers(10, 150, p_len)
            answer = (np.arange(a_len) * 7 + int(rng.integers(0, 50))) % 100 + 150
            tokens = np.concatenate([prompt, answer, [0]]).astype(np.uint16)
            labels = np.concatenate([np.full(p_len, -100), answer, [0]]).astype(np.int32)
            text.add_document(tokens)
            label.add_document(labels)
    return str(prefix) + "_text_document", str(prefix) + "_label_document"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(0)
    a = _write_sft(root / "chat_a", rng, 60, 4)
    b = _write_sft(root / "chat_b", rng, 40, 3)
    return {"a": a, "b": b, "root": root, "vocab_file": str(tiny_tokenizer_dir / "tokenizer.json")}


def _cfg(sft_data, tmp_path, pack_impl="packed", **extra):
    a, b = sft_data["a"], sft_data["b"]
    d = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": SEQ,
        "max_position_embeddings": 64, "pos_emb": "rotary", "norm": "rmsnorm", "activation": "swiglu",
        "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "use_bias_in_norms": False,
        "intermediate_size": 48,
        "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}}, "weight_decay": 0.0,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_iters": 6,
        "train_data_paths": [a[0], b[0]], "train_label_data_paths": [a[1], b[1]],
        "train_data_weights": [2.0, 1.0],
        "valid_data_paths": [a[0]], "valid_label_data_paths": [a[1]],
        "test_data_paths": [a[0]], "test_label_data_paths": [a[1]],
        "pack_impl": pack_impl, "tokenizer_type": "HFTokenizer", "vocab_file": sft_data["vocab_file"],
        "eval_interval": 3, "eval_iters": 1, "log_interval": 1, "seed": 3,
        "index_cache_dir": str(sft_data["root"] / f"cache-{pack_impl}"),
        "save": str(tmp_path / "run"), "checkpoint_factor": 6,
    }
    d.update(extra)
    return config_from_dict(d)


def test_all_masked_windows_contribute_nothing_and_gradient_is_assistant_only(tmp_path, sft_data):
    """Acceptance 4: the step's gradient == the gradient of the mean CE over assistant tokens only."""
    from neoxt.model import Transformer
    from neoxt.train.setup import resolve_vocab

    cfg = resolve_vocab(_cfg(sft_data, tmp_path))
    data = open_train_data(cfg)
    steps = [[next(data.train) for _ in range(2)] for _ in range(12)]
    masked_rows = [(s, m) for s, micro in enumerate(steps) for m in micro if bool((m["loss_mask"].sum(-1) == 0).any())]
    assert masked_rows, "fixture should produce packed windows with only -100 labels"
    step = steps[masked_rows[0][0]]

    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ref_model = Transformer(cfg.model)
    ref_model.load_state_dict(model.state_dict())

    loss = accumulate_gradients(model, step)
    assert math.isfinite(loss.item())

    tokens = torch.cat([m["tokens"] for m in step])
    labels = torch.cat([m["labels"] for m in step])
    keep = torch.cat([m["loss_mask"] for m in step]) > 0
    logits = ref_model(tokens, positions=torch.cat([m["position_ids"] for m in step]))
    ref_loss = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name

    # A step made only of all-masked windows: zero loss and exactly zero gradient, not NaN.
    model.zero_grad(set_to_none=True)
    empty = [{k: v.clone() for k, v in step[0].items()}]
    empty[0]["labels"][:] = 0
    empty[0]["loss_mask"][:] = 0
    assert accumulate_gradients(model, empty).item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("pack_impl", ["packed", "pack_until_overflow", "unpacked"])
def test_sft_blend_trains_finite_with_every_pack_impl(tmp_path, sft_data, pack_impl):
    r = train(_cfg(sft_data, tmp_path, pack_impl), "", log=lambda m: None)
    assert r.iteration == 6 and r.nan_count == 0
    assert all(math.isfinite(x) for x in r.losses)


def test_finetune_from_converted_hf_model(tmp_path, sft_data):
    """finetune: true + load: <HF model dir> starts from exactly the converted weights."""
    transformers = pytest.importorskip("transformers")
    import neoxt
    from neoxt.model import Transformer
    from neoxt.train.checkpointer import load_weights
    from neoxt.train.setup import resolve_vocab

    cfg = resolve_vocab(_cfg(sft_data, tmp_path))
    m = cfg.model
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.rms_norm_epsilon, tie_word_embeddings=m.tie_word_embeddings, rope_theta=m.rotary_emb_base,
    )
    torch.manual_seed(1)
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(hf_dir)
    converted = neoxt.load_model(hf_dir).state_dict()

    model = Transformer(cfg.model)
    load_weights(hf_dir, model)
    for k, v in converted.items():
        assert torch.equal(model.state_dict()[k], v), k

    ft = replace(cfg, checkpoint=replace(cfg.checkpoint, load=str(hf_dir), finetune=True, extra_save_iters=(0,)))
    lines = []
    r = train(ft, None, log=lines.append)
    assert lines[0].startswith("finetuning from") and r.start_iteration == 0 and r.iteration == 6
    base = neoxt.load_model(tmp_path / "run" / "global_step0").state_dict()
    for k, v in converted.items():
        assert torch.equal(base[k], v), k


def test_sft_example_config_end_to_end_with_preprocess_chat(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """configs/tiny-llama.yml + configs/sft-example.yml: chat data through `preprocess-chat`, finetune
    from an HF model directory, blend of two sources, pack_until_overflow; rerun resumes."""
    import json

    transformers = pytest.importorskip("transformers")
    from neoxt.checkpoint import latest_checkpoint
    from neoxt.cli import main
    from neoxt.config import load_config
    from neoxt.data.chat import preprocess_chat
    from neoxt.train.setup import resolve_vocab

    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    words = "the cat sat on a mat and the dog ran to the park with a red ball".split()
    for name, n in (("chat_a", 30), ("chat_b", 20), ("chat_valid", 10)):
        src = tmp_path / f"{name}.jsonl"
        with open(src, "w") as f:
            for _ in range(n):
                question = " ".join(rng.choice(words, int(rng.integers(3, 60))))
                answer = " ".join(rng.choice(words, int(rng.integers(2, 8))))
                msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                f.write(json.dumps({"messages": msgs}) + "\n")
        preprocess_chat([str(src)], f"data/sft/{name}", str(tiny_tokenizer_dir), keys=("messages",))

    overrides = ["tokenizer_type=HFTokenizer", f"vocab_file={tiny_tokenizer_dir / 'tokenizer.json'}",
                 "train_iters=6", "checkpoint_factor=3", "eval_interval=3", "eval_iters=1", "log_interval=1",
                 f"index_cache_dir={tmp_path / 'cache'}"]
    configs = [str(repo / "configs" / "tiny-llama.yml"), str(repo / "configs" / "sft-example.yml")]
    m = resolve_vocab(load_config(configs, overrides)).model
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.rms_norm_epsilon, tie_word_embeddings=False, rope_theta=m.rotary_emb_base,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "models" / "base-hf")

    args = ["train", *configs, *[x for o in overrides for x in ("--set", o)]]
    assert main([*args, "--set", "exit_interval=3"]) == 0  # a first job that stops early
    assert latest_checkpoint(tmp_path / "runs" / "sft").name == "global_step3"
    assert main(args) == 0  # the same command again: resumes from runs/sft, not from models/base-hf
    assert latest_checkpoint(tmp_path / "runs" / "sft").name == "global_step6"
    records = [json.loads(x) for x in (tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in records)
