"""`neoxt publish`: a run's checkpoints → Hugging Face format → the Hub, one branch per checkpoint.

Each chosen ``global_step<N>`` is exported to HF (safetensors, config, tokenizer with its chat
template) and committed to ``<org>/<repo>`` on branch ``global_step<N>``; the final checkpoint is
committed to ``main`` as well, so ``from_pretrained(repo)`` gets it and ``revision="global_step<N>"``
any other. What our users ran as a shell loop of SLURM jobs is one resumable command:

* every Hub call is retried on 429/5xx with exponential backoff and jitter (``hub_retry``);
* ``<run>/hub_uploads.json`` records each revision's commit, checked against the remote refs on a
  rerun, so only what is missing is uploaded (``publish_state``);
* one publisher per repo at a time (an ``flock`` beside the record);
* a checkpoint whose tokenizer would have no chat template stops the run before any upload.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# The one neoxt → HF export entry point (repoint here when conversion moves).
from neoxt.convert.hf import convert_neoxt_to_hf as export_hf
from neoxt.errors import ConfigError, NeoxtError
from neoxt.ops.hub_retry import HubError, RetryPolicy, call_with_retry
from neoxt.ops.publish_state import RECORD_NAME, UploadRecord, lock_path, publish_lock

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^global_step(\d+)$")
_REPO_BAD = re.compile(r"[^A-Za-z0-9._-]+")
MAX_REPO_ID = 96
RANDOM_DELAY_MAX = 12 * 3600  # `--upload-delay random`: 0–12 h, as the users' scripts staggered jobs
# Files an upload replaces wholesale: weights and their index, in HF and DCP layouts.
STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.distcp",
                  ".metadata"]


# --- naming ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamingRules:
    template: str = "{name}"
    checkpoint_template: str = "neoxt-ckpt-{name}"
    codenames: dict[str, str] = field(default_factory=dict)
    abbreviations: dict[str, str] = field(default_factory=dict)


def load_naming(path: str | os.PathLike | None = None) -> NamingRules:
    """The naming rules of a JSON/YAML file (default: the shipped ``ops/data/hub_names.json``)."""
    if path is None:
        text, where = resources.files("neoxt.ops").joinpath("data/hub_names.json").read_text("utf-8"), "hub_names.json"
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{where}: naming file not found") from None
    try:
        raw = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: invalid JSON/YAML ({err})") from None
    known = {"template", "checkpoint_template", "codenames", "abbreviations"}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(sorted(known))}")
    unknown = sorted(k for k in raw if k not in known and not str(k).startswith("_"))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for key in ("codenames", "abbreviations"):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(f"{where}: '{key}' must map strings to strings")
    rules = NamingRules(
        template=str(raw.get("template", "{name}")),
        checkpoint_template=str(raw.get("checkpoint_template", "neoxt-ckpt-{name}")),
        codenames={str(k): str(v) for k, v in (raw.get("codenames") or {}).items()},
        abbreviations={str(k): str(v) for k, v in (raw.get("abbreviations") or {}).items()},
    )
    for key in ("template", "checkpoint_template"):
        if "{name}" not in getattr(rules, key):
            raise ConfigError(f"{where}: '{key}' must contain {{name}}")
    return rules


def sanitize_repo_name(name: str, max_length: int) -> str:
    """A valid Hub repo name: [A-Za-z0-9._-], no leading/trailing '-' or '.', no '--'/'..', ≤ max_length
    (a long name keeps its head and tail, which is where run names differ)."""
    clean = _REPO_BAD.sub("_", name)
    clean = re.sub(r"[-_.]{2,}", "_", clean).strip("-.")
    if len(clean) > max_length:
        head = max_length // 2 - 1
        clean = f"{clean[:head]}__{clean[-(max_length - head - 2):]}"
    if not clean:
        raise ConfigError(f"run name {name!r} gives an empty Hub repo name")
    return clean


def repo_ids(run_name: str, org: str, rules: NamingRules, repo: str | None = None) -> tuple[str, str]:
    """(model repo, checkpoint repo) ids for a run under ``org``."""
    if repo is None:
        if run_name in rules.codenames:
            name = rules.codenames[run_name]
        else:
            name = run_name
            for old, new in rules.abbreviations.items():
                name = name.replace(old, new)
            name = rules.template.format(name=name)
    else:
        name = repo
    room = MAX_REPO_ID - len(org) - 1
    name = sanitize_repo_name(name, room)
    ckpt = sanitize_repo_name(rules.checkpoint_template.format(name=name), room)
    return f"{org}/{name}", f"{org}/{ckpt}"


# --- choosing checkpoints -------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    @property
    def revision(self) -> str:
        return f"global_step{self.step}"


def run_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Every complete ``global_step<N>`` directory of a run, oldest first (``.tmp`` ones are not)."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    found = [Checkpoint(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    if not found:
        raise ConfigError(f"{run_dir}: no global_step<N> checkpoint to publish")
    return sorted(found, key=lambda c: c.step)


def choose_steps(ckpts: Sequence[Checkpoint], spec: str) -> list[Checkpoint]:
    """``all``, ``last``, or a comma list of steps (each must exist)."""
    spec = spec.strip()
    if spec == "all":
        return list(ckpts)
    if spec == "last":
        return [ckpts[-1]]
    by_step = {c.step: c for c in ckpts}
    chosen = []
    for part in spec.split(","):
        try:
            step = int(part.strip().removeprefix("global_step"))
        except ValueError:
            raise ConfigError(f"--steps {spec}: expected all, last or step numbers like 1000,2000") from None
        if step not in by_step:
            have = ", ".join(str(s) for s in by_step)
            raise ConfigError(f"--steps {spec}: the run has no global_step{step} (it has {have})")
        chosen.append(by_step[step])
    return sorted(set(chosen), key=lambda c: c.step)


def _step_config(ckpt: Checkpoint) -> dict[str, Any]:
    path = ckpt.path / "config.yml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (not a neoxt checkpoint?)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from None
    return raw if isinstance(raw, dict) else {}


def _get(cfg: dict[str, Any], key: str) -> Any:
    return cfg.get(key, cfg.get(key.replace("_", "-")))


def main_step(ckpts: Sequence[Checkpoint], chosen: Sequence[Checkpoint], mode: str) -> int | None:
    """The step that also goes to ``main``: ``auto`` = the run's final step (``train_iters``) when it
    is among the chosen ones; ``last`` = the last chosen; ``none`` = leave main alone."""
    if mode == "none" or not chosen:
        return None
    if mode == "last":
        return chosen[-1].step
    if mode != "auto":
        raise ConfigError(f"--main {mode}: expected auto, last or none")
    train_iters = _get(_step_config(ckpts[-1]), "train_iters")
    final = int(train_iters) if train_iters is not None else ckpts[-1].step
    return final if any(c.step == final for c in chosen) else None


def preflight_chat_template(ckpt: Checkpoint, override: str | None) -> None:
    """Fail before any upload when a checkpoint's export would carry no chat template."""
    if override:
        return
    cfg = _step_config(ckpt)
    if _get(cfg, "chat_template"):
        return
    vocab = _get(cfg, "vocab_file")
    if vocab:
        tok_dir = Path(str(vocab)).parent
        if (tok_dir / "chat_template.jinja").is_file():
            return
        tok_cfg = tok_dir / "tokenizer_config.json"
        if tok_cfg.is_file() and json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template"):
            return
    raise ConfigError(f"{ckpt.path / 'config.yml'}: no chat_template (in the config or beside its vocab_file), "
                      "so the uploaded tokenizer would have none; set `chat_template` or pass --chat-template")


def ensure_chat_template(hf_dir: Path, override: str | None) -> str:
    """The exported tokenizer's chat template (``override`` written in when given); error when none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    if override:
        tok.chat_template = override
        tok.save_pretrained(str(hf_dir))
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    if not tok.chat_template:
        raise ConfigError(f"{hf_dir}: the exported tokenizer has no chat template; pass --chat-template")
    return tok.chat_template


def read_template_arg(value: str | None) -> str | None:
    """``--chat-template``: Jinja text, or a file holding it."""
    if not value or "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"--chat-template {value}: neither a Jinja template nor a file")
    return path.read_text(encoding="utf-8")


def upload_delay(value: str, rng: random.Random | None = None) -> float:
    """``--upload-delay``: seconds, or ``random`` (uniform over 0–12 h, to spread many jobs)."""
    if value.strip().lower() == "random":
        return (rng or random).uniform(0, RANDOM_DELAY_MAX)
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"--upload-delay {value}: expected seconds or 'random'") from None
    if seconds < 0:
        raise ConfigError(f"--upload-delay {value}: must be >= 0")
    return seconds


# --- the Hub --------------------------------------------------------------------------------------


class Hub:
    """The few ``huggingface_hub`` calls publishing needs, each retried by the policy.

    ``HF_ENDPOINT`` and ``HF_TOKEN`` are read when the client is made (not at import), so a
    process can point at a mirror or a test server."""

    def __init__(self, policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep):
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            raise HubError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it to publish to the Hub")
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None)
        self.policy, self.sleep = policy, sleep

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return call_with_retry(fn, self.policy, what, sleep=self.sleep)

    def ensure_repo(self, repo_id: str, private: bool) -> None:
        self._call(f"create {repo_id}", lambda: self.api.create_repo(repo_id, private=private, exist_ok=True))

    def refs(self, repo_id: str) -> dict[str, str]:
        """Branch name → commit id."""
        refs = self._call(f"list branches of {repo_id}", lambda: self.api.list_repo_refs(repo_id))
        return {b.name: b.target_commit for b in refs.branches}

    def ensure_branch(self, repo_id: str, branch: str) -> None:
        if branch != "main":
            self._call(f"create branch {branch} of {repo_id}",
                       lambda: self.api.create_branch(repo_id, branch=branch, exist_ok=True))

    def upload(self, folder: Path, repo_id: str, revision: str, message: str) -> str:
        """Commit ``folder`` to ``revision``; weight files it does not hold are deleted (a branch starts
        from main, and a re-sharded export must not keep old shards), other files (a model card) stay.
        Returns the commit id (the branch's head when nothing changed)."""
        info = self._call(f"upload {folder.name} to {repo_id}@{revision}", lambda: self.api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=message,
            delete_patterns=STALE_PATTERNS))
        return info.oid


# --- the pipeline ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishOptions:
    run_dir: Path
    org: str
    repo: str | None = None  # repo name under org (default: from the naming rules)
    names_file: str | None = None
    steps: str = "all"
    main: str = "auto"
    chat_template: str | None = None  # Jinja text (already read from a file)
    upload_checkpoint: bool = False
    private: bool = False
    policy: RetryPolicy = RetryPolicy()
    upload_delay: float = 0.0
    lock_wait: float = 0.0
    work_dir: Path | None = None  # where HF exports are staged (default <run>/hf_export)
    keep_export: bool = False
    dtype: str | None = None


@dataclass(frozen=True)
class Upload:
    repo_id: str
    revision: str
    step: int
    commit: str | None  # None: already on the Hub


@dataclass(frozen=True)
class PublishPlan:
    repo_id: str
    checkpoint_repo: str | None
    chosen: tuple[Checkpoint, ...]
    main_step: int | None


def plan(opts: PublishOptions) -> PublishPlan:
    """Everything decided from local files alone (names, steps, main, templates): errors before any I/O."""
    run_dir = opts.run_dir.resolve()
    ckpts = run_checkpoints(run_dir)
    chosen = choose_steps(ckpts, opts.steps)
    for ckpt in chosen:
        preflight_chat_template(ckpt, opts.chat_template)
    repo_id, ckpt_repo = repo_ids(run_dir.name, opts.org, load_naming(opts.names_file), opts.repo)
    return PublishPlan(repo_id, ckpt_repo if opts.upload_checkpoint else None, tuple(chosen),
                       main_step(ckpts, chosen, opts.main))


def _targets(p: PublishPlan, ckpt: Checkpoint) -> list[tuple[str, str]]:
    """(repo, revision) pairs a checkpoint goes to: its branch, main when final, same for the neoxt repo."""
    revisions = [ckpt.revision] + (["main"] if ckpt.step == p.main_step else [])
    repos = [p.repo_id] + ([p.checkpoint_repo] if p.checkpoint_repo else [])
    return [(repo, rev) for repo in repos for rev in revisions]


def publish(
    opts: PublishOptions,
    *,
    echo: Callable[[str], None] = log.info,
    sleep: Callable[[float], None] = time.sleep,
    hub: Hub | None = None,
) -> list[Upload]:
    """Upload what is missing; returns one entry per (repo, revision) of the chosen checkpoints."""
    p = plan(opts)
    run_dir = opts.run_dir.resolve()
    record = UploadRecord(run_dir / RECORD_NAME)
    with publish_lock(lock_path(run_dir, p.repo_id), p.repo_id, wait=opts.lock_wait):
        if opts.upload_delay > 0:
            echo(f"publish: waiting {opts.upload_delay:.0f} s before the first upload (--upload-delay)")
            sleep(opts.upload_delay)
        hub = hub or Hub(opts.policy, sleep)
        remote: dict[str, dict[str, str]] = {}
        for repo in filter(None, (p.repo_id, p.checkpoint_repo)):
            hub.ensure_repo(repo, opts.private)
            remote[repo] = hub.refs(repo)
        work = (opts.work_dir or run_dir / "hf_export").resolve()
        results: list[Upload] = []
        for i, ckpt in enumerate(p.chosen, 1):
            todo = [(r, v) for r, v in _targets(p, ckpt) if not record.is_done(r, v, remote[r])]
            results += [Upload(r, v, ckpt.step, None) for r, v in _targets(p, ckpt) if (r, v) not in todo]
            prefix = f"publish: [{i}/{len(p.chosen)}] {ckpt.revision}"
            if not todo:
                echo(f"{prefix}: already on the Hub")
                continue
            results += _publish_one(opts, p, ckpt, todo, hub, record, work, prefix,
                                    lambda m, pre=prefix: echo(f"{pre}: {m}"))
    return results


def _publish_one(opts: PublishOptions, p: PublishPlan, ckpt: Checkpoint, todo: list[tuple[str, str]], hub: Hub,
                 record: UploadRecord, work: Path, desc: str, echo: Callable[[str], None]) -> list[Upload]:
    """One checkpoint: export (when the model repo needs it), then each upload; a progress bar over
    these stages (neoxt.progress: a bar on a terminal, a line in a log)."""
    from neoxt.progress import Progress

    began = time.time()
    export = work / ckpt.revision
    converts = any(repo == p.repo_id for repo, _ in todo)
    done = []
    with Progress(len(todo) + converts, desc, unit="stage") as bar:
        if converts:
            shutil.rmtree(export, ignore_errors=True)
            echo("converting to Hugging Face format")
            export_hf(ckpt.path, export, opts.dtype)
            ensure_chat_template(export, opts.chat_template)
            bar.update(postfix="converted")
        try:
            for repo, revision in todo:
                folder = export if repo == p.repo_id else ckpt.path
                echo(f"uploading to {repo}@{revision}")
                hub.ensure_branch(repo, revision)
                commit = hub.upload(folder, repo, revision, f"neoxt publish: {ckpt.path.parent.name} {ckpt.revision}")
                record.mark(repo, revision, commit, ckpt.step)  # only now: the commit exists on the Hub
                done.append(Upload(repo, revision, ckpt.step, commit))
                bar.update(postfix=f"uploaded {repo}@{revision}")
        finally:
            if not opts.keep_export:
                shutil.rmtree(export, ignore_errors=True)
    echo(f"done in {time.time() - began:.1f} s ({', '.join(f'{u.revision}@{u.commit[:8]}' for u in done)})")
    return done


def eval_suite_models(suite_path: str, repo_id: str) -> list[str]:
    """The aliases of a suite's models that are ``repo_id`` (publish --eval needs at least one)."""
    from neoxt.evaluate.models_registry import read_registry

    aliases = [m.alias for m in read_registry(Path(suite_path)).models.values() if m.source == repo_id]
    if not aliases:
        raise NeoxtError(f"{suite_path}: no model in its registry is {repo_id}; add e.g. "
                         f"`models: {{my-alias: {repo_id}}}` so --eval can run it")
    return aliases


def render_sbatch(argv: Sequence[str], repo_id: str, log_dir: Path, sbatch_options: Sequence[str]) -> str:
    """A job that runs ``neoxt publish`` with a singleton dependency named after the repo, so SLURM
    runs one publisher per repo at a time, however many are queued."""
    import shlex
    import sys

    name = f"publish_{repo_id.replace('/', '__')}"
    lines = ["#!/bin/bash", "# Written by `neoxt publish --slurm`", f"#SBATCH --job-name={name}",
             "#SBATCH --dependency=singleton", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
             f"#SBATCH --output={log_dir}/{name}-%j.out"]
    lines += [f"#SBATCH {opt}" for opt in sbatch_options]
    cmd = [sys.executable, "-m", "neoxt.cli", "publish", *argv]
    lines += ["", "set -euo pipefail", "export PYTHONUNBUFFERED=1", " ".join(shlex.quote(c) for c in cmd), ""]
    return "\n".join(lines)
