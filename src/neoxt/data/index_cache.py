"""The index-map cache files (upstream's names), read tolerantly and written so concurrent builders never clash.

Every rank of a job (and a second job on the same data) may build the same maps at once. Each writes
its three ``.npy`` files under temporary names unique to the process (``<file>.tmp.<pid>.<random>``)
and renames them into place; the arrays are identical, so whichever rename lands last is as good as
the first, and no reader ever sees a partial file. The directory is checked writable *before* the
maps are built, so a read-only ``index_cache_dir`` (or one that is a regular file) is a one-line error
in a second, not after the build.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from neoxt.data.index_maps import IndexSpec
from neoxt.data.outputs import check_output_dir
from neoxt.errors import DataError
from neoxt.io import unique_temp_path

log = logging.getLogger(__name__)

PARTS = ("doc_idx", "sample_idx", "shuffle_idx")


def cache_paths(prefix: str, spec: IndexSpec, cache_dir: str | None = None) -> dict[str, str]:
    """The three cache files: next to the data (upstream's names), or in ``cache_dir`` under the
    prefix's basename — so two datasets sharing a basename in different directories must not share a
    ``cache_dir`` (the staleness check catches most, not all, such clashes)."""
    base = prefix if cache_dir is None else os.path.join(cache_dir, os.path.basename(prefix))
    stem = spec.stem(base)
    return {part: f"{stem}_{part}.npy" for part in PARTS}


def load_cached_arrays(paths: dict[str, str]) -> dict[str, np.ndarray] | None:
    """The cached arrays (memory-mapped), or None when absent, unreadable or malformed (then rebuilt)."""
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        arrays = {part: np.load(paths[part], mmap_mode="r", allow_pickle=False) for part in PARTS}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable index cache %s (%s); rebuilding", paths["doc_idx"], err)
        return None
    sample_idx = arrays["sample_idx"]
    if sample_idx.ndim != 2 or sample_idx.shape[1] != 2 or arrays["doc_idx"].ndim != 1:
        log.warning("ignoring malformed index cache %s; rebuilding", paths["sample_idx"])
        return None
    # Plain ndarray views of the maps: still memory-mapped, without np.memmap's per-index overhead.
    return {part: np.asarray(a) for part, a in arrays.items()}


def check_cache_writable(paths: dict[str, str]) -> None:
    """DataError (one line, naming the directory and the key to change) unless the cache can be written."""
    directory = os.path.dirname(os.path.abspath(paths["doc_idx"]))
    try:
        check_output_dir(directory, "index cache directory")
    except DataError as err:
        raise DataError(f"{err} (set index_cache_dir to a writable directory)") from err


def save_cached_arrays(paths: dict[str, str], arrays: dict[str, np.ndarray]) -> None:
    """Write every part under a unique temporary name, then rename all; nothing partial on any error."""
    temps: dict[str, str] = {}
    try:
        for part in PARTS:
            temps[part] = os.fspath(unique_temp_path(paths[part]))
            with open(temps[part], "wb") as handle:
                np.save(handle, arrays[part], allow_pickle=False)
        for part in PARTS:
            os.replace(temps.pop(part), paths[part])
    except OSError as err:
        raise DataError(
            f"cannot write index cache {paths['doc_idx']}: {err.strerror or err} "
            "(set index_cache_dir to a writable directory)"
        ) from err
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
