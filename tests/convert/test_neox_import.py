"""GPT-NeoX (DeepSpeed) checkpoint import: both upstream layouts, TP 1 and 2, three architectures.

The checkpoints are built here from tiny random HF models with a mapping written from upstream's
documented names (tools/ckpts/convert_hf_llama_to_neox.py, convert_neox_to_hf.py, the OLMo-3 fork's
convert_hf_olmo_to_neox.py), independently of ``neoxt.convert.neox``, then imported and compared
with HF: same tensors, same logits.
"""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxt.config.schema import ModelConfig, RunConfig
from neoxt.convert import neox
from neoxt.errors import CheckpointError, NeoxtError

VOCAB = 128
SEQ = 12  # longer than the OLMo-3 sliding window (4)


# ------------------------------------------------------------------------------------------------
# Tiny HF models and the matching neoxt configs.


def build_hf(arch: str, tied: bool = False):
    import transformers as tf

    torch.manual_seed({"gptneox": 1, "gptneox_seq": 4, "llama": 2, "olmo3": 3, "olmo3_gqa": 5}[arch])
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    if arch.startswith("gptneox"):
        cfg = tf.GPTNeoXConfig(
            **common, intermediate_size=256, rotary_pct=0.25, rotary_emb_base=10000,
            use_parallel_residual=(arch == "gptneox"), layer_norm_eps=1e-5, hidden_act="gelu",
            tie_word_embeddings=False,
        )
        model = tf.GPTNeoXForCausalLM(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(
            **common, num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
        )
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.Olmo3Config(
            **common, num_key_value_heads=4 if arch == "olmo3" else 2, intermediate_size=96, rms_norm_eps=1e-6,
            rope_theta=500000.0, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=False, pad_token_id=1, eos_token_id=0, bos_token_id=0,
        )
        model = tf.Olmo3ForCausalLM(cfg)
    with torch.no_grad():  # random (not default-initialised) norms and biases, so a swap shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def model_config(arch: str, tied: bool = False) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                attention_types=("global", "global"))
    if arch.startswith("gptneox"):
        return ModelConfig(
            **base, num_kv_heads=4, intermediate_size=256, norm="layernorm", layernorm_epsilon=1e-5,
            gpt_j_residual=(arch == "gptneox"), pos_emb="rotary", rotary_pct=0.25, rotary_emb_base=10000.0,
            activation="gelu", no_weight_tying=True,
        )
    if arch == "llama":
        return ModelConfig(
            **base, num_kv_heads=2, intermediate_size=96, norm="rmsnorm", rms_norm_epsilon=1e-6,
            use_bias_in_norms=False, activation="swiglu", use_bias_in_attn_linear=False, use_bias_in_mlp=False,
            rotary_emb_base=10000.0, no_weight_tying=not tied,
        )
    base["attention_types"] = ("sliding", "global")
    return ModelConfig(
        **base, num_kv_heads=4 if arch == "olmo3" else 2, intermediate_size=96, norm="rmsnorm",
        rms_norm_epsilon=1e-6, use_bias_in_norms=False, norm_placement="olmo3", use_separate_qk_norms=True,
        activation="swiglu", use_bias_in_attn_linear=False, use_bias_in_mlp=False, rotary_emb_base=500000.0,
        no_weight_tying=True, sliding_window_width=4,
    )


# ------------------------------------------------------------------------------------------------
# HF -> GPT-NeoX shards, written from upstream's names (independent of the importer).


def _chunks(t: torch.Tensor, tp: int, dim: int = 0) -> list[torch.Tensor]:
    return [c.clone() for c in torch.chunk(t, tp, dim=dim)]


def hf_to_neox_shards(model, arch: str, tp: int, legacy: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per-rank dicts of ``<layer_idx>.<name>``: 0 = embedding, 2.. = layers, L+3 = norm, L+4 = head."""
    sd = model.state_dict()
    cfg = model.config
    L = cfg.num_hidden_layers
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def col(key: str, t: torch.Tensor) -> None:
        for r, c in enumerate(_chunks(t, tp, 0)):
            ranks[r][key] = c

    def row(key: str, t: torch.Tensor) -> None:
        for r, c in enumerate(_chunks(t, tp, 1)):
            ranks[r][key] = c

    def rep(key: str, t: torch.Tensor) -> None:
        for r in range(tp):
            ranks[r][key] = t.clone()

    if arch.startswith("gptneox"):
        col("0.word_embeddings.weight", sd["gpt_neox.embed_in.weight"])
        l1, l2 = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h") if legacy else ("mlp.linear1", "mlp.linear2")
        for i in range(L):
            h, n = f"gpt_neox.layers.{i}.", i + 2
            for ln in ("input_layernorm", "post_attention_layernorm"):
                rep(f"{n}.{ln}.weight", sd[h + f"{ln}.weight"])
                rep(f"{n}.{ln}.bias", sd[h + f"{ln}.bias"])
            # HF GPTNeoX's query_key_value already has GPT-NeoX's per-head [q, k, v] interleaving.
            col(f"{n}.attention.query_key_value.weight", sd[h + "attention.query_key_value.weight"])
            col(f"{n}.attention.query_key_value.bias", sd[h + "attention.query_key_value.bias"])
            row(f"{n}.attention.dense.weight", sd[h + "attention.dense.weight"])
            col(f"{n}.{l1}.weight", sd[h + "mlp.dense_h_to_4h.weight"])
            col(f"{n}.{l1}.bias", sd[h + "mlp.dense_h_to_4h.bias"])
            row(f"{n}.{l2}.weight", sd[h + "mlp.dense_4h_to_h.weight"])
            for b_key, hf in ((f"{n}.attention.dense.bias", "attention.dense.bias"), (f"{n}.{l2}.bias", "mlp.dense_4h_to_h.bias")):
                if cfg.use_parallel_residual:
                    # gpt_j_residual: every rank adds its copy before the one all-reduce -> copies sum to the bias.
                    for r in range(tp):
                        ranks[r][b_key] = sd[h + hf] / tp
                else:
                    rep(b_key, sd[h + hf])
            # inv_freq saved by rotary_save_freqs_buffer: derived, must be ignored by the importer.
            rep(f"{n}.attention.rotary_emb.inv_freq", torch.ones(4))
        rep(f"{L + 3}.norm.weight", sd["gpt_neox.final_layer_norm.weight"])
        rep(f"{L + 3}.norm.bias", sd["gpt_neox.final_layer_norm.bias"])
        col(f"{L + 4}.final_linear.weight", sd["lm_head.weight"])
        return ranks

    # LLaMA (upstream convert_hf_llama_to_neox.py) and the OLMo-3 fork (convert_hf_olmo_to_neox.py).
    col("0.word_embeddings.weight", sd["model.embed_tokens.weight"])
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads
    for i in range(L):
        h, n = f"model.layers.{i}.", i + 2
        q, k, v = (sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv")
        if kv != heads:  # GQA: each rank holds [Q_r | K_r | V_r]
            for r, (qc, kc, vc) in enumerate(zip(_chunks(q, tp), _chunks(k, tp), _chunks(v, tp), strict=True)):
                ranks[r][f"{n}.attention.query_key_value.weight"] = torch.cat([qc, kc, vc])
        else:  # MHA: per-head interleaved [q_h, k_h, v_h]
            inter = torch.stack([t.view(heads, hd, -1) for t in (q, k, v)], dim=1).reshape(3 * heads * hd, -1)
            col(f"{n}.attention.query_key_value.weight", inter)
        row(f"{n}.attention.dense.weight", sd[h + "self_attn.o_proj.weight"])
        up, gate = sd[h + "mlp.up_proj.weight"], sd[h + "mlp.gate_proj.weight"]
        if legacy:
            col(f"{n}.mlp.w1.weight", gate)
            col(f"{n}.mlp.w3.weight", up)
            row(f"{n}.mlp.w2.weight", sd[h + "mlp.down_proj.weight"])
        else:
            for r, (uc, gc) in enumerate(zip(_chunks(up, tp), _chunks(gate, tp), strict=True)):
                ranks[r][f"{n}.mlp.linear1.weight"] = torch.cat([uc, gc])  # Gated_Activation: x, gate = chunk(2)
            row(f"{n}.mlp.linear2.weight", sd[h + "mlp.down_proj.weight"])
        if arch == "llama":
            rep(f"{n}.input_layernorm.scale", sd[h + "input_layernorm.weight"])
            rep(f"{n}.post_attention_layernorm.scale", sd[h + "post_attention_layernorm.weight"])
        else:
            col(f"{n}.attention.q_norm.scale", sd[h + "self_attn.q_norm.weight"])
            col(f"{n}.attention.k_norm.scale", sd[h + "self_attn.k_norm.weight"])
            rep(f"{n}.post_attention_layernorm.scale", sd[h + "post_attention_layernorm.weight"])
            rep(f"{n}.post_feedforward_layernorm.scale", sd[h + "post_feedforward_layernorm.weight"])
            rep(f"{n}.input_layernorm.scale", torch.ones(cfg.hidden_size))  # built by the fork, unused
    rep(f"{L + 3}.norm.scale", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        col(f"{L + 4}.final_linear.weight", sd["lm_head.weight"])
    return ranks


def write_neox(ranks: list[dict[str, torch.Tensor]], out: Path, layout: str, iteration: int = 7, fork_nesting: bool = False) -> Path:
    """Write a GPT-NeoX ``global_step<N>`` as DeepSpeed would (engine state pickles included)."""
    step = out / f"global_step{iteration}"
    step.mkdir(parents=True)
    engine = {
        "buffer_names": [], "optimizer": None, "lr_scheduler": {"num_iters": iteration}, "global_steps": iteration,
        "skipped_steps": 0, "dp_world_size": 1, "mp_world_size": len(ranks), "ds_version": "0.10.0",
        "iteration": iteration, "ds_config": argparse.Namespace(fp16=False),  # non-tensor pickles, as DeepSpeed writes
        "np_rng_state": np.random.get_state(), "args": {"num_layers": 2},
        # The rest of DeepSpeed's engine dict and GPT-NeoX's client state (megatron/checkpointing.py).
        "param_shapes": [OrderedDict((k, v.shape) for k, v in ranks[0].items())], "frozen_param_shapes": None,
        "shared_params": {}, "frozen_param_fragments": None, "data_sampler": None, "random_ltd": None,
        "sparse_tensor_module_names": set(), "global_samples": 8 * iteration,
        "random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(), "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
    }
    for r, shard in enumerate(ranks):
        if layout == "sequential":
            if fork_nesting:
                module = {"module": dict(shard)}
            else:
                module = {f"sequential.{k}": v for k, v in shard.items()}
            torch.save({**engine, "module": module}, step / f"mp_rank_{r:02d}_model_states.pt")
        else:
            by_idx: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in shard.items():
                idx, name = k.split(".", 1)
                by_idx.setdefault(int(idx), {})[name] = v
            for idx, layer in by_idx.items():
                torch.save(layer, step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            torch.save({**engine, "module": None}, step / f"mp_rank_{r:02d}_model_states.pt")
    (out / "latest").write_text(step.name)
    return step


def hf_to_neoxt_expected(model, arch: str) -> dict[str, torch.Tensor]:
    """Our parameter names from HF directly (the contract in neoxt.model.transformer)."""
    sd = model.state_dict()
    L = model.config.num_hidden_layers
    out = {}
    if arch.startswith("gptneox"):
        heads, hd = 4, 16
        out["embed.weight"] = sd["gpt_neox.embed_in.weight"]
        for i in range(L):
            h, p = f"gpt_neox.layers.{i}.", f"layers.{i}."
            for kind in ("weight", "bias"):
                out[p + f"attn_norm.{kind}"] = sd[h + f"input_layernorm.{kind}"]
                out[p + f"mlp_norm.{kind}"] = sd[h + f"post_attention_layernorm.{kind}"]
                qkv = sd[h + f"attention.query_key_value.{kind}"]
                per = qkv.view(heads, 3, hd, *qkv.shape[1:])
                for j, x in enumerate("qkv"):
                    out[p + f"attn.{x}.{kind}"] = per[:, j].reshape(heads * hd, *qkv.shape[1:])
                out[p + f"attn.o.{kind}"] = sd[h + f"attention.dense.{kind}"]
                out[p + f"mlp.up.{kind}"] = sd[h + f"mlp.dense_h_to_4h.{kind}"]
                out[p + f"mlp.down.{kind}"] = sd[h + f"mlp.dense_4h_to_h.{kind}"]
        out["final_norm.weight"] = sd["gpt_neox.final_layer_norm.weight"]
        out["final_norm.bias"] = sd["gpt_neox.final_layer_norm.bias"]
        out["lm_head.weight"] = sd["lm_head.weight"]
        return out
    out["embed.weight"] = sd["model.embed_tokens.weight"]
    for i in range(L):
        h, p = f"model.layers.{i}.", f"layers.{i}."
        for x in "qkvo":
            out[p + f"attn.{x}.weight"] = sd[h + f"self_attn.{x}_proj.weight"]
        for x in ("up", "gate", "down"):
            out[p + f"mlp.{x}.weight"] = sd[h + f"mlp.{x}_proj.weight"]
        if arch == "llama":
            out[p + "attn_norm.weight"] = sd[h + "input_layernorm.weight"]
            out[p + "mlp_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
        else:
            out[p + "attn_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
            out[p + "mlp_norm.weight"] = sd[h + "post_feedforward_layernorm.weight"]
            out[p + "attn.q_norm.weight"] = sd[h + "self_attn.q_norm.weight"]
            out[p + "attn.k_norm.weight"] = sd[h + "self_attn.k_norm.weight"]
    out["final_norm.weight"] = sd["model.norm.weight"]
    if "lm_head.weight" in sd and not model.config.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def our_logits(sd: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    from neoxt.model import Transformer

    model = Transformer(cfg)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model.eval()(tokens)


# ------------------------------------------------------------------------------------------------


CASES = [
    ("gptneox", "sequential", 1), ("gptneox", "pipeline", 2), ("gptneox", "sequential", 2),
    ("gptneox_seq", "pipeline", 2),
    ("llama", "sequential", 2), ("llama", "pipeline", 1), ("llama", "pipeline", 2),
    ("olmo3", "sequential", 1), ("olmo3", "pipeline", 2), ("olmo3_gqa", "sequential", 2),
]


@pytest.mark.parametrize(("arch", "layout", "tp"), CASES)
def test_import_matches_hf(tmp_path, arch, layout, tp):
    hf = build_hf(arch)
    cfg = model_config(arch)
    step = write_neox(hf_to_neox_shards(hf, arch, tp), tmp_path / "neox", layout)
    res = neox.read_neox_checkpoint(step, cfg)
    assert res.files.layout == layout and res.files.tp == tp
    assert res.iteration == 7
    assert res.model.padded_vocab_size == VOCAB
    expected = hf_to_neoxt_expected(hf, arch)
    assert set(res.state_dict) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(res.state_dict[k], v, rtol=0, atol=0, msg=k)

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    got = our_logits(res.state_dict, res.model, tokens)
    assert (got - ref).abs().max().item() <= 1e-5


def test_import_tied_llama_and_legacy_names(tmp_path):
    hf = build_hf("llama", tied=True)
    cfg = model_config("llama", tied=True)
    step = write_neox(hf_to_neox_shards(hf, "llama", 2, legacy=True), tmp_path / "neox", "pipeline")
    res = neox.read_neox_checkpoint(tmp_path / "neox", cfg)  # the save dir: resolved through `latest`
    assert res.files.path == step and "lm_head.weight" not in res.state_dict
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (our_logits(res.state_dict, res.model, tokens) - ref).abs().max().item() <= 1e-5


def test_import_legacy_gptneox_names_and_fork_nesting(tmp_path):
    hf = build_hf("gptneox")
    step = write_neox(hf_to_neox_shards(hf, "gptneox", 1, legacy=True), tmp_path / "a", "sequential")
    res = neox.read_neox_checkpoint(step, model_config("gptneox"))
    torch.testing.assert_close(res.state_dict["layers.1.mlp.up.weight"], hf.state_dict()["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"])

    hf = build_hf("olmo3")
    step = write_neox(hf_to_neox_shards(hf, "olmo3", 2), tmp_path / "b", "sequential", fork_nesting=True)
    res = neox.read_neox_checkpoint(step, model_config("olmo3"))
    expected = hf_to_neoxt_expected(hf, "olmo3")
    assert all(torch.equal(res.state_dict[k], v) for k, v in expected.items())


def test_expected_shapes_match_model_state_dict():
    """The one shape table (read off the model on the meta device) is the state-dict contract of a
    real model, for every preset used here; the importers check tensors against it."""
    from neoxt.model import Transformer
    from neoxt.model.shapes import parameter_shapes

    for arch in ("gptneox", "llama", "olmo3_gqa"):
        for tied in (False, True):
            cfg = model_config(arch, tied=tied) if arch == "llama" else model_config(arch)
            import dataclasses

            cfg = dataclasses.replace(cfg, padded_vocab_size=VOCAB)
            model_sd = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
            assert model_sd == parameter_shapes(cfg), arch


# ------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file and the tensor.


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_tp_shard_sequential(tmp_path):
    step = write_neox(hf_to_neox_shards(build_hf("llama"), "llama", 2), tmp_path / "n", "sequential")
    (step / "mp_rank_01_model_states.pt").unlink()
    cfg = model_config("llama")
    with pytest.raises(CheckpointError) as err:
        neox.read_neox_checkpoint(step, cfg, expected_tp=2)
    assert "mp_rank_01_model_states.pt" in _one_line(err)


def test_missing_tp_shard_pipeline(tmp_path):
    step = write_neox(hf_to_neox_shards(build_hf("llama"), "llama", 2), tmp_path / "n", "pipeline")
    (step / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        neox.read_neox_checkpoint(step, model_config("llama"))
    assert "layer_03-model_01-model_states.pt" in _one_line(err)


def test_missing_tensor_in_one_rank(tmp_path):
    ranks = hf_to_neox_shards(build_hf("llama"), "llama", 2)
    del ranks[1]["3.attention.dense.weight"]
    step = write_neox(ranks, tmp_path / "n", "pipeline")
    with pytest.raises(CheckpointError) as err:
        neox.read_neox_checkpoint(step, model_config("llama"))
    msg = _one_line(err)
    assert "layer_03-model_01-model_states.pt" in msg and "attention.dense.weight" in msg


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    ranks = hf_to_neox_shards(build_hf("llama"), "llama", 1)
    ranks[0]["2.mlp.linear2.weight"] = ranks[0]["2.mlp.linear2.weight"][:, :80].clone()
    step = write_neox(ranks, tmp_path / "n", "pipeline")
    with pytest.raises(CheckpointError) as err:
        neox.read_neox_checkpoint(step, model_config("llama"))
    msg = _one_line(err)
    assert "layer_02-model_00-model_states.pt" in msg and "2.mlp.linear2.weight" in msg


@pytest.mark.parametrize(
    ("change", "tensor"),
    [
        (dict(num_layers=3, attention_types=("global",) * 3), "num_layers=3"),
        (dict(intermediate_size=128), "mlp.linear1.weight"),
        (dict(num_kv_heads=4), "attention.query_key_value.weight"),
        (dict(no_weight_tying=False), "final_linear.weight"),
        (dict(norm="layernorm", use_bias_in_norms=True), "input_layernorm.weight"),
    ],
)
def test_config_not_matching_checkpoint(tmp_path, change, tensor):
    import dataclasses

    step = write_neox(hf_to_neox_shards(build_hf("llama"), "llama", 2), tmp_path / "n", "sequential")
    cfg = dataclasses.replace(model_config("llama"), **change)
    with pytest.raises(NeoxtError) as err:
        neox.read_neox_checkpoint(step, cfg)
    msg = _one_line(err)
    assert tensor in msg and str(step) in msg


def test_unknown_tensor_is_an_error(tmp_path):
    ranks = hf_to_neox_shards(build_hf("llama"), "llama", 1)
    ranks[0]["2.attention.mystery.weight"] = torch.zeros(3)
    step = write_neox(ranks, tmp_path / "n", "sequential")
    with pytest.raises(NeoxtError) as err:
        neox.read_neox_checkpoint(step, model_config("llama"))
    assert "2.attention.mystery.weight" in _one_line(err)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError) as err:
        neox.read_neox_checkpoint(tmp_path / "x", model_config("llama"))
    assert str(tmp_path / "x") in _one_line(err)


def test_import_failure_leaves_nothing_at_output(tmp_path):
    step = write_neox(hf_to_neox_shards(build_hf("llama"), "llama", 2), tmp_path / "n", "sequential")
    (step / "mp_rank_01_model_states.pt").unlink()
    out = tmp_path / "out"
    run = RunConfig(model=model_config("llama"))
    import dataclasses

    run = dataclasses.replace(run, parallelism=dataclasses.replace(run.parallelism, model_parallel_size=2))
    with pytest.raises(CheckpointError):
        neox.import_neox(step, run, out)
    assert not out.exists()


class LossScalerLike:
    """Stands in for a DeepSpeed class pickled into mp_rank files (needs the full unpickler)."""

    def __init__(self, scale: float):
        self.scale = scale


def test_engine_pickles_load_and_other_objects_need_trust(tmp_path, caplog, monkeypatch):
    """Plain DeepSpeed engine state (numpy RNG, Namespace) loads weights-only; a DeepSpeed object such as
    an fp16 optimizer's loss scaler is refused naming its class, and loads only with --trust-checkpoint."""
    import logging

    ranks = hf_to_neox_shards(build_hf("llama"), "llama", 1)
    step = write_neox(ranks, tmp_path / "a", "sequential")
    with caplog.at_level(logging.INFO, logger="neoxt"):
        neox.read_neox_checkpoint(step, model_config("llama"))  # numpy RNG + Namespace: weights-only path
    assert "without restriction" not in caplog.text

    mp = step / "mp_rank_00_model_states.pt"
    state = torch.load(mp, weights_only=False)
    state["loss_scaler"] = LossScalerLike(2.0)
    torch.save(state, mp)
    with pytest.raises(CheckpointError) as err:
        neox.read_neox_checkpoint(step, model_config("llama"))
    assert "mp_rank_00_model_states.pt" in _one_line(err) and "LossScalerLike" in _one_line(err)
    monkeypatch.setenv("NEOXT_TRUST_CHECKPOINT", "1")
    with caplog.at_level(logging.INFO, logger="neoxt"):
        res = neox.read_neox_checkpoint(step, model_config("llama"))
    assert "without restriction" in caplog.text and res.iteration == 7
    monkeypatch.delenv("NEOXT_TRUST_CHECKPOINT")

    step = write_neox(ranks, tmp_path / "b", "pipeline")
    layer = step / "layer_02-model_00-model_states.pt"
    torch.save({**torch.load(layer), "extra": LossScalerLike(1.0)}, layer)
    with pytest.raises(CheckpointError) as err:
        neox.read_neox_checkpoint(step, model_config("llama"))
    assert "layer_02-model_00-model_states.pt" in _one_line(err)
