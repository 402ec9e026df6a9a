"""GPT-NeoX checkpoints in the fork's Transformer Engine key layout (``te_mha`` / ``te_layernorm_mlp``).

The TE checkpoints are built here from tiny HF models, independently of ``neoxt``: for GPT-NeoX as the
fork's ``huggingface/convert_hf_gptneox_to_neox.py`` writes them (legacy names renamed by its
``convert_to_te_format``: ``attention.qkv`` / ``attention.proj`` / ``mlp.fc1_weight`` / ``mlp.fc2_weight``
/ ``mlp.layer_norm_weight``; ``module: {"module": …}`` nesting with ``<idx>.<name>`` keys), for LLaMA
shapes as TE's own modules hold them (GQA QKV grouped per KV head, ``fc1 = [gate | up]``). TP shards
follow TE: column-parallel weights chunked on dim 0 (whole KV groups per rank, each rank's fc1 its own
two halves), row-parallel weights on dim 1, row biases and norms replicated.
"""

from __future__ import annotations

import pytest
import torch
from test_neox_import import (
    SEQ,
    VOCAB,
    build_hf,
    hf_to_neox_shards,
    hf_to_neoxt_expected,
    model_config,
    our_logits,
    write_neox,
)
from test_neox_roundtrip import _read_exported, run_config

from neoxt.convert import neox
from neoxt.convert.inspect import inspect_checkpoint


def _chunks(t, tp, dim=0):
    return [c.clone() for c in torch.chunk(t, tp, dim=dim)]


def hf_to_te_shards(model, arch: str, tp: int) -> list[dict[str, torch.Tensor]]:
    sd, cfg = model.state_dict(), model.config
    L = cfg.num_hidden_layers
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def col(key, t):
        for r, c in enumerate(_chunks(t, tp, 0)):
            ranks[r][key] = c

    def row(key, t):
        for r, c in enumerate(_chunks(t, tp, 1)):
            ranks[r][key] = c

    def rep(key, t):
        for r in range(tp):
            ranks[r][key] = t.clone()

    if arch == "gptneox":
        col("0.word_embeddings.weight", sd["gpt_neox.embed_in.weight"])
        for i in range(L):
            h, n = f"gpt_neox.layers.{i}.", i + 2
            rep(f"{n}.input_layernorm.weight", sd[h + "input_layernorm.weight"])
            rep(f"{n}.input_layernorm.bias", sd[h + "input_layernorm.bias"])
            col(f"{n}.attention.qkv.weight", sd[h + "attention.query_key_value.weight"])
            col(f"{n}.attention.qkv.bias", sd[h + "attention.query_key_value.bias"])
            row(f"{n}.attention.proj.weight", sd[h + "attention.dense.weight"])
            rep(f"{n}.attention.proj.bias", sd[h + "attention.dense.bias"])
            col(f"{n}.mlp.fc1_weight", sd[h + "mlp.dense_h_to_4h.weight"])
            col(f"{n}.mlp.fc1_bias", sd[h + "mlp.dense_h_to_4h.bias"])
            row(f"{n}.mlp.fc2_weight", sd[h + "mlp.dense_4h_to_h.weight"])
            rep(f"{n}.mlp.fc2_bias", sd[h + "mlp.dense_4h_to_h.bias"])
            rep(f"{n}.mlp.layer_norm_weight", sd[h + "post_attention_layernorm.weight"])
            rep(f"{n}.mlp.layer_norm_bias", sd[h + "post_attention_layernorm.bias"])
            rep(f"{n}.attention.rotary_emb.inv_freq", torch.ones(2))
        rep(f"{L + 3}.norm.weight", sd["gpt_neox.final_layer_norm.weight"])
        rep(f"{L + 3}.norm.bias", sd["gpt_neox.final_layer_norm.bias"])
        col(f"{L + 4}.final_linear.weight", sd["lm_head.weight"])
        return ranks

    col("0.word_embeddings.weight", sd["model.embed_tokens.weight"])
    heads, ng = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, per = cfg.hidden_size // heads, heads // ng
    for i in range(L):
        h, n = f"model.layers.{i}.", i + 2
        q, k, v = (sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv")
        grouped = torch.cat([q.view(ng, per, hd, -1), k.view(ng, 1, hd, -1), v.view(ng, 1, hd, -1)], dim=1)
        col(f"{n}.attention.qkv.weight", grouped.reshape(-1, cfg.hidden_size))
        row(f"{n}.attention.proj.weight", sd[h + "self_attn.o_proj.weight"])
        gate, up = sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]
        for r, (g, u) in enumerate(zip(_chunks(gate, tp), _chunks(up, tp), strict=True)):
            ranks[r][f"{n}.mlp.fc1_weight"] = torch.cat([g, u])
        row(f"{n}.mlp.fc2_weight", sd[h + "mlp.down_proj.weight"])
        if arch == "llama":
            rep(f"{n}.input_layernorm.scale", sd[h + "input_layernorm.weight"])
            rep(f"{n}.mlp.layer_norm_weight", sd[h + "post_attention_layernorm.weight"])
        else:  # OLMo-3 is post-norm: no pre-MLP norm for TE to fuse, its norms keep their names
            col(f"{n}.attention.q_norm.scale", sd[h + "self_attn.q_norm.weight"])
            col(f"{n}.attention.k_norm.scale", sd[h + "self_attn.k_norm.weight"])
            rep(f"{n}.post_attention_layernorm.scale", sd[h + "post_attention_layernorm.weight"])
            rep(f"{n}.post_feedforward_layernorm.scale", sd[h + "post_feedforward_layernorm.weight"])
    rep(f"{L + 3}.norm.scale", sd["model.norm.weight"])
    col(f"{L + 4}.final_linear.weight", sd["lm_head.weight"])
    return ranks


CASES = [("gptneox", "sequential", 1), ("gptneox", "sequential", 2), ("gptneox", "pipeline", 2),
         ("llama", "sequential", 2), ("llama", "pipeline", 1), ("llama", "pipeline", 2),
         ("olmo3_gqa", "pipeline", 2)]


@pytest.mark.parametrize(("arch", "layout", "tp"), CASES)
def test_te_layout_imports_with_hf_logits_and_exports_back(tmp_path, arch, layout, tp):
    hf = build_hf(arch)
    want = hf_to_te_shards(hf, arch, tp)
    step = write_neox(want, tmp_path / "neox", layout, iteration=11, fork_nesting=(layout == "sequential"))
    res = neox.read_neox_checkpoint(step, model_config(arch))
    info = inspect_checkpoint(step)  # inspect knows the TE names' sharding too
    assert info.num_params == sum(p.numel() for p in hf.parameters())
    expected = hf_to_neoxt_expected(hf, arch)
    assert set(res.state_dict) == set(expected)
    for k, v in expected.items():
        assert torch.equal(res.state_dict[k], v), k
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (our_logits(res.state_dict, res.model, tokens) - ref).abs().max().item() <= 1e-5

    neox.import_neox(step, run_config(arch), tmp_path / "neoxt")
    back = neox.export_neox(tmp_path / "neoxt", tmp_path / "back", model_parallel_size=tp,
                            pipeline=(layout == "pipeline"), te_layout=True)
    got = _read_exported(back, layout, tp)
    for r in range(tp):
        want_r = {k: v for k, v in want[r].items() if "inv_freq" not in k}
        assert set(got[r]) == set(want_r), r
        for k, v in want_r.items():
            assert torch.equal(got[r][k], v), (r, k)


def _tiny_neox_hf(vocab: int):
    import transformers as tf

    torch.manual_seed(9)
    cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, intermediate_size=256, rotary_pct=0.25,
                           use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False)
    return tf.GPTNeoXForCausalLM(cfg).eval()


def _tiny_llama_hf(vocab: int):
    import transformers as tf

    torch.manual_seed(10)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, intermediate_size=96, rms_norm_eps=1e-6,
                         rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random norms, so a swapped or dropped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + 1.0)
    return model.eval()


_LLAMA_KEYS = {"norm": "rmsnorm", "rms_norm_epsilon": 1e-6, "use_bias_in_norms": False, "activation": "swiglu",
               "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "num_kv_heads": 2,
               "intermediate_size": 96, "rotary_pct": 1.0, "gpt_j_residual": False}


def _train_config(corpus_dataset, tmp_path, **extra) -> dict:
    tok, prefix = corpus_dataset
    d = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16,
        "max_position_embeddings": 64, "pos_emb": "rotary", "rotary_pct": 0.25, "gpt_j_residual": True,
        "norm": "layernorm", "activation": "gelu", "no_weight_tying": True, "precision": "fp32",
        "te_mha": True, "te_layernorm_mlp": True,
        "train_micro_batch_size_per_gpu": 2, "train_iters": 3, "data_path": prefix, "split": "100,0,0",
        "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file, "log_interval": 1,
        "index_cache_dir": str(tmp_path / "cache"),
    }
    d.update(extra)
    return d


# (arch, key layout, file layout, TP): the fork's TE names, upstream's names (``linear1``/``query_key_value``),
# and the older legacy names (``dense_h_to_4h`` / ``w1``,``w3``), in sequential and pipeline files.
LOAD_CASES = [("gptneox", "te", "sequential", 2), ("gptneox", "names", "pipeline", 2),
              ("gptneox", "legacy", "sequential", 1), ("llama", "te", "pipeline", 2),
              ("llama", "legacy", "sequential", 2)]


@pytest.mark.parametrize(("arch", "keys", "layout", "tp"), LOAD_CASES)
def test_load_on_a_deepspeed_dir_imports_on_the_fly_and_trains(tmp_path, corpus_dataset, capsys, arch, keys,
                                                                layout, tp):
    import yaml

    import neoxt
    from neoxt.cli import main
    from neoxt.config import config_from_dict
    from neoxt.train.setup import resolve_vocab

    extra = dict(_LLAMA_KEYS) if arch == "llama" else {}
    if keys != "te":
        extra.update(te_mha=False, te_layernorm_mlp=False)
    base = _train_config(corpus_dataset, tmp_path, train_iters=2, **extra)
    vocab = resolve_vocab(config_from_dict(base)).model.padded_vocab_size
    hf = _tiny_llama_hf(vocab) if arch == "llama" else _tiny_neox_hf(vocab)
    if keys == "te":
        shards = hf_to_te_shards(hf, arch, tp)
    else:
        shards = hf_to_neox_shards(hf, arch, tp, legacy=(keys == "legacy"))
    write_neox(shards, tmp_path / "neox", layout, iteration=5, fork_nesting=(layout == "sequential"))
    cfg = dict(base, load=str(tmp_path / "neox"), finetune=True, save=str(tmp_path / "sft"), extra_save_iters=[0])
    (tmp_path / "sft.yml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "sft.yml")]) == 0  # in this process: no second torch start-up
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "imported it on the fly" in x]
    assert len(lines) == 1 and f"GPT-NeoX/DeepSpeed checkpoint ({layout}, TP {tp}, iteration 5)" in lines[0]
    assert "training finished at iteration 2" in out

    step0 = neoxt.load_model(tmp_path / "sft" / "global_step0").state_dict()
    expected = hf_to_neoxt_expected(hf, arch)
    assert set(step0) == set(expected)
    for k, v in expected.items():
        assert torch.equal(step0[k], v), k
    step2 = neoxt.load_model(tmp_path / "sft" / "global_step2").state_dict()
    assert not torch.equal(step2["embed.weight"], step0["embed.weight"])  # it trained
    saved = (tmp_path / "sft" / "global_step2" / "config.yml").read_text()
    assert str(tmp_path / "neox") in saved and "neoxt-neox-import" not in saved


def test_load_on_a_deepspeed_dir_that_does_not_fit_says_what_to_do(tmp_path, corpus_dataset):
    from neoxt.config import config_from_dict
    from neoxt.convert.neox_load import import_load_on_the_fly
    from neoxt.errors import CheckpointError
    from neoxt.train.loop import train

    hf = _tiny_neox_hf(128)
    write_neox(hf_to_te_shards(hf, "gptneox", 1), tmp_path / "neox", "pipeline", iteration=5)
    cfg = config_from_dict(_train_config(corpus_dataset, tmp_path, num_layers=3, load=str(tmp_path / "neox"),
                                         finetune=True))
    with pytest.raises(CheckpointError, match=r"GPT-NeoX/DeepSpeed checkpoint that does not fit .*`neoxt convert neox-to-neoxt"):
        import_load_on_the_fly(cfg, tmp_path / "work", print)
    # A direct train() call (no on-the-fly import) names the way out instead of "no checkpoint".
    with pytest.raises(CheckpointError, match=r"not a neoxt one: train with `neoxt train`"):
        train(cfg, "", log=lambda m: None)
