"""The models registry: short aliases for models (local paths or Hub ids) and named groups of them.

It is the users' ``models.yaml``, kept in its own file so one registry serves every suite::

    models:                       # alias: path | Hub id | {path: ..., chat_template: ...}
      sfm_baseline: geodesic-research/sfm-baseline
      my_sft: /runs/my_sft        # a neoxt run dir (its checkpoints: --checkpoints), global_step or HF dir
    groups:
      BASELINES: [sfm_baseline, my_sft]
      ALL: [BASELINES, other]     # groups may name groups

A suite file may hold ``models``/``groups`` itself, point at a registry with ``models_file``, or both
(its own entries extend the file's; one alias defined twice is an error). Selecting names expands
groups in order without duplicates; ``--checkpoints`` turns each selected model into one entry per
intermediate checkpoint: ``global_step<N>`` directories of a local run, or branches of a Hub repo.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from neoxt.errors import ConfigError

_STEP = re.compile(r"^global_step(\d+)$")


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    source: str  # a local path (absolute) or a Hub id
    chat_template: str | None = None  # template text, resolved from the entry
    revision: str | None = None  # a Hub branch (e.g. global_step1000) for a Hub id


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelEntry]
    groups: dict[str, list[str]]


def looks_local(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.count("/") != 1


def _resolve_template(value: str, base: Path, where: str) -> str:
    if "{" in value:
        return value
    path = (base / value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{where}: chat_template {value!r} is neither a Jinja template nor a file")
    return path.read_text(encoding="utf-8")


def parse_models(raw: Any, base: Path, where: str) -> dict[str, ModelEntry]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'models' must map aliases to paths or Hub ids")
    models = {}
    for alias, spec in raw.items():
        key = f"{where}: models.{alias}"
        template = None
        if isinstance(spec, dict):
            unknown = set(spec) - {"path", "chat_template"}
            if unknown:
                raise ConfigError(f"{key}: unknown key {sorted(unknown)[0]!r} (known: path, chat_template)")
            if "chat_template" in spec:
                template = _resolve_template(str(spec["chat_template"]), base, key)
            spec = spec.get("path")
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"{key}: needs a path or Hub id")
        # An existing path wins; 'org/name' that is not a path is a Hub id; anything else is a typo.
        local = base / Path(spec).expanduser()
        if not local.exists() and looks_local(spec):
            raise ConfigError(f"{key}: {spec} does not exist")
        source = str(local.resolve()) if local.exists() else spec
        models[str(alias)] = ModelEntry(str(alias), source, template)
    return models


def parse_groups(raw: Any, where: str) -> dict[str, list[str]]:
    groups = raw or {}
    if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
        raise ConfigError(f"{where}: 'groups' must map names to lists of aliases")
    return {str(k): [str(x) for x in v] for k, v in groups.items()}


def read_yaml_mapping(path: Path, what: str, expected: str = "a mapping") -> dict[str, Any]:
    """The YAML mapping in ``path``; a missing file, bad YAML or another shape is one ConfigError."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected {expected}")
    return raw


def registry_from(raw: dict[str, Any], base: Path, where: str) -> Registry:
    """The registry of a suite mapping: its ``models_file`` (if any) extended by its own entries."""
    models: dict[str, ModelEntry] = {}
    groups: dict[str, list[str]] = {}
    if raw.get("models_file") is not None:
        path = (base / str(raw["models_file"])).expanduser().resolve()
        file_raw = read_yaml_mapping(path, "models file")
        unknown = set(file_raw) - {"models", "groups"}
        if unknown:
            raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: groups, models)")
        models.update(parse_models(file_raw.get("models") or {}, path.parent, str(path)))
        groups.update(parse_groups(file_raw.get("groups"), str(path)))
    own_models = parse_models(raw.get("models") or {}, base, where)
    own_groups = parse_groups(raw.get("groups"), where)
    for name in [*own_models, *own_groups]:
        if name in models or name in groups:
            raise ConfigError(f"{where}: {name!r} is defined both here and in models_file {raw['models_file']}")
    models.update(own_models)
    groups.update(own_groups)
    if not models:
        raise ConfigError(f"{where}: no models (give 'models' or a 'models_file')")
    clash = set(groups) & set(models)
    if clash:
        raise ConfigError(f"{where}: {sorted(clash)[0]!r} is both a model alias and a group")
    return Registry(models, groups)


def read_registry(suite_path: Path) -> Registry:
    """The registry a suite file sees (its models_file plus its own models and groups)."""
    return registry_from(read_yaml_mapping(suite_path, "suite file"), suite_path.parent.resolve(), str(suite_path))


def expand(names: Sequence[Any], reg: Registry, where: str, seen: tuple[str, ...] = ()) -> list[str]:
    """Aliases named directly or through (nested) groups, in order, each once."""
    out: list[str] = []
    for name in names:
        name = str(name)
        if name in reg.models:
            out.append(name)
        elif name in reg.groups:
            if name in seen:
                raise ConfigError(f"{where}: group {name!r} contains itself")
            out.extend(expand(reg.groups[name], reg, where, (*seen, name)))
        else:
            known = ", ".join(sorted([*reg.models, *reg.groups]))
            raise ConfigError(f"{where}: {name!r} is neither a model alias nor a group (known: {known})")
    return list(dict.fromkeys(out))


def hub_checkpoint_revisions(repo_id: str) -> list[str]:
    """The ``global_step<N>`` branches of a Hub repo (what `neoxt publish` uploads)."""
    import os

    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None)
    try:
        refs = api.list_repo_refs(repo_id)
    except Exception as err:  # offline, 404, auth: all end the same way for the user
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--checkpoints all: cannot list the branches of {repo_id} ({first})") from None
    return [b.name for b in refs.branches if _STEP.match(b.name)]


def parse_steps(spec: str) -> list[int] | None:
    """``all`` → None; ``N,M`` → [N, M]."""
    if spec.strip() == "all":
        return None
    try:
        return [int(s.strip().removeprefix("global_step")) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--checkpoints {spec}: expected all or step numbers like 1000,2000") from None


def checkpoint_entries(
    entry: ModelEntry, spec: str, list_revisions: Callable[[str], list[str]] = hub_checkpoint_revisions,
) -> list[ModelEntry]:
    """One entry per chosen checkpoint of a model, oldest first, aliased ``<alias>-global_step<N>``."""
    steps = parse_steps(spec)
    local = Path(entry.source)
    if local.exists():
        found = {int(m.group(1)): p for p in local.iterdir() if p.is_dir() and (m := _STEP.match(p.name))}
        if not found:
            raise ConfigError(f"--checkpoints: model {entry.alias!r} ({entry.source}) is not a run directory "
                              "with global_step<N> checkpoints")
        missing = [s for s in steps or [] if s not in found]
        if missing:
            raise ConfigError(f"--checkpoints: {entry.alias!r} has no global_step{missing[0]} "
                              f"(it has {', '.join(str(s) for s in sorted(found))})")
        chosen = sorted(found) if steps is None else steps
        return [replace(entry, alias=f"{entry.alias}-global_step{s}", source=str(found[s])) for s in chosen]
    if steps is None:
        steps = sorted(int(_STEP.match(r).group(1)) for r in list_revisions(entry.source))
        if not steps:
            raise ConfigError(f"--checkpoints all: {entry.source} has no global_step<N> branch")
    return [replace(entry, alias=f"{entry.alias}-global_step{s}", revision=f"global_step{s}") for s in steps]


def local_source(entry: ModelEntry) -> str:
    """A path to load: the entry's own, or the Hub revision downloaded into the HF cache."""
    if entry.revision is None:
        return entry.source
    return hub_snapshot(entry.source, entry.revision)


def hub_snapshot(repo_id: str, revision: str) -> str:
    """Download one revision of a Hub model (weights, config, tokenizer) and return its directory."""
    import os

    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None,
                                 allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt"])
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{repo_id}@{revision}: cannot download ({type(err).__name__}: {first})") from None
