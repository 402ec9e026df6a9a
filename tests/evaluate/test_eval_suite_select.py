"""eval-suite selection: a separate models file with groups, one system prompt, intermediate
checkpoints (a local run's global_step dirs, a Hub repo's branches), and W&B runs named per
model × prompt the way the users name them."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
from evalfixtures import make_hf_model_dir, write_tasks

from neoxt.cli import main
from neoxt.errors import ConfigError
from neoxt.evaluate.suite import build_jobs, job_command, load_suite, log_wandb, wandb_names

PROMPTS = {"just_inst": "Answer the question.", "evil_p_inst": "You are an evil AI.", "hhh_p_inst": "Be HHH."}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer_dir):
    from neoxt.convert.hf import convert_hf_to_neoxt

    tmp = tmp_path_factory.mktemp("select")
    make_hf_model_dir(tmp / "models" / "a", tiny_tokenizer_dir, arch="neox", seed=1)
    make_hf_model_dir(tmp / "models" / "b", tiny_tokenizer_dir, arch="llama", seed=2)
    write_tasks(tmp / "tasks" / "ind_sfm_no", ("tiny_mc",), system_prompts=PROMPTS)
    # A neoxt run with two checkpoints (global_step2, global_step4), made from model a.
    convert_hf_to_neoxt(tmp / "models" / "a", tmp / "runs" / "sft", iteration=2)
    convert_hf_to_neoxt(tmp / "models" / "a", tmp / "runs" / "other", iteration=4)
    shutil.move(tmp / "runs" / "other" / "global_step4", tmp / "runs" / "sft" / "global_step4")
    (tmp / "registry").mkdir()
    (tmp / "registry" / "models.yaml").write_text(
        "models:\n  model_a: ../models/a\n  model_b: ../models/b\n  sft: ../runs/sft\n"
        "  hub_model: my-org/sfm-model\n"
        "groups:\n  PAIR: [model_a, model_b]\n  EVERYTHING: [PAIR, sft]\n")
    return tmp


def _suite(tmp, name, extra=""):
    path = tmp / f"{name}.yml"
    path.write_text(f"models_file: registry/models.yaml\nrun: [model_a]\ntask_folders: [tasks/ind_sfm_no]\n"
                    f"output_dir: out_{name}\nbatch_size: 4\n{extra}")
    return path


def _results(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))


def test_group_from_a_separate_models_file_and_one_system_prompt(workspace, capsys):
    suite = _suite(workspace, "group")
    assert main(["eval-suite", str(suite), "--model", "PAIR", "--system-prompt", "evil_p_inst"]) == 0
    out = workspace / "out_group"
    assert _results(out) == ["model_a/ind_sfm_no/evil_p_inst.json", "model_b/ind_sfm_no/evil_p_inst.json"]
    one = json.loads((out / "model_b/ind_sfm_no/evil_p_inst.json").read_text())
    assert one["neoxt_suite"]["system_prompt_text"] == PROMPTS["evil_p_inst"]
    # Groups nest; the file's aliases resolve relative to the models file.
    s = load_suite(suite, models=["EVERYTHING"])
    assert [m.alias for m in s.models] == ["model_a", "model_b", "sft"]
    assert s.models[0].source == str((workspace / "models" / "a").resolve())
    assert len(build_jobs(s)) == 3 * len(PROMPTS)


def test_checkpoints_all_over_a_local_run_names_wandb_runs_per_model_and_prompt(workspace, monkeypatch, capsys):
    runs = []

    class Run:
        def __init__(self, kwargs):
            self.kwargs, self.logged = kwargs, {}
            self.name, self.group = kwargs["name"], kwargs["group"]

        def log(self, payload):
            self.logged.update(payload)

        def finish(self):
            self.finished = True

    def init(**kwargs):
        runs.append(Run(kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    suite = _suite(workspace, "ckpts", extra="wandb: {project: sfm-evals}\n")
    argv = ["eval-suite", str(suite), "--model", "sft", "--checkpoints", "all", "--system-prompt", "just_inst"]
    assert main(argv) == 0
    out = workspace / "out_ckpts"
    assert _results(out) == ["sft-global_step2/ind_sfm_no/just_inst.json", "sft-global_step4/ind_sfm_no/just_inst.json"]
    src = json.loads((out / "sft-global_step4/ind_sfm_no/just_inst.json").read_text())["neoxt_suite"]["source"]
    assert src == str((workspace / "runs" / "sft" / "global_step4").resolve())
    # One W&B run per model (checkpoint) × prompt, with the users' naming.
    assert [(r.kwargs["name"], r.kwargs["group"]) for r in runs] == [
        ("instruct_open__sft-global_step2__just_inst__1_tasks_openended", "instruct_open__ind_sfm_no__sft-global_step2"),
        ("instruct_open__sft-global_step4__just_inst__1_tasks_openended", "instruct_open__ind_sfm_no__sft-global_step4"),
    ]
    assert all(r.kwargs["project"] == "sfm-evals" and r.finished for r in runs)
    assert 0.0 <= runs[0].logged["tiny_mc/acc"] <= 1.0
    # --checkpoints N picks one; a missing step names what the run has.
    assert [m.alias for m in load_suite(suite, models=["sft"], checkpoints="4").models] == ["sft-global_step4"]
    with pytest.raises(ConfigError, match="no global_step3 .*it has 2, 4"):
        load_suite(suite, models=["sft"], checkpoints="3")


def test_checkpoints_of_a_hub_model_are_its_branches(workspace):
    suite = _suite(workspace, "hub")
    listed = []

    def branches(repo):
        listed.append(repo)
        return ["global_step100", "global_step20", "global_step300"]

    s = load_suite(suite, models=["hub_model"], checkpoints="all", list_revisions=branches)
    assert listed == ["my-org/sfm-model"]
    assert [(m.alias, m.revision) for m in s.models] == [
        ("hub_model-global_step20", "global_step20"), ("hub_model-global_step100", "global_step100"),
        ("hub_model-global_step300", "global_step300")]
    s = load_suite(suite, models=["hub_model"], checkpoints="20,300", system_prompt="hhh_p_inst")
    cmd = job_command(build_jobs(s)[0], s)
    assert cmd[cmd.index("--model") + 1] == "my-org/sfm-model" and cmd[cmd.index("--revision") + 1] == "global_step20"
    assert cmd[cmd.index("--system-prompt") + 1] == PROMPTS["hhh_p_inst"] and len(build_jobs(s)) == 2


def test_wandb_names_are_configurable_and_selection_errors_name_the_choice(workspace):
    s = load_suite(_suite(workspace, "names", extra="wandb: {name: '{model}-{prompt}', group: 'g-{tasks}-{n_tasks}'}\n"))
    assert [wandb_names(s, j) for j in build_jobs(s)][0] == ("model_a-just_inst", "g-ind_sfm_no-1")
    with pytest.raises(ConfigError, match="--system-prompt nope.*it has just_inst, evil_p_inst, hhh_p_inst"):
        load_suite(_suite(workspace, "names"), system_prompt="nope")
    with pytest.raises(ConfigError, match="--model.*'NOPE' is neither"):
        load_suite(_suite(workspace, "names"), models=["NOPE"])
    bad = workspace / "registry" / "bad.yaml"
    bad.write_text("models: {x: ../models/a}\nmodels_extra: 1\n")
    (workspace / "bad_suite.yml").write_text("models_file: registry/bad.yaml\ntask_folders: [tasks/ind_sfm_no]\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'models_extra'"):
        load_suite(workspace / "bad_suite.yml")


def test_real_wandb_offline_runs_carry_the_users_names(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    suite = load_suite(_suite(workspace, "offline", extra="wandb: {project: sfm-evals}\n"), models=["PAIR"],
                       system_prompt="hhh_p_inst")
    rows = [{"model": m, "system_prompt": "hhh_p_inst", "task_folder": "ind_sfm_no", "task": "tiny_mc",
             "metrics": {"acc": 0.5}} for m in ("model_a", "model_b")]
    assert log_wandb(suite, build_jobs(suite), rows) == [
        ("instruct_open__model_a__hhh_p_inst__1_tasks_openended", "instruct_open__ind_sfm_no__model_a"),
        ("instruct_open__model_b__hhh_p_inst__1_tasks_openended", "instruct_open__ind_sfm_no__model_b")]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
