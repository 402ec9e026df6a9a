"""Upstream GPT-NeoX's own configs resolve as GPT-NeoX resolves them (MLP width, warmup, decay_lr_to,
later-file-wins for dashed keys), dotted ``--set``, and the fork's ``neox_config.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from neoxt.cli import main
from neoxt.config import config_from_dict, load_config, model_only_yaml
from neoxt.errors import ConfigError
from neoxt.train.schedule import build_schedule

FIXTURES = Path(__file__).parent / "fixtures"
UPSTREAM = FIXTURES / "upstream"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def upstream_parallel_mlp(hidden: int, intermediate_size: int | None, multiple_of: int) -> tuple[int, int]:
    """(linear1 out, linear2 in) for a gated activation, transcribed from upstream's ParallelMLP.__init__
    (megatron/model/transformer.py): the test's own copy of the arithmetic, independent of neoxt's."""
    ffn_dim = intermediate_size if intermediate_size else 4 * hidden
    ffn_dim = int(ffn_dim * 2 / 3)
    ffn_dim_in = ffn_dim // 2
    ffn_dim = int((2 * multiple_of) * ((ffn_dim + (2 * multiple_of) - 1) // (2 * multiple_of)))
    ffn_dim_in = int(multiple_of * ((ffn_dim_in + multiple_of - 1) // multiple_of))
    return ffn_dim, ffn_dim_in


# file → (hidden, intermediate_size, mlp_multiple_of, upstream's linear1, upstream's linear2)
UPSTREAM_MLP = {
    "codellama-7B.yml": (4096, None, 256, 11264, 5632),
    "codellama-34B.yml": (8192, None, 256, 22016, 11008),
    "llama-7B.yml": (4096, 32768, 256, 22016, 11008),
    "llama-13B.yml": (5120, 40960, 256, 27648, 13824),
    "llama2-13B.yml": (5120, 41472, 256, 27648, 13824),
    "llama2-70B.yml": (8192, 86016, 256, 57344, 28672),
    "mistral-7B.yml": (4096, 14336, 1, 9558, 4778),  # 9558 ≠ 2·4778: upstream cannot run this file
}


@pytest.mark.parametrize("name", sorted(UPSTREAM_MLP))
def test_upstream_mlp_numbers_are_upstreams_arithmetic(name):
    hidden, inter, multiple, linear1, linear2 = UPSTREAM_MLP[name]
    assert upstream_parallel_mlp(hidden, inter, multiple) == (linear1, linear2)


@pytest.mark.parametrize("name", ["codellama-7B.yml", "codellama-34B.yml"])
def test_without_intermediate_size_width_equals_upstream(name):
    _, _, _, linear1, linear2 = UPSTREAM_MLP[name]
    cfg = load_config([UPSTREAM / name])
    assert cfg.model.intermediate_size == linear2 and 2 * cfg.model.intermediate_size == linear1
    assert name != "codellama-7B.yml" or cfg.model.intermediate_size == 5632


@pytest.mark.parametrize("name", ["llama-7B.yml", "llama-13B.yml", "llama2-13B.yml", "llama2-70B.yml", "mistral-7B.yml"])
def test_explicit_intermediate_size_is_per_branch_and_warns_with_upstreams_width(name, caplog):
    """The fork's convention (intermediate_size = each branch) is kept; the one warning line names
    the width upstream would build from the same file, Mistral's unrunnable sizing included."""
    _, inter, _, linear1, linear2 = UPSTREAM_MLP[name]
    with caplog.at_level(logging.WARNING, logger="neoxt.config"):
        cfg = load_config([UPSTREAM / name])
    assert cfg.model.intermediate_size == inter
    lines = [r.getMessage() for r in caplog.records if "intermediate_size" in r.getMessage()]
    assert len(lines) == 1 and str(UPSTREAM / name) in lines[0]
    if linear1 == 2 * linear2:
        assert f"would build a width of {linear2}" in lines[0] and f"set intermediate_size: {linear2}" in lines[0]
    else:
        assert f"linear1 {linear1} but linear2 {linear2} from it, which it cannot run" in lines[0]


def test_auto_width_upstream_cannot_build_is_refused():
    # h=128, SwiGLU, mlp_multiple_of 1: int(512·2/3) = 341 → linear1 342, linear2 170.
    with pytest.raises(ConfigError, match="linear1 to 342 but linear2 to 170"):
        config_from_dict({"hidden_size": 128, "num_attention_heads": 4, "activation": "swiglu"})


def test_intermediate_size_and_expansion_factor_are_exclusive():
    with pytest.raises(ConfigError, match="intermediate_size .* and expansion_factor .* both set"):
        config_from_dict({"hidden_size": 64, "intermediate_size": 128, "expansion_factor": 2})
    assert config_from_dict({"hidden_size": 64, "expansion_factor": 3}).model.intermediate_size == 192


# ---------------------------------------------------------------- later file wins for dashed keys


def test_pythia_with_docker_paths_resolves_later_file_wins(caplog):
    with caplog.at_level(logging.WARNING, logger="neoxt.config"):
        cfg = load_config([UPSTREAM / "pythia-14M.yml", UPSTREAM / "pythia-paths.yml"])
    pile = "/home/mchorse/data/pile_deduped/pile_0.87_deduped_text_document"
    assert cfg.data.train_data_paths == (pile,) and cfg.data.test_data_paths == (pile,)
    assert cfg.tokenizer.vocab_file == "/home/mchorse/data/tokenizers/20B_tokenizer.json"
    assert cfg.checkpoint.save == "/home/mchorse/chk/" and cfg.model.num_layers == 6
    assert "replacing 'vocab-file'" in caplog.text
    # An underscore-spelled tokenizer_type (configs/pythia/160M.yml) meets the later "tokenizer-type" too.
    cfg = load_config([FIXTURES / "pythia-160m.yml", UPSTREAM / "pythia-paths.yml"])
    assert cfg.tokenizer.tokenizer_type == "HFTokenizer" and cfg.data.valid_data_paths == (pile,)


def test_later_dashed_key_wins_but_later_underscored_key_clashes(tmp_path):
    a = write(tmp_path, "a.yml", '{"train_iters": 10, "seq-length": 16}')
    b = write(tmp_path, "b.yml", '{"train-iters": 20, "seq-length": 32}')
    cfg = load_config([a, b])
    assert cfg.training.train_iters == 20 and cfg.data.seq_length == 32
    c = write(tmp_path, "c.yml", '{"seq_length": 64}')
    with pytest.raises(ConfigError, match=r"c\.yml: key 'seq_length' is already set in .*b\.yml \(as 'seq-length'\)"):
        load_config([a, b, c])


# ---------------------------------------------------------------- schedule keys


def test_fractional_warmup_as_upstream():
    cfg = config_from_dict({"train_iters": 150, "warmup": 0.01, "lr": 1.0, "lr_decay_style": "linear"})
    assert cfg.schedule.warmup_iters == pytest.approx(1.5)
    sched = build_schedule(cfg.schedule, cfg.optimizer.lr, cfg.training.train_iters)
    # AnnealingLR: step 1 is still warmup (1 <= 1.5) at lr·1/1.5; step 2 decays linearly from 1.5.
    assert sched.lr_at(1) == pytest.approx(1 / 1.5)
    assert sched.lr_at(2) == pytest.approx((148.5 - 0.5) / 148.5)


def test_warmup_above_one_is_iterations_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="neoxt.config"):
        assert config_from_dict({"train_iters": 200, "warmup": 50}).schedule.warmup_iters == 50
    assert "warmup_iters" in caplog.text


def test_decay_lr_to_sets_the_final_learning_rate():
    # configs/llemma/7B.yml: lr 1e-4, cosine, decay_lr_to 0.033 (its 34B sibling writes min_lr = 0.033·lr).
    keys = {"lr": 1e-4, "train_iters": 100, "lr_decay_iters": 100, "lr_decay_style": "cosine", "warmup_iters": 5}
    cfg = config_from_dict({**keys, "decay_lr_to": 0.033})
    assert cfg.schedule.min_lr == pytest.approx(3.3e-6)
    sched = build_schedule(cfg.schedule, cfg.optimizer.lr, cfg.training.train_iters)
    assert sched.lr_at(100) == pytest.approx(3.3e-6)
    with pytest.raises(ConfigError, match="decay_lr_to .* and min_lr .* keep one"):
        config_from_dict({**keys, "decay_lr_to": 0.1, "min_lr": 1e-6})
    with pytest.raises(ConfigError, match="between 0 and 1"):
        config_from_dict({**keys, "decay_lr_to": 2})


# ---------------------------------------------------------------- dotted --set


def test_dotted_set_reaches_into_nested_blocks():
    cfg = load_config([FIXTURES / "pythia-160m.yml"], ["optimizer.params.lr=1e-3", "fp16.initial_scale_power=10"])
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.optimizer.betas == (0.9, 0.95)  # the rest of the block is kept
    assert cfg.training.initial_scale_power == 10 and cfg.training.precision == "fp16"
    cfg = load_config([], ["optimizer.params.lr=2e-3", "optimizer.type=sgd"])  # blocks created on demand
    assert cfg.optimizer.lr == pytest.approx(2e-3) and cfg.optimizer.optimizer_type == "sgd"


def test_dotted_set_into_a_plain_value_is_an_error(tmp_path):
    path = write(tmp_path, "a.yml", '{"train_iters": 10}')
    with pytest.raises(ConfigError, match="'train_iters' is not a block"):
        load_config([path], ["train_iters.x=3"])
    with pytest.raises(ConfigError, match="unknown optimizer parameter 'lrr'"):
        load_config([FIXTURES / "pythia-160m.yml"], ["optimizer.params.lrr=1e-3"])


# ---------------------------------------------------------------- the fork's neox_config.json, model-only snippets


def fork_neox_config() -> dict:
    """What the fork's huggingface/convert_hf_olmo_to_neox.py writes for an OLMo-3-shaped model."""
    return {
        "hidden_size": 64, "num_layers": 4, "num_attention_heads": 4, "num_kv_heads": 2, "seq_length": 128,
        "max_position_embeddings": 256, "vocab_size": 320, "intermediate_size": 172, "norm": "rmsnorm",
        "norm_placement": "olmo3", "use_qk_layernorm": True, "use_separate_qk_norms": True,
        "rms_norm_epsilon": 1e-6, "activation": "swiglu", "use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
        "use_bias_in_norms": False, "pos_emb": "rotary", "rotary_pct": 1.0, "rotary_emb_base": 500000,
        "sliding_window_width": None, "no_weight_tying": True, "precision": "bfloat16",
        "attention_config": [["flash"], 4],
    }


def test_fork_neox_config_json_is_a_config_file(tmp_path, capsys):
    path = write(tmp_path, "neox_config.json", json.dumps(fork_neox_config(), indent=2))
    assert main(["config", str(path)]) == 0 and "padded_vocab_size: 320" in capsys.readouterr().out
    cfg = load_config([path])
    m = cfg.model
    assert m.padded_vocab_size == 320 and m.intermediate_size == 172 and m.attention_types == ("global",) * 4
    assert m.norm_placement == "olmo3" and m.use_separate_qk_norms and m.num_kv_heads == 2
    assert cfg.training.precision == "bf16" and cfg.data.seq_length == 128


def test_model_only_snippet_merges_with_an_sft_config(tmp_path):
    source = load_config([write(tmp_path, "neox_config.json", json.dumps(fork_neox_config()))])
    snippet = write(tmp_path, "neox_config.yml", model_only_yaml(source))
    sft = write(tmp_path, "sft.yml", (FIXTURES / "sft.yml").read_text().replace(
        "{", '{\n  "seq_length": 64, "hidden_dropout": 0.1, "init_method": "small_init", "precision": "bfloat16",\n'
        '  "optimizer": {"type": "Adam", "params": {"lr": 1.0e-5}}, "train_iters": 30,', 1))
    cfg = load_config([snippet, sft])
    assert cfg.model == source.model.__class__(**{
        **source.model.__dict__, "hidden_dropout": 0.1, "init_method": "small_init"})
    assert cfg.optimizer.lr == pytest.approx(1e-5) and cfg.checkpoint.finetune and cfg.data.seq_length == 64
    # A full config.yml written the same way would clash on the training keys.
    text = snippet.read_text()
    assert "optimizer" not in text and "train_iters" not in text and "seq_length" not in text


def test_warmup_below_one_iteration_never_exceeds_lr():
    """Upstream would run the first of 8 steps at lr / 0.08 = 12.5·lr; neoxt caps warmup at lr."""
    cfg = config_from_dict({"train_iters": 8, "lr": 1.0, "lr_decay_style": "linear"})
    assert cfg.schedule.warmup_iters == pytest.approx(0.08)
    sched = build_schedule(cfg.schedule, cfg.optimizer.lr, cfg.training.train_iters)
    assert sched.lr_at(0) == pytest.approx(1.0)
    assert sched.lr_at(1) == pytest.approx((7.92 - 0.92) / 7.92)  # upstream's decay from the fractional warmup
