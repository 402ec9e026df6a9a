"""The eval suite: every model × system prompt × task folder, resumable, gathered into one table.

A suite file (YAML; relative paths are relative to it)::

    models:                      # alias: local path | Hub id | {path: ..., chat_template: ...}
      pythia-sft: /runs/pythia-sft          # neoxt run dir, global_step dir or HF dir
      llama-chat: meta-llama/Llama-3.1-8B-Instruct
      base: {path: ./hf/base, chat_template: ./chat.jinja}   # a template for a model without one
    groups:                      # optional: name: [aliases or groups]
      mine: [pythia-sft, base]
    models_file: models.yaml     # optional: a shared registry (models + groups, see models_registry)
    run: [mine, llama-chat]      # optional (default: every model): aliases and groups
    task_folders:                # each holds task YAMLs and system_prompts.json
      - tasks/safety
      - {path: tasks/refusals, tasks: [refusal_mc]}   # default: every `task:` in the folder
    output_dir: results          # default: <suite dir>/results
    num_fewshot: 0               # optional; also limit, batch_size, max_length, seed
    wandb: {project: evals, entity: my-team}   # optional: one run per model × folder × prompt,
                                 # name/group templates over {model} {prompt} {tasks} {n_tasks}
    slurm: {partition: gpu, account: proj, time: "02:00:00", gpus: 1, cpus: 8,   # optional, for --slurm
            python: /path/to/venv/bin/python, env: {HF_HUB_OFFLINE: "1"}, extra_sbatch: ["--qos=high"]}

``system_prompts.json`` is ``{"name": "prompt text", ...}`` (or a list of texts, named p1, p2, …).

Each (model, folder, system prompt) writes ``<output_dir>/<model>/<folder>/<prompt>.json`` — lm-eval's
results JSON, written atomically — so a rerun skips the pairs already done and a pair can equally be
produced by ``neoxt eval ... --output`` in a SLURM job: ``neoxt eval-suite suite.yml --slurm`` writes
one sbatch script per pending pair and submits it, and ``--gather`` later builds the table from the
result files. System prompts go through the chat template, so every model's template is checked
before the first job starts, locally or on SLURM.

From the command line: ``--model NAME`` (aliases or groups) overrides ``run``, ``--system-prompt
NAME`` keeps one prompt of each folder, and ``--checkpoints all|N,M`` evaluates each model's
intermediate checkpoints (a local run's ``global_step<N>`` or a Hub repo's branches).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neoxt.errors import ConfigError, DataError
from neoxt.evaluate.models_registry import (
    ModelEntry,
    checkpoint_entries,
    expand,
    hub_checkpoint_revisions,
    read_yaml_mapping,
    registry_from,
)
from neoxt.io import write_text_atomic

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUITE_KEYS = {
    "models", "groups", "models_file", "run", "task_folders", "output_dir", "num_fewshot", "limit", "batch_size",
    "max_length", "seed", "wandb", "slurm",
}
_SLURM_KEYS = {"partition", "account", "time", "gpus", "cpus", "python", "env", "extra_sbatch"}


@dataclass(frozen=True)
class TaskFolder:
    name: str
    path: Path
    tasks: tuple[str, ...]
    prompts: tuple[tuple[str, str], ...]  # (name, text)


@dataclass(frozen=True)
class Suite:
    path: Path
    models: tuple[ModelEntry, ...]  # the ones to run, in order
    folders: tuple[TaskFolder, ...]
    output_dir: Path
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 8
    max_length: int | None = None
    seed: int = 1234
    wandb: dict[str, Any] | None = None
    slurm: dict[str, Any] | None = None


@dataclass(frozen=True)
class SuiteJob:
    model: ModelEntry
    folder: TaskFolder
    prompt_name: str
    prompt_text: str
    result_path: Path

    @property
    def label(self) -> str:
        return f"{self.model.alias} × {self.prompt_name} × {self.folder.name}"


def safe_name(text: str) -> str:
    """``text`` as one path component: never ``.``/``..`` or a hidden name, so an alias cannot
    write outside ``output_dir``."""
    return _SAFE.sub("_", text).strip("_.") or "_"


def folder_tasks(folder: Path) -> tuple[str, ...]:
    """Task (and group) names declared by the YAML files of a folder, in file-name order."""
    names = []
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_LenientLoader)
        except yaml.YAMLError as err:
            raise DataError(f"{path}: invalid YAML ({err})") from None
        if isinstance(doc, dict):
            name = doc.get("task") if isinstance(doc.get("task"), str) else doc.get("group")
            if isinstance(name, str):
                names.append(name)
    return tuple(names)


class _LenientLoader(yaml.SafeLoader):
    """Task YAMLs may use lm-eval's ``!function`` tag; reading names must not choke on it."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def read_system_prompts(folder: Path) -> tuple[tuple[str, str], ...]:
    path = folder / "system_prompts.json"
    if not path.is_file():
        raise ConfigError(f"task folder {folder}: system_prompts.json is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if isinstance(data, list):
        data = {f"p{i + 1}": text for i, text in enumerate(data)}
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
        raise DataError(f"{path}: expected {{\"name\": \"prompt text\", ...}} or a list of prompt texts")
    names = [safe_name(str(k)) for k in data]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: two system prompt names map to the same file name")
    return tuple(zip(names, data.values()))


def _read_folders(raw: dict[str, Any], base: Path, where: str, system_prompt: str | None) -> list[TaskFolder]:
    folders = []
    specs = raw.get("task_folders")
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f"{where}: 'task_folders' must be a non-empty list")
    for i, spec in enumerate(specs):
        key = f"{where}: task_folders[{i}]"
        tasks = None
        if isinstance(spec, dict):
            tasks = spec.get("tasks")
            spec = spec.get("path")
        if not isinstance(spec, str):
            raise ConfigError(f"{key}: needs a folder path")
        folder = (base / spec).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"{key}: {spec} is not a directory")
        names = tuple(str(t) for t in tasks) if tasks else folder_tasks(folder)
        if not names:
            raise ConfigError(f"{key}: {spec} declares no lm-eval task (no YAML with a 'task:' key)")
        prompts = read_system_prompts(folder)
        if system_prompt is not None:
            prompts = tuple(p for p in prompts if p[0] == safe_name(system_prompt))
            if not prompts:
                have = ", ".join(n for n, _ in read_system_prompts(folder))
                raise ConfigError(f"--system-prompt {system_prompt}: {folder / 'system_prompts.json'} has no such "
                                  f"prompt (it has {have})")
        folders.append(TaskFolder(safe_name(folder.name), folder, names, prompts))
    if len({f.name for f in folders}) != len(folders):
        raise ConfigError(f"{where}: two task folders have the same name; results would collide")
    return folders


def load_suite(
    path: str | Path,
    *,
    models: Sequence[str] | None = None,
    system_prompt: str | None = None,
    checkpoints: str | None = None,
    list_revisions: Callable[[str], list[str]] = hub_checkpoint_revisions,
) -> Suite:
    """Read and check a suite file; every error names the file and key.

    ``models`` (aliases or groups) replaces the file's ``run``; ``system_prompt`` keeps only the
    prompt of that name; ``checkpoints`` (``all`` or ``N,M``) expands every model into its
    intermediate checkpoints (``list_revisions`` lists a Hub repo's ``global_step`` branches)."""
    path = Path(path)
    where = str(path)
    raw = read_yaml_mapping(path, "suite file", "a mapping with 'models' and 'task_folders'")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_SUITE_KEYS))})")
    base = path.parent.resolve()
    reg = registry_from(raw, base, where)
    if models:
        selected = expand(models, reg, "--model")
    else:
        run = raw.get("run")
        selected = expand(run if run is not None else list(reg.models), reg, f"{where}: run")
    if not selected:
        raise ConfigError(f"{where}: 'run' selects no model")
    entries = [reg.models[a] for a in selected]
    if checkpoints is not None:
        entries = [c for e in entries for c in checkpoint_entries(e, checkpoints, list_revisions)]
    folders = _read_folders(raw, base, where, system_prompt)

    wandb = raw.get("wandb")
    if wandb is not None and not isinstance(wandb, dict):
        raise ConfigError(f"{where}: 'wandb' must be a mapping (project, entity, group, name)")
    slurm = raw.get("slurm")
    if slurm is not None:
        if not isinstance(slurm, dict):
            raise ConfigError(f"{where}: 'slurm' must be a mapping ({', '.join(sorted(_SLURM_KEYS))})")
        unknown = set(slurm) - _SLURM_KEYS
        if unknown:
            raise ConfigError(f"{where}: slurm: unknown key {sorted(unknown)[0]!r} "
                              f"(known: {', '.join(sorted(_SLURM_KEYS))})")
    try:
        return Suite(
            path=path,
            models=tuple(entries),
            folders=tuple(folders),
            output_dir=(base / str(raw.get("output_dir", "results"))).resolve(),
            num_fewshot=None if raw.get("num_fewshot") is None else int(raw["num_fewshot"]),
            limit=None if raw.get("limit") is None else float(raw["limit"]),
            batch_size=int(raw.get("batch_size", 8)),
            max_length=None if raw.get("max_length") is None else int(raw["max_length"]),
            seed=int(raw.get("seed", 1234)),
            wandb=wandb,
            slurm=slurm,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def build_jobs(suite: Suite) -> list[SuiteJob]:
    """Every model × task folder × system prompt, model-major so each model loads once."""
    return [
        SuiteJob(model, folder, name, text, suite.output_dir / safe_name(model.alias) / folder.name / f"{name}.json")
        for model in suite.models
        for folder in suite.folders
        for name, text in folder.prompts
    ]


def job_command(job: SuiteJob, suite: Suite) -> list[str]:
    """The ``neoxt eval`` command line that produces one pair's result file (for SLURM jobs)."""
    cmd = ["neoxt", "eval", "--model", job.model.source, "--tasks", *job.folder.tasks,
           "--include-path", str(job.folder.path), "--apply-chat-template", "--system-prompt", job.prompt_text,
           "--output", str(job.result_path), "--batch-size", str(suite.batch_size), "--seed", str(suite.seed)]
    if job.model.revision is not None:
        cmd += ["--revision", job.model.revision]
    if job.model.chat_template is not None:
        cmd += ["--chat-template", job.model.chat_template]
    if suite.num_fewshot is not None:
        cmd += ["--num-fewshot", str(suite.num_fewshot)]
    if suite.limit is not None:
        cmd += ["--limit", str(suite.limit)]
    if suite.max_length is not None:
        cmd += ["--max-length", str(suite.max_length)]
    return cmd


def shell_line(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def render_sbatch(job: SuiteJob, suite: Suite) -> str:
    """A one-GPU (by default) sbatch script that produces one pair's result file (pure function).

    The suite's ``slurm`` block sets partition, account, time, gpus, cpus, python (the interpreter
    that has neoxt), env and extra_sbatch lines. Result files are written atomically by
    ``neoxt eval``, so a job killed at its time limit leaves the pair pending for the next run.
    """
    opts = dict(suite.slurm or {})
    name = f"eval-{safe_name(job.model.alias)}-{job.folder.name}-{job.prompt_name}"
    log_dir = suite.output_dir / "slurm" / "logs"
    lines = ["#!/bin/bash", f"# Written by `neoxt eval-suite --slurm` for {job.label} of {suite.path}",
             f"#SBATCH --job-name={name}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
             f"#SBATCH --time={opts.get('time', '04:00:00')}", f"#SBATCH --output={log_dir}/{name}-%j.out"]
    gpus = int(opts.get("gpus", 1))
    if gpus > 0:
        lines.append(f"#SBATCH --gpus={gpus}")
    if opts.get("cpus"):
        lines.append(f"#SBATCH --cpus-per-task={int(opts['cpus'])}")
    for key in ("partition", "account"):
        if opts.get(key):
            lines.append(f"#SBATCH --{key}={opts[key]}")
    lines += [f"#SBATCH {extra}" for extra in opts.get("extra_sbatch", [])]
    lines += ["", "set -euo pipefail", "export PYTHONUNBUFFERED=1"]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in (opts.get("env") or {}).items()]
    cmd = job_command(job, suite)
    python = opts.get("python")
    if python:  # run the CLI through a given interpreter instead of `neoxt` on PATH
        cmd = [str(python), "-m", "neoxt.cli", *cmd[1:]]
    lines += ["", shell_line(cmd), ""]
    return "\n".join(lines)


def check_chat_templates(suite: Suite, has_template: Callable[[ModelEntry], bool]) -> None:
    """Fail before any job when a model has no chat template (system prompts need one)."""
    missing = [m for m in suite.models if m.chat_template is None and not has_template(m)]
    if missing:
        names = ", ".join(f"'{m.alias}' ({m.source})" for m in missing)
        raise ConfigError(
            f"{suite.path}: model {names} has no chat template, and system prompts are applied through it; "
            "fix: give the model entry a template, e.g. `models: {alias: {path: ..., chat_template: chat.jinja}}`, "
            "or save one in the model's tokenizer_config.json / tokenizer.chat_template"
        )


# --- gathering -----------------------------------------------------------------------------------


def _metric_columns(rows: list[dict[str, Any]], with_stderr: bool) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for key in row["metrics"]:
            if (with_stderr or "_stderr" not in key) and key not in cols:
                cols.append(key)
    return sorted(cols, key=lambda c: (c.replace("_stderr", ""), "_stderr" in c))


def gather(suite: Suite, jobs: Sequence[SuiteJob]) -> list[dict[str, Any]]:
    """One row per (model, system prompt, folder, task) from the result files that exist."""
    rows = []
    for job in jobs:
        if not job.result_path.is_file():
            continue
        try:
            results = json.loads(job.result_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{job.result_path}: invalid JSON ({err.msg}); delete it to rerun the pair") from None
        for task, metrics in sorted(results.get("results", {}).items()):
            values = {}
            for key, value in metrics.items():
                if "," not in key or not isinstance(value, int | float):  # alias, sample_len, ...
                    continue
                metric, _, filt = key.partition(",")
                values[metric if filt in ("", "none") else f"{metric}[{filt}]"] = float(value)
            rows.append({"model": job.model.alias, "system_prompt": job.prompt_name,
                         "task_folder": job.folder.name, "task": task, "metrics": values})
    return rows


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    cols = _metric_columns(rows, with_stderr=False)
    head = ["model", "system_prompt", "task_folder", "task", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["model"], r["system_prompt"], r["task_folder"], r["task"], *(_fmt(r["metrics"].get(c)) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict[str, Any]]) -> str:
    cols = _metric_columns(rows, with_stderr=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "system_prompt", "task_folder", "task", *cols])
    for r in rows:
        writer.writerow([r["model"], r["system_prompt"], r["task_folder"], r["task"],
                         *(r["metrics"].get(c, "") for c in cols)])
    return buf.getvalue()


def write_tables(suite: Suite, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    md, csv_path = suite.output_dir / "results.md", suite.output_dir / "results.csv"
    write_text_atomic(md, table_markdown(rows))
    write_text_atomic(csv_path, table_csv(rows))
    return md, csv_path


WANDB_NAME = "instruct_open__{model}__{prompt}__{n_tasks}_tasks_openended"
WANDB_GROUP = "instruct_open__{tasks}__{model}"


def wandb_names(suite: Suite, job: SuiteJob) -> tuple[str, str]:
    """(run name, group) of a pair: the suite's ``wandb.name``/``wandb.group`` templates, by default
    the users' ``instruct_open__{model}__{prompt}__{n_tasks}_tasks_openended`` and
    ``instruct_open__{tasks}__{model}`` ({tasks}: the task folder's name)."""
    cfg = suite.wandb or {}
    fields = {"model": job.model.alias, "prompt": job.prompt_name, "tasks": job.folder.name,
              "n_tasks": len(job.folder.tasks)}
    try:
        return (str(cfg.get("name", WANDB_NAME)).format(**fields), str(cfg.get("group", WANDB_GROUP)).format(**fields))
    except (KeyError, IndexError) as err:
        raise ConfigError(f"{suite.path}: wandb name/group template uses unknown field {err} "
                          "(known: model, prompt, tasks, n_tasks)") from None


def log_wandb(suite: Suite, jobs: Sequence[SuiteJob], rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One W&B run per model × task folder × system prompt that has results (the users' layout:
    runs named per model and prompt, grouped per task folder and model); returns (name, group)s."""
    try:
        import wandb
    except ModuleNotFoundError:
        raise ConfigError(f"{suite.path}: 'wandb' is configured but the wandb package is missing "
                          "(pip install wandb, or remove the 'wandb' block)") from None
    cfg = dict(suite.wandb or {})
    logged = []
    for job in jobs:
        mine = [r for r in rows if (r["model"], r["task_folder"], r["system_prompt"])
                == (job.model.alias, job.folder.name, job.prompt_name)]
        if not mine:
            continue
        name, group = wandb_names(suite, job)
        run = wandb.init(project=cfg.get("project", "neoxt-eval"), entity=cfg.get("entity"), group=group, name=name,
                         config={"suite": str(suite.path), "model": job.model.alias, "source": job.model.source,
                                 "revision": job.model.revision, "system_prompt": job.prompt_name,
                                 "system_prompt_text": job.prompt_text, "task_folder": job.folder.name,
                                 "tasks": list(job.folder.tasks)})
        run.log({f"{r['task']}/{metric}": value for r in mine for metric, value in r["metrics"].items()})
        logged.append((run.name, run.group))  # as W&B recorded them
        run.finish()
    return logged


def check_wandb(suite: Suite) -> None:
    if suite.wandb is not None:
        try:
            import wandb  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError(f"{suite.path}: 'wandb' is configured but the wandb package is missing "
                              "(pip install wandb, or remove the 'wandb' block)") from None


def run_suite(
    suite: Suite,
    evaluate_pair: Callable[[SuiteJob], dict[str, Any]],
    has_template: Callable[[ModelEntry], bool],
    *,
    echo: Callable[[str], None] = print,
) -> tuple[list[SuiteJob], list[SuiteJob], list[dict[str, Any]]]:
    """Run the pending pairs one after another; returns (ran, skipped, table rows).

    ``evaluate_pair`` returns lm-eval's results dict for a job (loading/caching models is its
    business); each is written atomically as soon as it finishes, so an interrupted suite resumes.
    """
    from neoxt.evaluate.harness import write_results

    check_chat_templates(suite, has_template)
    check_wandb(suite)
    jobs = build_jobs(suite)
    pending = [j for j in jobs if not j.result_path.is_file()]
    skipped = [j for j in jobs if j.result_path.is_file()]
    echo(f"eval-suite: {len(jobs)} pairs, {len(skipped)} already done, {len(pending)} to run")
    for i, job in enumerate(pending, 1):
        began = time.time()
        results = evaluate_pair(job)
        results = {k: v for k, v in results.items() if k != "samples"}
        results["neoxt_suite"] = {"model": job.model.alias, "source": job.model.source, "revision": job.model.revision,
                                  "task_folder": job.folder.name, "system_prompt": job.prompt_name,
                                  "system_prompt_text": job.prompt_text}
        write_results(job.result_path, results)
        echo(f"eval-suite: [{i}/{len(pending)}] {job.label} done in {time.time() - began:.1f} s → {job.result_path}")
    rows = gather(suite, jobs)
    md, csv_path = write_tables(suite, rows)
    echo(f"eval-suite: table → {md} and {csv_path}")
    if suite.wandb is not None:
        log_wandb(suite, jobs, rows)
    return pending, skipped, rows


def submit_slurm(
    suite: Suite,
    has_template: Callable[[ModelEntry], bool],
    *,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One sbatch job per pending pair; scripts under ``<output_dir>/slurm/``, ids in ``jobs.json``.

    Pairs whose result file exists are skipped, as in a local run; when the jobs are done,
    ``neoxt eval-suite --gather`` builds the table from the result files.
    """
    from neoxt.distributed.launch import sbatch_submit

    check_chat_templates(suite, has_template)
    slurm_dir = suite.output_dir / "slurm"
    (slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    submitted = []
    for job in build_jobs(suite):
        if job.result_path.is_file():
            continue
        script = slurm_dir / f"{safe_name(job.model.alias)}__{job.folder.name}__{job.prompt_name}.sbatch"
        write_text_atomic(script, render_sbatch(job, suite))
        job_id = None if dry_run else sbatch_submit(script)
        submitted.append({"pair": job.label, "script": str(script), "result": str(job.result_path),
                          "job_id": job_id})
        echo(f"eval-suite: {'wrote' if dry_run else f'submitted job {job_id}:'} {script}")
    if submitted and not dry_run:
        record = slurm_dir / "jobs.json"
        previous = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else []
        write_text_atomic(record, json.dumps(previous + submitted, indent=2))
    echo(f"eval-suite: {len(submitted)} pair(s) {'written' if dry_run else 'submitted'}; "
         "when they finish, `neoxt eval-suite SUITE --gather` builds the table")
    return submitted


def gather_only(suite: Suite, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Build the tables from whatever result files exist (after SLURM jobs), running nothing."""
    jobs = build_jobs(suite)
    done = [j for j in jobs if j.result_path.is_file()]
    rows = gather(suite, jobs)
    md, csv_path = write_tables(suite, rows)
    echo(f"eval-suite: {len(done)}/{len(jobs)} pairs have results; table → {md} and {csv_path}")
    if suite.wandb is not None:
        log_wandb(suite, jobs, rows)
    return rows
