"""Snapshot the keys of every config in the users' fork for ``tests/config/test_fork_configs.py``.

Usage: python scripts/snapshot_fork_configs.py <fork checkout> tests/config/fixtures/fork_configs.json.gz

Reads each ``configs/**.yml`` and ``post-training/configs/**.yml`` of a GeodesicResearch/geodesic-gpt-neox
checkout and stores the keys and values only, compactly: the distinct (key, value) pairs once, and per
file the indices of its pairs in file order (so the test rebuilds each file's mapping exactly).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml


def snapshot(root: Path) -> dict:
    pairs: list[list] = []
    index: dict[str, int] = {}
    configs: dict[str, list[int]] = {}
    files = sorted(p for d in ("configs", "post-training/configs") for p in (root / d).rglob("*.yml"))
    for path in files:
        doc = yaml.safe_load(path.read_text()) or {}
        ids = []
        for key, value in doc.items():
            token = json.dumps([key, value], sort_keys=True)
            if token not in index:
                index[token] = len(pairs)
                pairs.append([key, value])
            ids.append(index[token])
        configs[str(path.relative_to(root))] = ids
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"source": "GeodesicResearch/geodesic-gpt-neox", "commit": commit or None, "pairs": pairs, "configs": configs}


if __name__ == "__main__":
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.dumps(snapshot(root), sort_keys=True).encode()
    out.write_bytes(gzip.compress(data, mtime=0))
    print(f"{len(json.loads(data)['configs'])} configs -> {out} ({out.stat().st_size} bytes)")
