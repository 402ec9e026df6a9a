"""Issue 12, "Why" item 9: names read from files or flags are names, never paths or commands.
`latest` naming another run, a safetensors index pointing outside its directory, an eval-suite alias
`..`, and `--env 'X=$(cmd)'` in a generated sbatch script."""

from __future__ import annotations

import json
import subprocess

import torch

from neoxt.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("neoxt:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_latest_naming_another_run_is_refused(tmp_path, capsys):
    from neoxt.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "other_run", 60, {"model": {"w": torch.ones(2)}}, "")
    run = tmp_path / "runs" / "mine"
    save_checkpoint(run, 2, {"model": {"w": torch.zeros(2)}}, "")
    (run / "latest").write_text("../../other_run/global_step60\n")
    assert main(["convert", "inspect", str(run)]) == 2
    line = _error_line(capsys)
    assert f"{run / 'latest'}: names '../../other_run/global_step60'" in line
    config = tmp_path / "train.yml"
    config.write_text(f"num_layers: 1\nhidden_size: 8\nnum_attention_heads: 2\nseq_length: 8\ntrain_iters: 1\n"
                      f"padded_vocab_size: 16\nsave: {run}\n")
    assert main(["train", str(config)]) == 2
    assert "expected a global_step<N>" in _error_line(capsys)


def test_gpt_neox_latest_tag_with_a_path_is_refused(tmp_path, capsys):
    save = tmp_path / "neox"
    save.mkdir()
    (save / "latest").write_text("../elsewhere")
    assert main(["convert", "inspect", str(save)]) == 2
    assert "not a directory name" in _error_line(capsys)


def test_safetensors_index_entry_outside_the_directory_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file
    from test_neox_import import build_hf

    hf_dir = tmp_path / "hf"
    build_hf("llama").save_pretrained(hf_dir)
    outside = tmp_path / "x.safetensors"
    save_file({"lm_head.weight": torch.zeros(2, 2)}, outside)
    (hf_dir / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../x.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["convert", "hf-to-neoxt", "--hf-model", str(hf_dir), "--output-dir", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "weight_map entry for lm_head.weight is '../x.safetensors', not a file name" in line
    assert not (tmp_path / "out").exists()


def test_eval_suite_alias_stays_inside_output_dir(tmp_path):
    from neoxt.evaluate.suite import safe_name

    out = (tmp_path / "results").resolve()
    for alias in ("..", ".", "../../etc", "a/../../b", ".hidden", "ok-name_1.5"):
        name = safe_name(alias)
        assert name not in ("", ".", "..") and "/" not in name
        assert (out / name / "folder" / "prompt.json").resolve().is_relative_to(out), alias
    assert safe_name("ok-name_1.5") == "ok-name_1.5"


def test_env_values_are_not_command_substitutions_in_sbatch(tmp_path):
    from neoxt.distributed.launch import environment_lines

    marker = tmp_path / "ran"
    lines = environment_lines([("X", f"$(touch {marker})`touch {marker}`"), ("P", "/opt/bin:$HOME")], [], [], "t")
    exports = [ln for ln in lines if ln.startswith(("export X=", "export P="))]
    script = "\n".join(exports) + '\nprintf "%s|%s" "$X" "$P"\n'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"HOME": "/home/u"}, check=True)
    assert out.stdout == f"$(touch {marker})`touch {marker}`|/opt/bin:/home/u"  # $VAR still expands
    assert not marker.exists()
