"""GPT-NeoX Mamba layers and MoE MLPs, both directions.

Expected GPT-NeoX names and shapes are written out here from GPT-NeoX's module tree
(``megatron/model/mamba/mamba.py``: ``ParallelMambaResidualLayer.norm`` / ``.mixer.{in_proj, conv1d,
x_proj, dt_proj, A_log, D, out_proj}``; ``moe.py``/``moe_mlp.py``/``router.py``: ``mlp.router.layer``,
``mlp.experts.mlp.{w1, w2}`` [E*F, H]), never derived from the converter under test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_neox_import import our_logits, write_neox
from test_neox_roundtrip import _read_exported

from neoxt.checkpoint.loading import read_checkpoint_model_state
from neoxt.cli import main
from neoxt.config import load_config
from neoxt.config.schema import CheckpointConfig, DataConfig, ModelConfig, RunConfig
from neoxt.convert import neox
from neoxt.convert.neox_load import import_load_on_the_fly
from neoxt.errors import ConversionError, NeoxtError
from neoxt.model import Transformer
from neoxt.model.shapes import parameter_shapes

H, V, HEADS = 32, 64, 4
D_INNER, DT_RANK, D_STATE = 48, 2, 16  # dt_rank = ceil(32 / 16)
E, FF = 4, 48  # experts, each expert's width (intermediate_size)


def mamba_config(norm: str = "rmsnorm", **kw) -> ModelConfig:
    """Hybrid: Mamba, attention, Mamba."""
    base = dict(
        num_layers=3, hidden_size=H, num_attention_heads=HEADS, num_kv_heads=HEADS, max_position_embeddings=64,
        attention_types=("mamba", "global", "mamba"), intermediate_size=64, norm=norm,
        use_bias_in_norms=(norm == "layernorm"), activation="gelu", use_bias_in_attn_linear=False,
        use_bias_in_mlp=False, no_weight_tying=True, mamba_d_inner=D_INNER, padded_vocab_size=V,
    )
    return ModelConfig(**{**base, **kw})


def moe_config(**kw) -> ModelConfig:
    """Layer 0 MoE (upstream's rule: layer % moe_expert_interval == 0), layer 1 dense; GPT-NeoX-style biases."""
    base = dict(
        num_layers=2, hidden_size=H, num_attention_heads=HEADS, num_kv_heads=HEADS, max_position_embeddings=64,
        attention_types=("global", "global"), intermediate_size=FF, norm="layernorm", activation="gelu",
        no_weight_tying=True, padded_vocab_size=V, moe_num_experts=E, moe_top_k=2, moe_router_type="topk",
        moe_expert_interval=2,
    )
    return ModelConfig(**{**base, **kw})


def _attention_layer(idx: int, g: str, norm_bias: bool) -> dict[str, tuple[int, ...]]:
    out = {f"{idx}.input_layernorm.{g}": (H,), f"{idx}.post_attention_layernorm.{g}": (H,),
           f"{idx}.attention.query_key_value.weight": (3 * H, H), f"{idx}.attention.dense.weight": (H, H)}
    if norm_bias:
        out.update({f"{idx}.input_layernorm.bias": (H,), f"{idx}.post_attention_layernorm.bias": (H,)})
    return out


def mamba_layer_names(idx: int, g: str) -> dict[str, tuple[int, ...]]:
    """One ``ParallelMambaResidualLayer`` (d_inner 48, mamba_use_bias_in_conv on)."""
    return {
        f"{idx}.norm.{g}": (H,), f"{idx}.mixer.in_proj.weight": (2 * D_INNER, H),
        f"{idx}.mixer.conv1d.weight": (D_INNER, 1, 4), f"{idx}.mixer.conv1d.bias": (D_INNER,),
        f"{idx}.mixer.x_proj.weight": (DT_RANK + 2 * D_STATE, D_INNER),
        f"{idx}.mixer.dt_proj.weight": (D_INNER, DT_RANK), f"{idx}.mixer.dt_proj.bias": (D_INNER,),
        f"{idx}.mixer.A_log": (D_INNER, D_STATE), f"{idx}.mixer.D": (D_INNER,),
        f"{idx}.mixer.out_proj.weight": (H, D_INNER),
    }


def expected_mamba_names(norm: str) -> dict[str, tuple[int, ...]]:
    """GPT-NeoX's TP-1 tensors for ``mamba_config(norm)``: layers at 2..4, final norm 6, final_linear 7."""
    g = "scale" if norm == "rmsnorm" else "weight"
    out = {"0.word_embeddings.weight": (V, H), f"6.norm.{g}": (H,), "7.final_linear.weight": (V, H)}
    for idx in (2, 4):
        out.update(mamba_layer_names(idx, g))
        if norm == "layernorm":
            out[f"{idx}.norm.bias"] = (H,)
    out.update(_attention_layer(3, g, norm == "layernorm"))
    out.update({"3.mlp.linear1.weight": (64, H), "3.mlp.linear2.weight": (H, 64)})
    if norm == "layernorm":
        out["6.norm.bias"] = (H,)
    return out


def expected_moe_names(tp: int = 1) -> dict[str, tuple[int, ...]]:
    """GPT-NeoX's tensors of one TP rank for ``moe_config()``: MoE layer at 2, dense at 3, norm 5, linear 6."""
    out = {"0.word_embeddings.weight": (V // tp, H), "5.norm.weight": (H,), "5.norm.bias": (H,),
           "6.final_linear.weight": (V // tp, H)}
    for idx in (2, 3):
        out.update({f"{idx}.input_layernorm.weight": (H,), f"{idx}.input_layernorm.bias": (H,),
                    f"{idx}.post_attention_layernorm.weight": (H,), f"{idx}.post_attention_layernorm.bias": (H,),
                    f"{idx}.attention.query_key_value.weight": (3 * H // tp, H),
                    f"{idx}.attention.query_key_value.bias": (3 * H // tp,),
                    f"{idx}.attention.dense.weight": (H, H // tp), f"{idx}.attention.dense.bias": (H,)})
    out.update({"2.mlp.router.layer.weight": (E, H),
                "2.mlp.experts.mlp.w1": (E // tp * FF, H), "2.mlp.experts.mlp.w2": (E // tp * FF, H),
                "3.mlp.linear1.weight": (FF // tp, H), "3.mlp.linear1.bias": (FF // tp,),
                "3.mlp.linear2.weight": (H, FF // tp), "3.mlp.linear2.bias": (H,)})
    return out


def _random_sd(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in parameter_shapes(cfg).items()}


def _neoxt_run(tmp_path: Path, cfg: ModelConfig, name: str = "run") -> tuple[Path, dict[str, torch.Tensor]]:
    sd = _random_sd(cfg)
    run = RunConfig(model=cfg, data=DataConfig(seq_length=32))
    neox.write_neoxt_checkpoint(tmp_path / name, 11, sd, run, {"consumed_tokens": 0})
    return tmp_path / name, sd


def _tokens() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def _round_trip(tmp_path: Path, cfg: ModelConfig, expected: list[dict], layout: str) -> None:
    run, sd = _neoxt_run(tmp_path, cfg)
    tp = len(expected)
    step = neox.export_neox(run, tmp_path / "neox", model_parallel_size=tp, pipeline=(layout == "pipeline"))
    got = _read_exported(step, layout, tp)
    for r in range(tp):
        assert {k: tuple(v.shape) for k, v in got[r].items()} == expected[r], r
    back = neox.import_neox(step, RunConfig(model=cfg, data=DataConfig(seq_length=32)), tmp_path / "back")
    again = read_checkpoint_model_state(back, cfg)
    assert set(again) == set(sd)
    for k in sd:
        assert again[k].dtype == sd[k].dtype and torch.equal(again[k], sd[k]), k
    torch.testing.assert_close(our_logits(again, cfg, _tokens()), our_logits(sd, cfg, _tokens()), rtol=0, atol=0)


@pytest.mark.parametrize(("norm", "layout"), [("rmsnorm", "sequential"), ("layernorm", "pipeline")])
def test_mamba_hybrid_exports_gpt_neox_names_and_round_trips(tmp_path, norm, layout):
    _round_trip(tmp_path, mamba_config(norm), [expected_mamba_names(norm)], layout)


@pytest.mark.parametrize(("layout", "tp"), [("sequential", 1), ("pipeline", 1), ("sequential", 2), ("pipeline", 2)])
def test_moe_exports_gpt_neox_names_and_round_trips(tmp_path, layout, tp):
    _round_trip(tmp_path, moe_config(), [expected_moe_names(tp)] * tp, layout)


def test_moe_tp2_export_puts_whole_experts_on_each_rank(tmp_path):
    run, sd = _neoxt_run(tmp_path, moe_config())
    step = neox.export_neox(run, tmp_path / "neox", model_parallel_size=2)
    up, down, router = (sd[f"layers.0.mlp.{n}"] for n in ("experts.up", "experts.down", "router.weight"))
    for r in range(2):
        module = torch.load(step / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)["module"]
        w1, w2 = module["sequential.2.mlp.experts.mlp.w1"], module["sequential.2.mlp.experts.mlp.w2"]
        for j in range(E // 2):  # rank r's j-th expert is expert r*E/2 + j; w2 holds each expert's down.T
            e = r * E // 2 + j
            assert torch.equal(w1[j * FF:(j + 1) * FF], up[e])
            assert torch.equal(w2[j * FF:(j + 1) * FF], down[e].t())
        assert torch.equal(module["sequential.2.mlp.router.layer.weight"], router)


# ------------------------------------------------------------------------------------------------
# Import of hand-built GPT-NeoX tensors: where each value lands, and GPT-NeoX's forward by hand.


def _hand_built(names: dict[str, tuple[int, ...]], seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in names.items()}


def _gpt_neox_tp2(full: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split as GPT-NeoX's mpu layers hold them (MHA, no gpt_j_residual): column-parallel on dim 0,
    row-parallel weights on dim 1, everything else (norms, row biases, the router) on every rank."""
    column = ("word_embeddings.weight", "final_linear.weight", "query_key_value.weight", "query_key_value.bias",
              "linear1.weight", "linear1.bias", "experts.mlp.w1", "experts.mlp.w2")
    row = ("attention.dense.weight", "linear2.weight")
    ranks: list[dict[str, torch.Tensor]] = [{}, {}]
    for k, t in full.items():
        parts = t.chunk(2, 0) if k.endswith(column) else t.chunk(2, 1) if k.endswith(row) else (t, t)
        for r in range(2):
            ranks[r][k] = parts[r].clone()
    return ranks


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize(("router", "k", "score"), [("topk", 2, "softmax"), ("sinkhorn", 1, "sigmoid")])
def test_hand_built_moe_lands_where_gpt_neox_computes_it(tmp_path, tp, router, k, score):
    cfg = moe_config(moe_router_type=router, moe_top_k=k, moe_score_func=score)
    full = _hand_built(expected_moe_names())
    shards = [full] if tp == 1 else _gpt_neox_tp2(full)
    step = write_neox(shards, tmp_path / "src", "sequential")
    sd = neox.read_neox_checkpoint(step, cfg).state_dict
    w1, w2, R = full["2.mlp.experts.mlp.w1"], full["2.mlp.experts.mlp.w2"], full["2.mlp.router.layer.weight"]
    assert torch.equal(sd["layers.0.mlp.router.weight"], R)
    assert sd["layers.0.mlp.experts.up"][3, 5, 7] == w1[3 * FF + 5, 7]
    assert sd["layers.0.mlp.experts.down"][3, 7, 5] == w2[3 * FF + 5, 7]
    assert torch.equal(sd["layers.1.mlp.up.weight"], full["3.mlp.linear1.weight"])

    # GPT-NeoX's MoE forward, from router.py and moe_mlp.py (eval: plain top-k of the scores).
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=True)
    h = torch.randn(10, H, generator=torch.Generator().manual_seed(2))
    logits = h @ R.t()
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    weights, chosen = scores.topk(k, dim=-1)
    want = torch.zeros(10, H)
    for n in range(10):
        for j in range(k):
            e = int(chosen[n, j])
            want[n] += weights[n, j] * (F.gelu(h[n] @ w1[e * FF:(e + 1) * FF].t()) @ w2[e * FF:(e + 1) * FF])
    with torch.no_grad():
        got = model.eval().layers[0].mlp(h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hand_built_mamba_lands_in_the_same_names(tmp_path):
    cfg = mamba_config()
    full = _hand_built(expected_mamba_names("rmsnorm"))
    step = write_neox([full], tmp_path / "src", "pipeline")
    sd = neox.read_neox_checkpoint(step, cfg).state_dict
    for ours, theirs in (("layers.0.norm.weight", "2.norm.scale"), ("layers.2.mixer.in_proj.weight", "4.mixer.in_proj.weight"),
                         ("layers.0.mixer.x_proj.weight", "2.mixer.x_proj.weight"), ("layers.2.mixer.A_log", "4.mixer.A_log"),
                         ("layers.0.mixer.conv1d.bias", "2.mixer.conv1d.bias"), ("layers.1.attn_norm.weight", "3.input_layernorm.scale"),
                         ("final_norm.weight", "6.norm.scale"), ("lm_head.weight", "7.final_linear.weight")):
        assert torch.equal(sd[ours], full[theirs]), ours
    # GPT-NeoX's mixer forward, from mamba.py (unfused path, selective_scan_ref's recurrence).
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=True)
    h = torch.randn(1, 6, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model.eval().layers[0].mixer(h, None, None)
    t = {k.split("mixer.", 1)[1]: v for k, v in full.items() if k.startswith("2.mixer.")}
    x, z = (h[0] @ t["in_proj.weight"].t()).t().chunk(2, dim=0)  # [d_inner, L] each: [x | z]
    x = F.silu(F.conv1d(x[None], t["conv1d.weight"], t["conv1d.bias"], padding=3, groups=D_INNER)[0, :, :6])
    dt, B, C = torch.split(x.t() @ t["x_proj.weight"].t(), [DT_RANK, D_STATE, D_STATE], dim=-1)
    delta = F.softplus(t["dt_proj.weight"] @ dt.t() + t["dt_proj.bias"][:, None])  # [d_inner, L]
    A = -torch.exp(t["A_log"])
    state, ys = torch.zeros(D_INNER, D_STATE), []
    for i in range(6):
        state = torch.exp(delta[:, i, None] * A) * state + delta[:, i, None] * B[i] * x[:, i, None]
        ys.append(state @ C[i] + t["D"] * x[:, i])
    y = torch.stack(ys, 1) * F.silu(z)
    torch.testing.assert_close(got[0], y.t() @ t["out_proj.weight"].t(), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# What cannot be represented exactly is refused in one line.


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        (mamba_config(attention_types=("mamba2", "global", "mamba"), mamba_headdim=16), "Mamba-1 only"),
        (mamba_config(mamba_d_state=8), "d_state 16"),
        (mamba_config(mamba_use_bias_in_linears=True), "x_proj a bias"),
        (moe_config(activation="swiglu"), "ungated"),
        (moe_config(moe_num_shared_experts=1), "shared experts"),
        (moe_config(moe_norm_topk_prob=True), "renormalise"),
        (moe_config(moe_token_dropping=True), "dropless"),
        (moe_config(moe_router_type="sinkhorn", moe_top_k=1), "sigmoid"),
        (moe_config(moe_layers=(1,)), "moe_expert_interval"),
        (moe_config(gpt_j_residual=True), "drops the attention output"),
    ],
)
def test_unrepresentable_configs_are_refused_both_ways(tmp_path, cfg, words):
    run = RunConfig(model=cfg, data=DataConfig(seq_length=32))
    neox.write_neoxt_checkpoint(tmp_path / "run", 11, _random_sd(cfg), run, {})
    with pytest.raises(ConversionError) as err:
        neox.export_neox(tmp_path / "run", tmp_path / "out")
    assert words in _one_line(err)
    assert not (tmp_path / "out").exists()
    step = write_neox([{"0.word_embeddings.weight": torch.zeros(V, H)}], tmp_path / "src", "sequential")
    with pytest.raises(ConversionError) as err:
        neox.read_neox_checkpoint(step, cfg)
    assert words in _one_line(err)


def test_mamba_at_tp2_is_refused_both_ways(tmp_path):
    run, _ = _neoxt_run(tmp_path, mamba_config())
    with pytest.raises(NeoxtError) as err:
        neox.export_neox(run, tmp_path / "out", model_parallel_size=2)
    assert "parallel_output" in _one_line(err) and not (tmp_path / "out").exists()
    full = _hand_built(expected_mamba_names("rmsnorm"))
    step = write_neox([full, full], tmp_path / "src", "sequential")
    with pytest.raises(NeoxtError) as err:
        neox.read_neox_checkpoint(step, mamba_config())
    assert "only TP 1" in _one_line(err)


def test_moe_te_layout_and_odd_expert_split_are_refused(tmp_path):
    run, _ = _neoxt_run(tmp_path, moe_config())
    with pytest.raises(NeoxtError) as err:
        neox.export_neox(run, tmp_path / "out", te_layout=True)
    assert "Transformer Engine" in _one_line(err)
    cfg3 = moe_config(moe_num_experts=3)
    run3, _ = _neoxt_run(tmp_path, cfg3, "run3")
    with pytest.raises(NeoxtError) as err:
        neox.export_neox(run3, tmp_path / "out3", model_parallel_size=2)
    assert "moe_num_experts=3" in _one_line(err) and not (tmp_path / "out3").exists()


def test_expert_width_mismatch_names_the_tensor(tmp_path):
    full = _hand_built(expected_moe_names())
    step = write_neox([full], tmp_path / "src", "sequential")
    with pytest.raises(NeoxtError) as err:
        neox.read_neox_checkpoint(step, moe_config(intermediate_size=32, moe_intermediate_size=32))
    msg = _one_line(err)
    assert "2.mlp.experts.mlp.w1" in msg and "expert width of 48" in msg


def test_mamba_width_mismatch_says_which_key_to_set(tmp_path):
    step = write_neox([_hand_built(expected_mamba_names("rmsnorm"))], tmp_path / "src", "sequential")
    with pytest.raises(NeoxtError) as err:
        neox.read_neox_checkpoint(step, mamba_config(mamba_d_inner=None))  # a hybrid: 2 x hidden here
    msg = _one_line(err)
    assert "2.mixer.in_proj.weight" in msg and "set mamba_d_inner: 48" in msg


def test_load_imports_a_gpt_neox_moe_checkpoint_on_the_fly(tmp_path):
    run, sd = _neoxt_run(tmp_path, moe_config())
    neox.export_neox(run, tmp_path / "neox", model_parallel_size=2, pipeline=True)
    cfg = RunConfig(model=dataclasses.replace(moe_config(), padded_vocab_size=None), data=DataConfig(seq_length=32),
                    checkpoint=CheckpointConfig(load=str(tmp_path / "neox")))
    said: list[str] = []
    new = import_load_on_the_fly(cfg, tmp_path / "work", said.append)
    assert new.checkpoint.finetune and "GPT-NeoX" in said[0]
    got = read_checkpoint_model_state(Path(new.checkpoint.load) / "global_step0", moe_config())
    for k in sd:
        assert torch.equal(got[k], sd[k]), k


def test_gpt_neox_moe_config_reads_its_router_weighting(tmp_path):
    (tmp_path / "a.yml").write_text('{"moe_num_experts": 8, "num_layers": 2}')  # upstream defaults: sinkhorn, top 1
    (tmp_path / "b.yml").write_text('{"moe_num_experts": 8, "num_layers": 2, "moe_top_k": 2}')
    (tmp_path / "c.yml").write_text('{"moe_num_experts": 8, "num_layers": 2, "moe_router_type": "topk"}')
    (tmp_path / "d.yml").write_text('{"num_layers": 2}')
    got = [load_config([tmp_path / f"{n}.yml"]).model.moe_score_func for n in "abcd"]
    assert got == ["sigmoid", "softmax", "softmax", "softmax"]


# ------------------------------------------------------------------------------------------------
# Through the CLI, with GPT-NeoX's own config keys (configs/mamba/*.yml, configs/125M-dmoe.yml, tiny).

MAMBA_YML = """{"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
 "max_position_embeddings": 64, "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-5, "attention_config": [[["mamba"], 2]],
 "intermediate_size": 48, "activation": "silu", "no_weight_tying": true, "mamba_inner_func_fusion": true,
 "pipe_parallel_size": 0, "model_parallel_size": 1, "train_micro_batch_size_per_gpu": 4, "train_iters": 10}
"""

DMOE_YML = """{"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
 "max_position_embeddings": 64, "norm": "layernorm", "pos_emb": "rotary", "no_weight_tying": true,
 "gpt_j_residual": false, "moe_num_experts": 4, "moe_expert_interval": 2, "intermediate_size": 48,
 "pipe_parallel_size": 1, "model_parallel_size": 2, "train_micro_batch_size_per_gpu": 4, "train_iters": 10}
"""


def test_cli_imports_gpt_neox_mamba_and_dmoe_configs(tmp_path, capsys):
    pure = {"0.word_embeddings.weight": (V, H), "5.norm.scale": (H,), "6.final_linear.weight": (V, H),
            **mamba_layer_names(2, "scale"), **mamba_layer_names(3, "scale")}
    cases = (("mamba", MAMBA_YML, [_hand_built(pure)], "sequential"),
             ("dmoe", DMOE_YML, _gpt_neox_tp2(_hand_built(expected_moe_names())), "pipeline"))
    for name, yml, shards, layout in cases:
        (tmp_path / f"{name}.yml").write_text(yml)
        step = write_neox(shards, tmp_path / f"{name}-neox", layout)
        out = tmp_path / f"{name}-run"
        assert main(["convert", "neox-to-neoxt", "--input-dir", str(step), "--config", str(tmp_path / f"{name}.yml"),
                     "--output-dir", str(out)]) == 0, capsys.readouterr().err
        cfg = load_config([out / "config.yml"]).model
        sd = read_checkpoint_model_state(out / "global_step7", cfg)
        if name == "mamba":
            assert cfg.attention_types == ("mamba", "mamba") and cfg.mamba_inner == D_INNER
            assert torch.equal(sd["layers.1.mixer.x_proj.weight"], shards[0]["3.mixer.x_proj.weight"])
        else:  # upstream's defaults: sinkhorn router, top 1, weighted by sigmoid
            assert (cfg.moe_router_type, cfg.moe_top_k, cfg.moe_score_func) == ("sinkhorn", 1, "sigmoid")
            w1 = torch.cat([shards[0]["2.mlp.experts.mlp.w1"], shards[1]["2.mlp.experts.mlp.w1"]])
            assert torch.equal(sd["layers.0.mlp.experts.up"], w1.reshape(E, FF, H))
    (tmp_path / "bad.yml").write_text(DMOE_YML.replace('"norm": "layernorm"', '"activation": "swiglu", "norm": "layernorm"'))
    capsys.readouterr()
    assert main(["convert", "neox-to-neoxt", "--input-dir", str(tmp_path / "dmoe-neox"), "--config",
                 str(tmp_path / "bad.yml"), "--output-dir", str(tmp_path / "bad")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("neoxt:")]
    assert len(err) == 1 and "ungated" in err[0] and not (tmp_path / "bad").exists()
