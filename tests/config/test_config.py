"""The config system: GPT-NeoX YAML files merge into one resolved RunConfig, and bad input names
the file and key."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neoxt.cli import main
from neoxt.config import config_from_dict, config_to_yaml, load_config
from neoxt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = REPO / "configs"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- resolving real-looking configs


def test_pythia_with_local_setup_and_text_generation():
    cfg = load_config([FIXTURES / "pythia-160m.yml", FIXTURES / "local_setup.yml", FIXTURES / "text_generation.yml"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads) == (12, 768, 12, 12)
    assert m.gpt_j_residual and m.no_weight_tying and m.rotary_pct == 0.25
    assert m.intermediate_size == 4 * 768
    assert m.attention_types == ("global",) * 12
    assert cfg.optimizer.lr == pytest.approx(6e-4)  # written 6e-4: a float, not a string
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.training.precision == "fp16" and cfg.training.initial_scale_power == 12
    assert cfg.training.train_batch_size == 64  # 32 micro × 2 accumulation × 1 data-parallel
    assert cfg.schedule.warmup_iters == 1430  # 0.01 × lr_decay_iters
    assert cfg.schedule.lr_decay_style == "cosine"
    assert cfg.parallelism.checkpoint_activations
    assert cfg.checkpoint.extra_save_iters[:3] == (0, 1, 2)
    assert cfg.data.data_path == "data/enwik8/enwik8_text_document"
    assert cfg.generation.text_gen_type == "input-file" and cfg.generation.maximum_tokens == 102


def test_llama_7b_with_model_parallel_and_sft():
    cfg = load_config([FIXTURES / "llama-7b.yml", FIXTURES / "sft.yml"], world_size=4)
    assert cfg.parallelism.model_parallel_size == 2
    assert cfg.training.data_parallel_size == 2
    assert cfg.training.gradient_accumulation_steps == 8  # 64 / (4 micro × 2 dp)
    assert cfg.model.norm == "rmsnorm" and cfg.model.activation == "swiglu"
    assert cfg.model.intermediate_size == 11008
    assert cfg.training.precision == "bf16"
    assert cfg.checkpoint.finetune and cfg.checkpoint.load == "checkpoints/converted"
    assert cfg.data.train_label_data_paths == ("data/sft/train_messages_label_document",)
    assert cfg.data.valid_label_data_paths == ("data/sft/valid_messages_label_document",)
    assert cfg.data.train_data_weights == (1.0,)


def test_dpo_config():
    cfg = load_config([FIXTURES / "llama-7b.yml", FIXTURES / "dpo.yml"], world_size=2)
    assert cfg.training.train_impl == "dpo" and cfg.training.dpo_beta == 0.01
    assert cfg.data.dataset_impl == "pairwise" and cfg.data.pack_impl == "unpacked"
    assert cfg.data.pos_train_data_paths == ("data/pairwise/llama3_dpo_train_chosen_document",)
    assert cfg.data.neg_train_label_data_paths == ("data/pairwise/llama3_dpo_train_rejected_label_document",)


def test_config_without_data_paths_resolves():
    cfg = load_config([CONFIGS / "tiny-neox.yml"])
    assert cfg.data.train_data_paths == () and cfg.data.data_path is None


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path, tmp_path: Path):
    cfg = load_config([path])
    assert cfg.source_files == (str(path),)
    assert load_config([write(tmp_path, "again.yml", config_to_yaml(cfg))]) == cfg


@pytest.mark.parametrize("model", ["tiny-neox.yml", "tiny-llama.yml", "tiny-olmo3.yml"])
def test_model_configs_combine_with_local_setup_and_generation(model: str):
    cfg = load_config([CONFIGS / model, CONFIGS / "local_setup.yml", CONFIGS / "text_generation.yml"])
    assert cfg.tokenizer.vocab_file == "runs/demo/data/tokenizer.json"
    assert cfg.generation.num_samples == 4


def test_olmo3_fork_keys_via_cli(capsys):
    assert main(["config", str(CONFIGS / "tiny-olmo3.yml"), str(CONFIGS / "local_setup.yml")]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["norm_placement"] == "olmo3"
    assert out["use_separate_qk_norms"] is True and out["use_qk_layernorm"] is False
    assert out["rms_norm_epsilon"] == 1e-6
    assert out["use_bias_in_attn_linear"] is False and out["use_bias_in_mlp"] is False
    assert out["use_bias_in_norms"] is False
    assert out["intermediate_size"] == 172
    assert out["no_weight_tying"] is True
    assert out["rotary_emb_base"] == 500000
    assert out["rotary_pct"] == 1.0 and out["pos_emb"] == "rotary"
    assert out["activation"] == "swiglu"
    assert out["sliding_window_width"] == 32
    assert out["attention_config"] == [[["sliding"], 3], [["global"], 1]]
    assert out["train_data_paths"] == ["runs/demo/data/demo_text_document"]


def test_dashes_and_underscores_mixed_across_files(tmp_path):
    a = write(tmp_path, "a.yml", '{"num-layers": 3, "hidden_size": 32, "num-attention-heads": 2}')
    b = write(tmp_path, "b.yml", '{"train-iters": 10, "seq_length": 16}')
    cfg = load_config([a, b], overrides=["lr_decay_style=constant", "train-micro-batch-size-per-gpu=2"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (3, 32, 2)
    assert cfg.training.train_iters == 10 and cfg.data.seq_length == 16
    assert cfg.schedule.lr_decay_style == "constant" and cfg.training.train_micro_batch_size_per_gpu == 2


def test_yaml_roundtrip_gives_equal_config(tmp_path):
    cfg = load_config([FIXTURES / "pythia-160m.yml", FIXTURES / "local_setup.yml"])
    again = load_config([write(tmp_path, "resolved.yml", config_to_yaml(cfg))])
    assert again == cfg
    olmo = load_config([CONFIGS / "tiny-olmo3.yml"])
    assert load_config([write(tmp_path, "olmo.yml", config_to_yaml(olmo))]) == olmo


# ---------------------------------------------------------------- derived values


def test_gated_mlp_width_follows_upstream_rule_without_intermediate_size():
    cfg = config_from_dict({"hidden_size": 64, "num_attention_heads": 4, "activation": "swiglu", "mlp_multiple_of": 32})
    # int(4·64·2/3) = 170 → linear1 rounded up to 192 (a multiple of 2·32); each branch 85 → 96.
    assert cfg.model.intermediate_size == 96


def test_upstream_prescaled_intermediate_size_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="neoxt.config"):
        cfg = config_from_dict({"hidden_size": 4096, "num_attention_heads": 32, "activation": "swiglu",
                                "intermediate_size": 32768, "mlp_multiple_of": 256})
    assert cfg.model.intermediate_size == 32768
    assert "intermediate_size: 11008" in caplog.text


def test_batch_triple_is_derived():
    cfg = config_from_dict({"train_batch_size": 32, "gradient_accumulation_steps": 4}, world_size=2)
    assert cfg.training.train_micro_batch_size_per_gpu == 4 and cfg.training.data_parallel_size == 2


def test_warmup_fraction_and_iterations():
    assert config_from_dict({"train_iters": 200, "warmup": 0.1}).schedule.warmup_iters == 20
    assert config_from_dict({"train_iters": 200, "warmup": 50}).schedule.warmup_iters == 50
    assert config_from_dict({"train_iters": 200, "lr_decay_fraction": 0.5, "warmup": 0.1}).schedule.warmup_iters == 10


def test_attention_config_patterns():
    cfg = config_from_dict({"num_layers": 4, "sliding_window_width": 8,
                            "attention_config": [[["sliding", "global"], "all"]]})
    assert cfg.model.attention_types == ("sliding", "global", "sliding", "global")


def test_deepspeed_keys_are_ignored_with_one_warning_line(caplog):
    with caplog.at_level(logging.WARNING, logger="neoxt.config"):
        load_config([FIXTURES / "pythia-160m.yml"])
    lines = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(lines) == 1
    assert "zero_optimization" in lines[0] and "bias-gelu-fusion" in lines[0]


# ---------------------------------------------------------------- errors


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "model.yml", '{"num_layers": 2, "hiden_size": 64}')
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert str(err.value) == f"config error: {path}: unknown key 'hiden_size' (did you mean 'hidden_size'?)"


def test_wrong_type_names_file_key_type_and_value(tmp_path):
    path = write(tmp_path, "model.yml", '{\n  "num_layers": "two",\n}')
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert str(err.value) == f"config error: {path}:2: num_layers: expected int, got 'two'"


def test_key_in_two_files_names_both_even_with_dash_and_underscore(tmp_path):
    a = write(tmp_path, "a.yml", '{"train-iters": 10}')
    b = write(tmp_path, "b.yml", '{"train_iters": 20}')
    with pytest.raises(ConfigError) as err:
        load_config([a, b])
    message = str(err.value)
    assert str(a) in message and str(b) in message and "train_iters" in message


def test_duplicate_key_inside_one_file(tmp_path):
    path = write(tmp_path, "a.yml", "num_layers: 2\nnum-layers: 3\n")
    with pytest.raises(ConfigError, match=r"a\.yml:2: key 'num-layers' is already set at line 1"):
        load_config([path])


def test_contradicting_batch_keys_name_all_three(tmp_path):
    a = write(tmp_path, "a.yml", '{"train_batch_size": 64}')
    b = write(tmp_path, "b.yml", '{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}')
    with pytest.raises(ConfigError) as err:
        load_config([a, b], world_size=1)
    message = str(err.value)
    for needle in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", str(a), str(b)):
        assert needle in message


def test_contradicting_precision_names_both(tmp_path):
    a = write(tmp_path, "a.yml", '{"precision": "fp32"}')
    b = write(tmp_path, "b.yml", '{"bf16": {"enabled": true}}')
    with pytest.raises(ConfigError) as err:
        load_config([a, b])
    assert "precision" in str(err.value) and "bf16.enabled" in str(err.value)
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_contradicting_lr_names_both(tmp_path):
    a = write(tmp_path, "a.yml", '{"optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}}}')
    b = write(tmp_path, "b.yml", '{"lr": 2.0e-3}')
    with pytest.raises(ConfigError, match=r"optimizer\.params\.lr = 0\.001 .*a\.yml.* contradicts lr = 0\.002 .*b\.yml"):
        load_config([a, b])


def test_unsupported_feature_is_an_error_naming_the_key(tmp_path):
    path = write(tmp_path, "mup.yml", '{"use_mup": true}')
    with pytest.raises(ConfigError, match=r"mup\.yml:1: use_mup: True is not supported"):
        load_config([path])


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yml", '{\n  "num_layers": 2,\n  "hidden_size": [1, \n}')
    with pytest.raises(ConfigError, match=r"bad\.yml:\d+: invalid YAML"):
        load_config([path])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config([tmp_path / "nope.yml"])


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    path = write(tmp_path, "bad.yml", '{"num_layers": 2, "hidden_szie": 64}')
    proc = subprocess.run([sys.executable, "-m", "neoxt.cli", "config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"config error: {path}: unknown key 'hidden_szie' (did you mean 'hidden_size'?)"]
    assert proc.stdout == ""


def test_cli_contradiction_exit_code_2(tmp_path, capsys):
    a = write(tmp_path, "a.yml", '{"seq_length": 4096, "max_position_embeddings": 2048}')
    assert main(["config", str(a)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_position_embeddings" in err and "seq_length" in err


def test_olmo3_fork_sets_both_qk_norm_flags():
    cfg = config_from_dict({"use_qk_layernorm": True, "use_separate_qk_norms": True, "norm": "rmsnorm"})
    assert cfg.model.use_separate_qk_norms and not cfg.model.use_qk_layernorm


def test_flash_layers_slide_when_a_window_is_set():
    cfg = config_from_dict({"num_layers": 2, "sliding_window_width": 16, "attention_config": [[["flash", "global"], 1]]})
    assert cfg.model.attention_types == ("sliding", "global")
    assert config_from_dict({"num_layers": 2, "attention_config": [[["flash"], 2]]}).model.attention_types == (
        "global", "global")
