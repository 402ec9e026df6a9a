"""Read GPT-NeoX-style config files and merge them, with ``--set`` overrides, into one key table.

Files are YAML as GPT-NeoX writes it: JSON-like, ``#`` comments, trailing commas, ``6e-4`` meaning a
float (a JSON file such as the fork's ``neox_config.json`` reads the same way). Key names fold ``-``
into ``_``. Merging across files follows GPT-NeoX's ``NeoXArgs.from_ymls``: a key that a later file
spells with ``-`` silently replaces the earlier value there (upstream compares the raw spelling
against the folded names it already holds), so ``configs/pythia/*.yml`` + ``docker/pythia-paths.yml``
resolve; neoxt says so in one log line. A key that a later file spells without ``-`` and that an
earlier file set is an error naming both files, as upstream. Inside one file a repeated key is an
error (PyYAML would silently keep the last one; upstream does too, neoxt refuses it).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neoxt.errors import ConfigError

log = logging.getLogger("neoxt.config")


@dataclass(frozen=True)
class Entry:
    """One key as the user wrote it: its value and where it came from."""

    value: Any
    source: str  # "file.yml:12", "--set" or "<dict>"
    spelling: str  # the key as written (dashes kept), for messages


class _NeoxLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``6e-4`` / ``1E5`` as floats (YAML 1.2 style, as JSON does)."""


_FLOAT_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
_NeoxLoader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_NeoxLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_scalar(text: str) -> Any:
    """Parse one YAML scalar the way a config file would (used for --set values)."""
    return yaml.load(text, Loader=_NeoxLoader) if text.strip() else ""


def normalize_key(key: str) -> str:
    return str(key).strip().replace("-", "_")


def _file_of(source: str) -> str:
    return source.rsplit(":", 1)[0]


def read_config_file(path: str | Path) -> dict[str, Entry]:
    """Read one YAML file into {normalized key: Entry}, refusing duplicate keys inside it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        node = yaml.compose(text, Loader=_NeoxLoader)
        data = yaml.load(text, Loader=_NeoxLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or node is None or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    seen_lines: dict[str, int] = {}
    for key_node, _ in node.value:
        key = normalize_key(key_node.value)
        line = key_node.start_mark.line + 1
        if key in seen_lines:
            raise ConfigError(
                f"{path}:{line}: key '{key_node.value}' is already set at line {seen_lines[key]} of the same file"
            )
        seen_lines[key] = line
    return {
        normalize_key(raw): Entry(value, f"{path}:{lines.get(str(raw), '?')}", str(raw)) for raw, value in data.items()
    }


def merge_entries(per_file: Iterable[dict[str, Entry]], overrides: Sequence[str] = ()) -> dict[str, Entry]:
    """Merge files in order (GPT-NeoX's rule, see the module docstring), then apply ``--set``."""
    merged: dict[str, Entry] = {}
    for entries in per_file:
        for key, entry in entries.items():
            if key in merged:
                first = merged[key]
                if "-" not in entry.spelling:
                    raise ConfigError(
                        f"{_file_of(entry.source)}: key '{entry.spelling}' is already set in "
                        f"{_file_of(first.source)} (as '{first.spelling}'); set it in one file only"
                    )
                log.warning(
                    "config: %s sets '%s', replacing '%s' from %s (GPT-NeoX lets a later file's dashed key win)",
                    _file_of(entry.source), entry.spelling, first.spelling, _file_of(first.source),
                )
            merged[key] = entry
    for item in overrides:
        apply_override(merged, item)
    return merged


def apply_override(merged: dict[str, Entry], item: str) -> None:
    """One ``--set KEY=VALUE``; ``a.b.c=v`` sets ``c`` inside the nested block ``a: {b: {...}}``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    raw_key, text = item.split("=", 1)
    try:
        value = parse_scalar(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: cannot parse the value") from None
    path = [part.strip() for part in raw_key.split(".")]
    if any(not part for part in path):
        raise ConfigError(f"--set {item!r}: empty key name")
    key = normalize_key(path[0])
    if len(path) == 1:
        merged[key] = Entry(value, "--set", raw_key.strip())
        return
    old = merged.get(key)
    root = copy.deepcopy(old.value) if old is not None and old.value is not None else {}
    block = root
    for depth, part in enumerate(path[1:-1], start=1):
        block = _child_block(block, part, item, ".".join(path[:depth]))
    if not isinstance(block, dict):
        raise ConfigError(f"--set {item!r}: '{'.'.join(path[:-1])}' is not a block of keys")
    block[_block_key(block, path[-1])] = value
    merged[key] = Entry(root, "--set", path[0])


def _block_key(block: dict, name: str) -> str:
    """The existing spelling of ``name`` in ``block`` (``-``/``_`` alike), else ``name`` itself."""
    return next((k for k in block if normalize_key(k) == normalize_key(name)), name)


def _child_block(block: Any, name: str, item: str, where: str) -> dict:
    if not isinstance(block, dict):
        raise ConfigError(f"--set {item!r}: '{where}' is not a block of keys")
    key = _block_key(block, name)
    if block.get(key) is None:
        block[key] = {}
    return block[key]
