"""Reading pickled checkpoint files without letting them run code.

A pickle can name any importable callable (``os.system``) and have the unpickler call it, so a
checkpoint shared by someone else or downloaded from the Hub is code unless we refuse that. Every
pickle neoxt reads goes through this module:

- DCP ``.metadata``: ``MetadataUnpickler`` allows only the classes torch's checkpoint metadata is made
  of (``torch.distributed.checkpoint.metadata``'s dataclasses, ``_StorageInfo``, ``torch.Size``,
  dtypes, layouts, memory formats, paths).
- DCP non-tensor values (RNG states, schedule numbers, optimizer hyper-parameters) and every ``.pt`` /
  ``.bin`` file: ``torch.load(weights_only=True)`` plus ``PLAIN_GLOBALS``, the plain-data classes
  GPT-NeoX and DeepSpeed files really hold (numpy arrays for ``np_rng_state``, ``argparse.Namespace``
  for older ``args``). DeepSpeed's own objects (e.g. an fp16 optimizer's ``loss_scaler``) are refused.

A refusal is a ``CheckpointError`` naming the file and the class. ``neoxt --trust-checkpoint ...`` (env
``NEOXT_TRUST_CHECKPOINT=1``, inherited by launched ranks) switches to plain unpickling: only for files
whose author you trust, since their pickles then run with your permissions.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from pathlib import Path
from typing import IO, Any

from neoxt.errors import CheckpointError

log = logging.getLogger(__name__)

TRUST_ENV = "NEOXT_TRUST_CHECKPOINT"
TRUST_HINT = "rerun with --trust-checkpoint only if you trust whoever wrote this file (its pickle would run code)"

# Plain-data globals found in GPT-NeoX / DeepSpeed model-state files (besides what torch's weights-only
# unpickler already allows: tensors, OrderedDict, torch.Size, dtypes, builtins containers).
PLAIN_GLOBALS = (
    "argparse.Namespace",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
)

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "builtins": {"set", "frozenset", "slice"},
}

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def trusted() -> bool:
    """Whether the user asked (``--trust-checkpoint``) to unpickle checkpoint files without restriction."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


def refused(path: str | os.PathLike, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: refused to unpickle {what} (not plain checkpoint data); {TRUST_HINT}")


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata``: the metadata dataclasses and torch's value types, nothing else."""

    def __init__(self, file: IO[bytes], path: str | os.PathLike):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":  # dtypes, layouts and memory formats pickle as torch.<name>
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise refused(self.path, f"{module}.{name}")


def read_dcp_metadata_file(path: str | os.PathLike) -> Any:
    """The ``Metadata`` object in a DCP ``.metadata`` file, unpickled through ``MetadataUnpickler``."""
    with open(path, "rb") as f:
        if trusted():
            return pickle.load(f)
        return MetadataUnpickler(f, path).load()


def _plain_globals() -> list[Any]:
    import importlib

    import numpy as np

    found = []
    for name in PLAIN_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # numpy 1.x has numpy.core, numpy 2.x numpy._core
    # numpy >= 1.25 pickles a dtype through its numpy.dtypes.<Kind>DType class.
    found += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return found


def load_torch_file(source: str | os.PathLike | IO[bytes], *, name: str | os.PathLike | None = None,
                    mmap: bool = False) -> Any:
    """``torch.load`` on CPU with the weights-only unpickler and ``PLAIN_GLOBALS`` allowed.

    ``source`` is a path or a seekable binary file (``name`` then names it in errors). A file that needs
    any other global is refused naming it, unless the user trusts checkpoints (``--trust-checkpoint``)."""
    import torch

    label = name if name is not None else source
    is_path = isinstance(source, (str, os.PathLike))
    kwargs: dict[str, Any] = {"map_location": "cpu", "mmap": mmap and is_path}
    if trusted():
        log.info("%s: unpickling without restriction (--trust-checkpoint)", label)
        return torch.load(source, weights_only=False, **kwargs)
    try:
        with torch.serialization.safe_globals(_plain_globals()):
            return torch.load(source, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        m = _GLOBAL_RE.search(str(err))
        if m:
            raise refused(label, m.group(1)) from None
        raise CheckpointError(f"{label}: not a readable torch file ({_first_line(err)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{label}: not a readable torch file ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(err).__name__


def load_bytes_value(data: io.BytesIO, *, name: str) -> Any:
    """One DCP non-tensor value (stored by ``torch.save``), loaded like any other torch file."""
    return load_torch_file(data, name=name)


def safe_reader_and_planner(ckpt_dir: str | os.PathLike):
    """(storage reader, load planner) for ``dcp.load`` that unpickle only allowed classes."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    ckpt_dir = Path(ckpt_dir)

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            rank = kwargs.get("rank")
            metadata = read_dcp_metadata_file(ckpt_dir / (".metadata" if rank is None else f"__{rank}.metadata"))
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{ckpt_dir / '.metadata'}: holds {type(metadata).__name__}, not DCP metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class _Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            obj = load_bytes_value(value, name=f"{ckpt_dir} (value '{fqn}')")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return _Reader(str(ckpt_dir)), _Planner()
