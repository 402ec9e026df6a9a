"""neoxt -> GPT-NeoX export: files match upstream's layout, and export -> import is bit-exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_neox_import import build_hf, hf_to_neox_shards, model_config, write_neox

from neoxt.checkpoint.loading import read_checkpoint_model_state
from neoxt.config.schema import DataConfig, RunConfig
from neoxt.convert import neox, neox_tp
from neoxt.convert.neox_files import NeoxFiles
from neoxt.errors import NeoxtError
from neoxt.model import neox_names
from neoxt.model.shapes import parameter_shapes


def run_config(arch: str) -> RunConfig:
    return RunConfig(model=model_config(arch), data=DataConfig(seq_length=32))


def _neoxt_checkpoint(tmp_path: Path, arch: str, dtype=None) -> tuple[Path, object]:
    hf = build_hf(arch)
    step = write_neox(hf_to_neox_shards(hf, arch, 1), tmp_path / "src", "sequential", iteration=11)
    run = run_config(arch)
    out = neox.import_neox(step, run, tmp_path / "neoxt", dtype=dtype)
    assert out == tmp_path / "neoxt" / "global_step11"
    assert (tmp_path / "neoxt" / "latest").read_text().strip() == "global_step11"
    return out, hf


def _read_exported(step: Path, layout: str, tp: int) -> list[dict[str, torch.Tensor]]:
    """Exported files read back with plain torch.load, as GPT-NeoX/DeepSpeed would."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for r in range(tp):
        mp = torch.load(step / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)
        assert mp["iteration"] == 11 and mp["mp_world_size"] == tp and mp["args"]["model_parallel_size"] == tp
        if layout == "sequential":
            for k, v in mp["module"].items():
                assert k.startswith("sequential.")
                ranks[r][k[len("sequential."):]] = v
        else:
            assert mp["module"] is None
            for f in step.glob(f"layer_*-model_{r:02d}-model_states.pt"):
                idx = int(f.name[len("layer_"):].split("-")[0])
                for name, v in torch.load(f, weights_only=True).items():
                    ranks[r][f"{idx}.{name}"] = v
    return ranks


@pytest.mark.parametrize(
    ("arch", "layout", "tp"),
    [("gptneox", "sequential", 2), ("gptneox", "pipeline", 4), ("llama", "pipeline", 2),
     ("olmo3", "sequential", 4), ("olmo3_gqa", "pipeline", 2), ("gptneox_seq", "sequential", 1)],
)
def test_export_matches_upstream_layout_and_round_trips(tmp_path, arch, layout, tp):
    ckpt, hf = _neoxt_checkpoint(tmp_path, arch)
    exported = neox.export_neox(tmp_path / "neoxt", tmp_path / "back", model_parallel_size=tp, pipeline=(layout == "pipeline"))
    assert exported == tmp_path / "back" / "global_step11"
    assert (tmp_path / "back" / "latest").read_text().strip() == "global_step11"
    assert (exported / "configs" / "neoxt_export.yml").is_file()
    assert not list((tmp_path / "back").glob("*.tmp"))

    # The exported shards are exactly what upstream's own HF->NeoX mapping gives (written in the test).
    want = hf_to_neox_shards(hf, arch, tp)
    got = _read_exported(exported, layout, tp)
    for r in range(tp):
        want_r = {k: v for k, v in want[r].items() if "inv_freq" not in k and not (arch.startswith("olmo3") and "input_layernorm" in k)}
        assert set(got[r]) == set(want_r), r
        for k, v in want_r.items():
            assert torch.equal(got[r][k], v), (r, k)

    # ...and importing them gives back the identical neoxt checkpoint.
    cfg = neox.read_neox_checkpoint(exported, model_config(arch)).model
    again = neox.import_neox(exported, run_config(arch), tmp_path / "again")
    a = read_checkpoint_model_state(ckpt, cfg)
    b = read_checkpoint_model_state(again, cfg)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_bf16_all_layouts_bit_exact(tmp_path):
    ckpt, _ = _neoxt_checkpoint(tmp_path, "gptneox", dtype=torch.bfloat16)
    cfg = dataclasses.replace(model_config("gptneox"), padded_vocab_size=128)
    ref = read_checkpoint_model_state(ckpt, cfg)
    assert all(t.dtype == torch.bfloat16 for t in ref.values())
    for tp in (1, 2, 4):
        for pipeline in (False, True):
            name = f"tp{tp}{'p' if pipeline else 's'}"
            neox.export_neox(ckpt, tmp_path / name, model_parallel_size=tp, pipeline=pipeline)
            back = neox.import_neox(tmp_path / name, run_config("gptneox"), tmp_path / f"{name}-in")
            got = read_checkpoint_model_state(back, cfg)
            for k in ref:
                assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k]), (name, k)


def test_export_refuses_impossible_split_and_leaves_nothing(tmp_path):
    _neoxt_checkpoint(tmp_path, "llama")  # 2 kv heads cannot be split over 4 ranks
    with pytest.raises(NeoxtError) as err:
        neox.export_neox(tmp_path / "neoxt", tmp_path / "out", model_parallel_size=4)
    assert "num_kv_heads" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_import_refuses_nonempty_output(tmp_path):
    ckpt, _ = _neoxt_checkpoint(tmp_path, "llama")
    step = write_neox(hf_to_neox_shards(build_hf("llama"), "llama", 1), tmp_path / "src2", "pipeline")
    with pytest.raises(NeoxtError) as err:
        neox.import_neox(step, run_config("llama"), tmp_path / "neoxt")
    assert str(tmp_path / "neoxt") in str(err.value)
    assert (ckpt / "meta.json").is_file()  # the existing checkpoint is untouched


@pytest.mark.parametrize(
    "variant",
    [
        dict(gpt_j_residual=True, gpt_j_tied=True),
        dict(use_qk_layernorm=True),
        dict(use_qk_layernorm=True, norm="rmsnorm", use_bias_in_norms=False),
        dict(pos_emb="learned", no_weight_tying=False),
        dict(activation="geglu", intermediate_size=128),
        dict(num_kv_heads=1, activation="swiglu", intermediate_size=96),
    ],
)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mapping_round_trip_for_config_variants(variant, tp):
    """Our state dict -> GPT-NeoX shards -> merged -> ours is the identity, for every switch."""
    cfg = dataclasses.replace(model_config("gptneox"), padded_vocab_size=128, **variant)
    if cfg.num_kv_heads % tp:
        with pytest.raises(NeoxtError, match="num_kv_heads"):
            neox_tp.split_tp({}, cfg, tp)
        return
    g = torch.Generator().manual_seed(tp)
    sd = {k: torch.randn(s, generator=g) for k, s in parameter_shapes(cfg).items()}
    shards = neox_tp.split_tp(neox_names.neoxt_to_neox(sd, cfg), cfg, tp)
    files = NeoxFiles(Path("ckpt"), "sequential", tp)
    back = neox_names.neox_to_neoxt(neox_tp.merge_tp(shards, cfg, files), cfg, files)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    if cfg.gpt_j_tied:  # upstream still builds the second norm: exported, and ignored on import
        assert "2.post_attention_layernorm.weight" in shards[0]
