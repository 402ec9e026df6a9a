"""``load:`` naming a GPT-NeoX/DeepSpeed checkpoint: import it on the fly for ``neoxt train``.

The users' SFT configs point ``load`` at a GPT-NeoX save directory (often one the fork's HF→NeoX
converter wrote, in the Transformer Engine layout). Rather than asking for a separate conversion
step, ``neoxt train`` reads and maps that checkpoint (``neoxt.convert.neox``) into a neoxt checkpoint
in a temporary directory and trains from it, announcing it in one log line. DeepSpeed optimizer
state is not imported: the run starts from the weights with a fresh optimizer and the counter at 0,
as ``finetune: true`` does (the users' recipe sets it anyway).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

from neoxt.config.schema import RunConfig
from neoxt.convert.neox_files import LAYER_FILE_RE, MP_FILE_RE
from neoxt.errors import CheckpointError

_STEP = re.compile(r"^global_step\d+$")


def neox_source(cfg: RunConfig) -> Path | None:
    """The GPT-NeoX ``global_step<N>`` directory ``load`` (+ ``iteration``) names, or None when
    ``load`` is not a GPT-NeoX checkpoint (a neoxt run, an HF model, or nothing)."""
    c = cfg.checkpoint
    if not c.load:
        return None
    base = Path(c.load)
    if c.iteration is not None and not _STEP.match(base.name):
        step = base / f"global_step{c.iteration}"
    elif (base / "latest").is_file() and not _holds_neox_files(base):
        step = base / (base / "latest").read_text(encoding="utf-8").strip()
    else:
        step = base
    return step if _holds_neox_files(step) else None


def _holds_neox_files(path: Path) -> bool:
    try:
        return any(LAYER_FILE_RE.match(n) or MP_FILE_RE.match(n) for n in os.listdir(path))
    except OSError:
        return False


def import_load_on_the_fly(cfg: RunConfig, workdir: Path, say: Callable[[str], None]) -> RunConfig:
    """``cfg`` with ``load`` pointing at a neoxt import of its GPT-NeoX checkpoint (weights only,
    ``finetune`` semantics), or ``cfg`` itself when there is nothing to import — including when
    ``save`` already holds a checkpoint, which wins (automatic resume)."""
    from neoxt.checkpoint import latest_checkpoint, save_checkpoint
    from neoxt.convert.neox import read_neox_checkpoint

    c = cfg.checkpoint
    if c.save and latest_checkpoint(c.save) is not None:
        return cfg
    src = neox_source(cfg)
    if src is None:
        return cfg
    try:
        res = read_neox_checkpoint(src, cfg.model)
    except CheckpointError as err:
        raise CheckpointError(
            f"load: {src} is a GPT-NeoX/DeepSpeed checkpoint that does not fit this config ({err}); make the model "
            f"keys match the run that wrote it (e.g. merge its neox_config.yml), or convert it first with "
            f"`neoxt convert neox-to-neoxt --input-dir {src} --config <its config>`"
        ) from err
    if cfg.model.padded_vocab_size and res.model.padded_vocab_size != cfg.model.padded_vocab_size:
        raise CheckpointError(
            f"load: {src}: its embedding has {res.model.padded_vocab_size} rows, this config pads the vocabulary "
            f"to {cfg.model.padded_vocab_size}; set make_vocab_size_divisible_by / the tokenizer to match"
        )
    run = workdir / "neox-import"
    save_checkpoint(run, 0, {"model": res.state_dict}, "", meta={"source": str(src), "consumed_tokens": 0})
    say(f"load: {src} is a GPT-NeoX/DeepSpeed checkpoint ({res.files.layout}, TP {res.files.tp}, iteration "
        f"{res.iteration}): imported it on the fly — weights only, fresh optimizer, counter at 0 (finetune)")
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(c, load=str(run), iteration=None, finetune=True))
