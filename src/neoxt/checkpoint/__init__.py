"""The neoxt checkpoint format and ``load_model``: one package that train, convert, generate and
evaluate all read and write through, so no later stage has to import ``train`` or ``convert``.

- ``layout.py``: the on-disk format (DESIGN.md "Checkpoints"): ``<save>/global_step<N>/`` as a
  torch.distributed.checkpoint directory plus ``config.yml`` and ``meta.json``, the ``latest``
  pointer, atomic publish (write ``global_step<N>.tmp-<host>-<pid>/``, rename when complete), listing, pruning.
- ``loading.py``: ``load_model(path)`` for a run directory, a ``global_step<N>`` directory or a
  Hugging Face model directory (the HF name maps live with the model families in ``neoxt.model``).

What guards untrusted files and shared directories (DESIGN.md "Untrusted files"), each its own module
called from ``layout.py`` so every reader and writer gets it:

- ``safety.py``: no pickle runs code (allowlisted unpickler for DCP ``.metadata``, weights-only loads
  with DeepSpeed's plain-data globals for values and ``.pt``/``.bin``; ``--trust-checkpoint``).
- ``integrity.py``: ``checksums.sha256`` written with each checkpoint, verified when it is read.
- ``lock.py``: one training run per ``save`` directory (``neoxt.lock``).

The names below are the package's public surface (``from neoxt import checkpoint as ckpt``).
"""

from neoxt.checkpoint.layout import (
    CONFIG_FILE,
    LATEST_FILE,
    META_FILE,
    is_checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    point_latest,
    prune_checkpoints,
    read_config_text,
    read_dcp_metadata,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
)


def load_model(path, device="cpu", dtype=None):
    """A neoxt run dir, ``global_step<N>`` dir or HF model dir → ``Transformer`` in eval mode.

    Imported lazily so that reading checkpoint metadata does not import the model and torch eagerly."""
    from neoxt.checkpoint.loading import load_model as _load_model

    return _load_model(path, device=device, dtype=dtype)


__all__ = [
    "CONFIG_FILE", "LATEST_FILE", "META_FILE", "is_checkpoint_dir", "latest_checkpoint", "list_checkpoints",
    "load_model", "load_state", "point_latest", "prune_checkpoints", "read_config_text", "read_dcp_metadata", "read_meta", "resolve_checkpoint",
    "save_checkpoint", "step_dir_name",
]
