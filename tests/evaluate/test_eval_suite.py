"""Acceptance 4: `neoxt eval-suite` — 2 models × 2 system prompts × 1 local task folder, resumable."""

from __future__ import annotations

import csv
import json

import pytest
from evalfixtures import make_hf_model_dir, write_tasks

from neoxt.cli import main
from neoxt.errors import ConfigError
from neoxt.evaluate.suite import build_jobs, job_command, load_suite

PROMPTS = {"helpful": "You are a helpful assistant.", "terse": "Answer in one word."}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("suite")
    make_hf_model_dir(tmp / "models" / "a", tiny_tokenizer_dir, arch="neox", seed=1)
    make_hf_model_dir(tmp / "models" / "b", tiny_tokenizer_dir, arch="llama", seed=2)
    make_hf_model_dir(tmp / "models" / "plain", tiny_tokenizer_dir, arch="neox", seed=3, chat_template=False)
    write_tasks(tmp / "tasks" / "safety", ("tiny_mc",), system_prompts=PROMPTS)
    return tmp


def _suite(tmp, models="[tiny]", extra=""):
    path = tmp / "suite.yml"
    path.write_text(
        "models:\n  model-a: models/a\n  model-b: models/b\n  plain: models/plain\n"
        "groups:\n  tiny: [model-a, model-b]\n"
        f"run: {models}\ntask_folders: [tasks/safety]\noutput_dir: out\nbatch_size: 4\n{extra}"
    )
    return path


def test_suite_runs_every_pair_once_and_gathers_a_table(workspace, capsys):
    suite = _suite(workspace)
    assert main(["eval-suite", str(suite)]) == 0
    out = workspace / "out"
    results = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert results == ["model-a/safety/helpful.json", "model-a/safety/terse.json",
                       "model-b/safety/helpful.json", "model-b/safety/terse.json"]
    one = json.loads((out / "model-a/safety/terse.json").read_text())
    assert one["neoxt_suite"]["system_prompt_text"] == PROMPTS["terse"]
    assert 0.0 <= one["results"]["tiny_mc"]["acc,none"] <= 1.0

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["model"], r["system_prompt"], r["task"]) for r in rows] == [
        ("model-a", "helpful", "tiny_mc"), ("model-a", "terse", "tiny_mc"),
        ("model-b", "helpful", "tiny_mc"), ("model-b", "terse", "tiny_mc")]
    assert set(rows[0]) == {"model", "system_prompt", "task_folder", "task", "acc", "acc_stderr", "acc_norm",
                            "acc_norm_stderr"}
    md = (out / "results.md").read_text()
    assert md.count("| model-") == 4 and "acc_norm" in md
    capsys.readouterr()

    # A rerun skips every pair (files untouched) and rebuilds the same table.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert main(["eval-suite", str(suite)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamps
    assert list(csv.DictReader((out / "results.csv").open())) == rows


def test_model_without_chat_template_fails_before_any_job(workspace, capsys):
    suite = _suite(workspace, models="[model-a, plain]")
    suite.write_text(suite.read_text().replace("output_dir: out", "output_dir: out_plain"))
    assert main(["eval-suite", str(suite)]) == 2
    err = capsys.readouterr().err
    assert "'plain'" in err and "chat_template" in err and "'model-a'" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (workspace / "out_plain").exists()  # nothing ran, not even model-a


def test_suite_file_errors_name_the_key(workspace):
    bad = workspace / "bad.yml"
    bad.write_text("models: {a: models/a}\nrun: [nope]\ntask_folders: [tasks/safety]\n")
    with pytest.raises(ConfigError, match="run.*'nope'"):
        load_suite(bad)
    bad.write_text("models: {a: ./models/missing}\ntask_folders: [tasks/safety]\n")
    with pytest.raises(ConfigError, match="models.a"):
        load_suite(bad)


def test_jobs_render_as_neoxt_eval_commands_for_slurm(workspace, capsys):
    suite = load_suite(_suite(workspace, extra="num_fewshot: 0\n").as_posix())
    jobs = build_jobs(suite)
    assert len(jobs) == 4
    cmd = job_command(jobs[0], suite)
    assert cmd[:3] == ["neoxt", "eval", "--model"] and "--apply-chat-template" in cmd
    assert cmd[cmd.index("--output") + 1] == str(jobs[0].result_path)
    assert cmd[cmd.index("--system-prompt") + 1] in PROMPTS.values()


def test_print_jobs_lists_only_pending_pairs(workspace, capsys):
    suite = _suite(workspace)
    suite.write_text(suite.read_text().replace("output_dir: out", "output_dir: out_jobs"))
    done = workspace / "out_jobs" / "model-a" / "safety" / "helpful.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    assert main(["eval-suite", str(suite), "--print-jobs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("neoxt eval --model ") for line in lines)
    assert not any(str(done) in line for line in lines)


def test_wandb_logs_one_run_per_pair_with_results(workspace, monkeypatch):
    import sys
    import types

    from neoxt.evaluate.suite import log_wandb

    runs = []

    class Run:
        def __init__(self, kwargs):
            self.kwargs, self.logged, self.finished = kwargs, {}, False
            self.name, self.group = kwargs["name"], kwargs["group"]

        def log(self, payload):
            self.logged.update(payload)

        def finish(self):
            self.finished = True

    def init(**kwargs):
        runs.append(Run(kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    suite = load_suite(_suite(workspace, extra="wandb: {project: evals, group: g1}\n"))
    rows = [{"model": "model-a", "system_prompt": "terse", "task_folder": "safety", "task": "tiny_mc",
             "metrics": {"acc": 0.5, "acc_stderr": 0.1}}]
    assert log_wandb(suite, build_jobs(suite), rows) == [("instruct_open__model-a__terse__1_tasks_openended", "g1")]
    (run,) = runs  # pairs without results get no run
    assert run.kwargs["project"] == "evals" and run.kwargs["config"]["system_prompt_text"] == PROMPTS["terse"]
    assert run.logged == {"tiny_mc/acc": 0.5, "tiny_mc/acc_stderr": 0.1} and run.finished


def test_slurm_submits_one_job_per_pending_pair_then_gather_builds_the_table(workspace, monkeypatch, tmp_path):
    import shlex

    suite = _suite(workspace, extra="slurm: {partition: gpu, time: '00:30:00', gpus: 1, env: {HF_HUB_OFFLINE: '1'}}\n")
    suite.write_text(suite.read_text().replace("output_dir: out", "output_dir: out_slurm"))
    out = workspace / "out_slurm"
    done = out / "model-b" / "safety" / "terse.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"results": {"tiny_mc": {"acc,none": 0.25, "acc_stderr,none": 0.1}}}))
    # A stand-in sbatch on PATH: records its arguments, prints a job id.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'calls'}\necho $((1000 + RANDOM))\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")

    assert main(["eval-suite", str(suite), "--slurm"]) == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 3  # 4 pairs, one already done
    scripts = sorted((out / "slurm").glob("*.sbatch"))
    assert [s.name for s in scripts] == ["model-a__safety__helpful.sbatch", "model-a__safety__terse.sbatch",
                                         "model-b__safety__helpful.sbatch"]
    text = scripts[0].read_text()
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --time=00:30:00" in text and "#SBATCH --gpus=1" in text
    assert "export HF_HUB_OFFLINE=1" in text
    command = shlex.split(text.strip().splitlines()[-1])
    assert command[:2] == ["neoxt", "eval"] and command[command.index("--output") + 1] == str(
        out / "model-a" / "safety" / "helpful.json")
    recorded = json.loads((out / "slurm" / "jobs.json").read_text())
    assert len(recorded) == 3 and all(r["job_id"].isdigit() for r in recorded)

    # After the jobs: --gather tables whatever results exist, running nothing.
    assert main(["eval-suite", str(suite), "--gather"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["model"], r["system_prompt"], r["acc"]) for r in rows] == [("model-b", "terse", "0.25")]
