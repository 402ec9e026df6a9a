"""Acceptance 3: `neoxt publish` against a local Hub that rate-limits and fails, through the
unmodified huggingface_hub client (HF_ENDPOINT): every checkpoint on its branch, main = the last,
chat templates on every tokenizer, loadable with AutoModelForCausalLM, evaluated from the Hub by
--eval; a killed publisher resumes with only the rest; a second publisher on the same repo is refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hubserver import FakeHub

from conftest import CHAT_TEMPLATE, CORPUS, REPO, run_neoxt_train
from neoxt.checkpoint.integrity import REHASH_COMMAND
from neoxt.cli import main

FAST_RETRY = ["--retry-min-wait", "0.01", "--retry-max-wait", "0.05"]
LMEVAL = REPO / "tests" / "data" / "lmeval"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny `neoxt train` run with a chat template: checkpoints global_step2 and global_step4 (final)."""
    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.tokenize import preprocess

    tmp = tmp_path_factory.mktemp("publish")
    src = tmp / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in CORPUS))
    tok = TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(tiny_tokenizer_dir / "tokenizer.json"))
    prefix = preprocess([str(src)], str(tmp / "corpus"), tok, keys=("text",), append_eod=True).outputs["text"]
    cfg = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
           "max_position_embeddings": 64, "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}},
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": 4,
           "data_path": prefix, "split": "100,0,0", "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file,
           "save": str(tmp / "sft_run=a,b"), "checkpoint_factor": 2, "log_interval": 1, "seed": 3,
           "chat_template": CHAT_TEMPLATE, "index_cache_dir": str(tmp / "cache")}
    run_neoxt_train(cfg, tmp / "run.yml")
    return tmp / "sft_run=a,b"


@pytest.fixture
def hub_env(monkeypatch):
    """Point this process's hub client at a FakeHub (HF_ENDPOINT, a token, offline mode off)."""
    import huggingface_hub.constants as constants

    hubs = []

    def start(**kwargs) -> FakeHub:
        hub = FakeHub(**kwargs)
        hubs.append(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # What the client derives from HF_ENDPOINT at import (this process imported it before the hub existed).
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        return hub

    yield start
    for hub in hubs:
        hub.stop()


def _copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("hub_uploads.json", ".publish-*", "hf_export"))
    return dest


def _snapshot(hub: FakeHub, repo: str, branch: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name, data in hub.files(repo, branch).items():
        (dest / name).write_bytes(data)
    return dest


def test_every_checkpoint_reaches_its_branch_through_429s_and_a_500(trained_run, hub_env, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = hub_env(rate_limit=3, fail_commit=2)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    run = _copy_run(trained_run, tmp_path / "sft_run=a,b")
    suite = tmp_path / "suite.yml"
    suite.write_text("models: {published: me/sft_run-a_b}\ntask_folders: [tasks]\noutput_dir: evals\nbatch_size: 4\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        (LMEVAL / "tiny_mc.yaml.in").read_text().replace("@DATA_DIR@", str(LMEVAL)))
    (tmp_path / "tasks" / "system_prompts.json").write_text('{"just_inst": "Answer the question."}')

    assert main(["publish", str(run), "--org", "me", *FAST_RETRY, "--eval", str(suite)]) == 0
    repo = "me/sft_run-a_b"  # the run name through the default abbreviations ('=' → '-', ',' → '_')
    assert set(hub.branches(repo)) == {"main", "global_step2", "global_step4"}
    statuses = [s for _, _, s in hub.log]
    assert statuses.count(429) >= 9 and statuses.count(500) == 1
    for branch in ("global_step2", "global_step4", "main"):
        files = hub.files(repo, branch)
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
        local = _snapshot(hub, repo, branch, tmp_path / "snap" / branch)
        assert AutoTokenizer.from_pretrained(local).chat_template == CHAT_TEMPLATE
    assert hub.files(repo, "main")["model.safetensors"] == hub.files(repo, "global_step4")["model.safetensors"]
    assert hub.files(repo, "main")["model.safetensors"] != hub.files(repo, "global_step2")["model.safetensors"]

    import neoxt

    # What the Hub serves computes what the run's own final checkpoint computes.
    tokens = torch.tensor([[5, 60, 61, 62, 7, 100, 3]])
    with torch.no_grad():
        ours = neoxt.load_model(run / "global_step4")(tokens)
        for branch in ("main", "global_step2"):
            model = AutoModelForCausalLM.from_pretrained(tmp_path / "snap" / branch).eval()
            hf_logits = model(tokens).logits
            assert hf_logits.shape == (1, 7, model.config.vocab_size)
            want = ours if branch == "main" else neoxt.load_model(run / "global_step2")(tokens)
            assert (hf_logits - want).abs().max().item() <= 1e-5, branch
    # The record names each revision's commit, which is what the branch points at.
    record = json.loads((run / "hub_uploads.json").read_text())[repo]
    assert {rev: r["commit"] for rev, r in record.items()} == hub.branches(repo)
    assert not (run / "hf_export" / "global_step2").exists()  # exports are cleaned up
    # --eval ran the suite on each uploaded revision, downloaded from the Hub (the suite's alias of this repo).
    for step in (2, 4):
        result = json.loads((tmp_path / "evals" / f"published-global_step{step}" / "tasks" / "just_inst.json").read_text())
        assert result["neoxt_suite"]["revision"] == f"global_step{step}"
        assert 0.0 <= result["results"]["tiny_mc"]["acc,none"] <= 1.0
    # eval-suite --checkpoints all lists the repo's global_step branches on the Hub.
    from neoxt.evaluate.suite import load_suite

    revisions = [m.revision for m in load_suite(suite, checkpoints="all").models]
    assert revisions == ["global_step2", "global_step4"]
    # ... and `neoxt eval --revision` (what its SLURM jobs run) evaluates one branch.
    out = tmp_path / "one.json"
    assert main(["eval", "--model", repo, "--revision", "global_step2", "--tasks", "tiny_mc", "--include-path",
                 str(tmp_path / "tasks"), "--limit", "2", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["tiny_mc"]["acc,none"] >= 0.0

    # A rerun finds everything on the Hub and commits nothing.
    before = len(hub.commits_to(repo))
    assert main(["publish", str(run), "--org", "me", *FAST_RETRY]) == 0
    assert len(hub.commits_to(repo)) == before
    # Killed after a commit landed but before it was recorded: the rerun re-sends global_step4, the Hub
    # finds every file unchanged (no new commit), and the record takes the branch's commit.
    data = json.loads((run / "hub_uploads.json").read_text())
    del data[repo]["global_step4"]
    (run / "hub_uploads.json").write_text(json.dumps(data))
    assert main(["publish", str(run), "--org", "me", *FAST_RETRY]) == 0
    assert len(hub.commits_to(repo)) == before
    record = json.loads((run / "hub_uploads.json").read_text())[repo]
    assert record["global_step4"]["commit"] == hub.branches(repo)["global_step4"]

    # Someone adds notes to main and a stray shard lands on global_step2: a rerun re-checks both
    # (their heads moved), removes the stale weights and keeps the notes.
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token="hf_test_token")
    api.upload_file(path_or_fileobj=b"# card", path_in_repo="notes.md", repo_id=repo)
    api.upload_file(path_or_fileobj=b"old", path_in_repo="model-00002-of-00002.safetensors", repo_id=repo,
                    revision="global_step2")
    assert main(["publish", str(run), "--org", "me", *FAST_RETRY]) == 0
    assert "model-00002-of-00002.safetensors" not in hub.files(repo, "global_step2")
    assert hub.files(repo, "main")["notes.md"] == b"# card"
    assert hub.files(repo, "main")["model.safetensors"] == hub.files(repo, "global_step4")["model.safetensors"]


def test_killed_publisher_resumes_with_only_the_rest_and_a_second_one_is_refused(
        trained_run, hub_env, tmp_path, capsys):
    hub = hub_env(hold_revision="global_step4")
    run = _copy_run(trained_run, tmp_path / "myrun")
    argv = ["publish", str(run), "--org", "me", "--repo", "tiny", *FAST_RETRY]
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test_token", HF_HUB_OFFLINE="0",
               PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "neoxt.cli", *argv], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert hub.held.wait(timeout=180), first.communicate(timeout=5)[0] if first.poll() is not None else "no commit"
        # While the first publisher is mid-commit, a second one on the same repo refuses at once.
        began = time.monotonic()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "another `neoxt publish` to me/tiny is running" in err and f"pid {first.pid}" in err
        assert time.monotonic() - began < 10
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        hub.release.set()

    record = json.loads((run / "hub_uploads.json").read_text())["me/tiny"]
    assert set(record) == {"global_step2"}  # global_step4's branch exists, but its commit never did
    assert "global_step4" in hub.branches("me/tiny")
    assert set(hub.files("me/tiny", "global_step4")) == {".gitattributes"}
    assert hub.commits_to("me/tiny") == ["global_step2"]

    assert main(argv) == 0
    assert hub.commits_to("me/tiny") == ["global_step2", "global_step4", "main"]
    assert "model.safetensors" in hub.files("me/tiny", "global_step4")


def test_missing_chat_template_fails_before_any_upload(trained_run, hub_env, tmp_path, capsys):
    import yaml

    hub = hub_env()
    run = _copy_run(trained_run, tmp_path / "plain")
    bare_tok = tmp_path / "bare_tokenizer"
    bare_tok.mkdir()
    for step in ("global_step2", "global_step4"):
        cfg_path = run / step / "config.yml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg.pop("chat_template", None)
        (bare_tok / "tokenizer.json").write_bytes(Path(cfg["vocab_file"]).read_bytes())
        cfg["vocab_file"] = str(bare_tok / "tokenizer.json")
        cfg_path.write_text(yaml.safe_dump(cfg))
        # An edit on purpose: refresh the checksums as the mismatch message says (issue 12's integrity check).
        subprocess.run(["bash", "-c", REHASH_COMMAND], cwd=run / step, check=True)
    assert main(["publish", str(run), "--org", "me", "--steps", "2", *FAST_RETRY]) == 2
    err = capsys.readouterr().err
    assert "global_step2/config.yml: no chat_template" in err and len(err.strip().splitlines()) == 1
    assert hub.log == [] and not (run / "hub_uploads.json").exists()

    # --chat-template supplies one: the uploaded tokenizer carries it.
    from transformers import AutoTokenizer

    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE.replace("<|end|>", "<|endoftext|>"))
    assert main(["publish", str(run), "--org", "me", "--steps", "2", "--chat-template", str(template),
                 *FAST_RETRY]) == 0
    local = _snapshot(hub, "me/plain", "global_step2", tmp_path / "snap")
    assert AutoTokenizer.from_pretrained(local).chat_template == template.read_text()


def test_slurm_writes_a_singleton_job_per_repo(trained_run, tmp_path, monkeypatch, capsys):
    run = _copy_run(trained_run, tmp_path / "slurmrun")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'calls'}\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(["publish", str(run), "--org", "me", "--steps", "last", "--slurm", "--sbatch=--partition=cpu"]) == 0
    assert capsys.readouterr().out.strip() == "4242"
    script = (run / "publish-me__slurmrun.sbatch").read_text()
    assert "#SBATCH --job-name=publish_me__slurmrun" in script and "#SBATCH --dependency=singleton" in script
    assert "#SBATCH --partition=cpu" in script
    command = script.strip().splitlines()[-1]
    assert " publish " in command and "--steps last" in command and "--slurm" not in command
    assert (tmp_path / "calls").read_text().split()[-1].endswith("publish-me__slurmrun.sbatch")


def test_upload_checkpoint_sends_the_neoxt_checkpoint_to_its_own_repo(trained_run, hub_env, tmp_path, capsys):
    from neoxt import load_model

    # A 429 storm on one commit, longer than the hub client's own 5 retries: our backoff carries it.
    hub = hub_env(rate_limit=7, limit_only={"me/neoxt-ckpt-ck@main"})
    run = _copy_run(trained_run, tmp_path / "ck")
    assert main(["publish", str(run), "--org", "me", "--steps", "last", "--upload-checkpoint", *FAST_RETRY]) == 0
    err = capsys.readouterr().err
    assert "upload global_step4 to me/neoxt-ckpt-ck@main: 429; retry 1/20" in err
    # Off a terminal the checkpoint's progress bar is a log line: convert + 4 uploads (2 repos x branch, main).
    assert re.search(r"^publish: \[1/1\] global_step4: 100% 5/5 \[.*stage.*\]$", err, re.M), err
    assert set(hub.branches("me/ck")) == set(hub.branches("me/neoxt-ckpt-ck")) == {"main", "global_step4"}
    files = hub.files("me/neoxt-ckpt-ck", "global_step4")
    assert {".metadata", "meta.json", "config.yml"} <= set(files) and "model.safetensors" not in files
    local = _snapshot(hub, "me/neoxt-ckpt-ck", "main", tmp_path / "snap" / "global_step4")
    model = load_model(local)
    assert sum(p.numel() for p in model.parameters()) > 0
