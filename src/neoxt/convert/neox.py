"""GPT-NeoX (DeepSpeed) checkpoints <-> neoxt run directories: ``import_neox`` and ``export_neox``.

The work is split by job: ``neox_files.py`` (finding, safely loading and writing DeepSpeed files),
``neox_tp.py`` (tensor-parallel merge/split), ``neoxt.model.neox_names`` (name mapping, shared with
the model), and this module (orchestration).

Facts this module relies on (read from upstream GPT-NeoX, ``megatron/model/{gpt2_model,transformer,
norms}.py``, ``megatron/mpu/layers.py``, ``megatron/checkpointing.py``, ``tools/ckpts/``):

* Layer indices are those of ``GPT2ModelPipe.specs``: 0 = embedding (``word_embeddings.weight``,
  ``position_embeddings.weight`` for learned positions), 1 = a function (no weights), 2..L+1 = the
  transformer layers, L+2 = a function, L+3 = final norm (``norm.weight``/``norm.bias``, or
  ``norm.scale`` for RMSNorm), L+4 = ``final_linear.weight`` (only without weight tying).
* Two file layouts. Sequential (``pipe_parallel_size: 0``): ``mp_rank_XX_model_states.pt`` holds the
  DeepSpeed engine state with the weights under ``["module"]`` as ``sequential.<idx>.<name>``.
  Pipeline (``pipe_parallel_size >= 1``): ``layer_<idx:02d>-model_<tp:02d>-model_states.pt`` holds one
  layer's plain state dict; ``mp_rank_XX_model_states.pt`` then has ``module: None`` plus the client
  state (``iteration``, ``args``). The users' OLMo-3 fork converter writes the sequential file with
  ``["module"]["module"]`` holding ``<idx>.<name>`` keys (DeepSpeed PipelineModule names); both are read.
* Tensor parallelism. Column-parallel (split on dim 0): ``word_embeddings``, ``final_linear``,
  ``attention.query_key_value``, ``mlp.linear1`` (legacy ``dense_h_to_4h``, llama ``w1``/``w3``), and the
  fork's ``attention.q_norm``/``k_norm`` (they normalise each rank's slice). Row-parallel (split on
  dim 1): ``attention.dense``, ``mlp.linear2`` (legacy ``dense_4h_to_h``, llama ``w2``). Row-parallel
  biases are *not* split (``RowParallelLinear``: "bias is not parallelized"): every rank holds the
  whole bias. Without ``gpt_j_residual`` it is added once after the all-reduce, so the ranks' copies
  are equal and one is taken. With ``gpt_j_residual`` each rank adds its copy *before* the single
  all-reduce, so the effective bias is their sum (which is what upstream's converter and merge20b.py
  compute; upstream's converter also sums in the non-parallel-residual case, which is a bug we do not
  copy). Norms are replicated.
* Fused QKV. MHA: each rank's output rows are ``[heads_r, 3, head_dim]`` (per-head interleaved q,k,v),
  so merged ranks give ``[heads, 3, head_dim]``. GQA (``num_kv_heads`` set and != heads): each rank
  holds ``[Q_r | K_r | V_r]`` contiguously (``gqa_project``), so ranks are split before merging.
* Gated MLP (``Gated_Activation``): ``x, gate = linear1(h).chunk(2)``, out = act(gate) * x. The first
  half is our ``up``, the second our ``gate`` -- per TP rank, so each rank holds ``[up_r | gate_r]``.
  Legacy llama naming: ``w1`` = gate, ``w3`` = up, ``w2`` = down.
* OLMo-3 fork (``norm_placement: olmo3``, ``use_separate_qk_norms``), as its converter writes it:
  ``attention.q_norm.scale`` [heads*head_dim], ``attention.k_norm.scale`` [kv_heads*head_dim],
  ``post_attention_layernorm.scale`` (norm on the attention output, our ``attn_norm``),
  ``post_feedforward_layernorm.scale`` (norm on the MLP output, our ``mlp_norm``). The fork builds an
  ``input_layernorm`` it never uses; a checkpoint saved by the fork may hold it and it is ignored.
  (Found with the code search in the users' fork: ``huggingface/convert_hf_olmo_to_neox.py`` and its
  README; upstream has no OLMo-3. Its converter shards q_norm/k_norm with TP, so at TP > 1 the fork
  normalises each rank's slice; the merged weights here give the TP-1 model, i.e. HF's OLMo-3.)
* ``attention.rotary_emb.inv_freq`` (``rotary_save_freqs_buffer``) is derived, not a weight: ignored.
* Mamba layers (``norm`` + ``mixer.*``, TP 1 only) and MoE MLPs (``mlp.router.layer.weight``,
  megablocks' stacked ``mlp.experts.mlp.w1``/``w2``, whole experts per TP rank): see
  ``neoxt.model.neox_moe_mamba``, which also refuses the settings GPT-NeoX cannot reproduce exactly.
* Upstream ``use_qk_layernorm``: ``attention.qk_layernorm.*`` has a [heads_per_rank, head_dim] gain,
  split over TP with the heads. (With LayerNorm and TP > 1 upstream normalises over each rank's
  heads only, so such a checkpoint is mapped exactly but its logits differ slightly from TP 1's.)

Export (``neoxt-to-neox``) writes current upstream names (``mlp.linear1``/``linear2``, RMSNorm
``scale``; for the OLMo-3 fork the names its converter writes, without the unused
``input_layernorm``), the ``iteration`` and ``args`` client state GPT-NeoX checks on load, ``latest``
and ``configs/``. It holds weights only -- no optimizer, scheduler or RNG state -- so GPT-NeoX should
load it with ``finetune: true`` (or ``no_load_optim`` + ``no_load_rng``).

Pickles: read through ``neoxt.checkpoint.safety`` (weights-only plus the plain data DeepSpeed and
GPT-NeoX store); anything else is refused unless the user passes ``--trust-checkpoint``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neoxt.convert.neox_files import (
    NeoxFiles,
    checkpoint_iteration,
    find_neox_files,
    load_neox_shards,
    read_client_state,
    write_neox_checkpoint,
)
from neoxt.convert.neox_tp import compact, merge_tp, split_tp
from neoxt.errors import CheckpointError, ConversionError
from neoxt.io import publish_dir, temp_dir_beside
from neoxt.model.neox_moe_mamba import has_moe
from neoxt.model.neox_names import EMBED_IDX, check_supported, neox_to_neoxt, neoxt_to_neox
from neoxt.model.neox_te import is_te_layout, legacy_to_te, te_to_legacy

if TYPE_CHECKING:
    from neoxt.config.schema import ModelConfig, RunConfig

@dataclass(frozen=True)
class NeoxImport:
    state_dict: dict[str, Any]
    model: ModelConfig
    iteration: int
    files: NeoxFiles


def read_neox_checkpoint(path: str | os.PathLike, cfg: ModelConfig, expected_tp: int | None = None, dtype: Any = None) -> NeoxImport:
    """Read, merge and map a GPT-NeoX checkpoint to our state dict; nothing is written."""
    check_supported(cfg)
    files = find_neox_files(path, expected_tp)
    client = read_client_state(files)
    shards = load_neox_shards(files)
    emb_key = f"{EMBED_IDX}.word_embeddings.weight"
    if emb_key not in shards[0]:
        raise CheckpointError(f"{files.file_for(EMBED_IDX)}: tensor '{emb_key}' (word embeddings) is missing")
    vocab = sum(s[emb_key].shape[0] for s in shards)
    model = dataclasses.replace(cfg, padded_vocab_size=vocab)
    full = merge_tp(shards, model, files)
    if is_te_layout(full):  # the fork's Transformer Engine names (te_mha / te_layernorm_mlp)
        full = te_to_legacy(full, model)
    sd = neox_to_neoxt(full, model, files)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    sd = {k: compact(v) for k, v in sd.items()}
    return NeoxImport(sd, model, checkpoint_iteration(files, client), files)


def write_neoxt_checkpoint(run_dir: Path, iteration: int, sd: dict[str, Any], run_cfg: RunConfig, meta: dict[str, Any]) -> Path:
    """The one place the import writes a neoxt checkpoint: DESIGN.md layout via ``neoxt.checkpoint``,
    plus the run directory's ``config.yml`` (as ``hf-to-neoxt`` writes it)."""
    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_to_yaml, model_only_yaml

    text = config_to_yaml(run_cfg)
    step = save_checkpoint(run_dir, iteration, {"model": sd}, text, meta=meta)
    (run_dir / "config.yml").write_text(text, encoding="utf-8")
    (run_dir / "neox_config.yml").write_text(model_only_yaml(run_cfg), encoding="utf-8")  # merges with an SFT config
    return step


def import_neox(
    input_dir: str | os.PathLike,
    run_cfg: RunConfig,
    output_dir: str | os.PathLike,
    iteration: int | None = None,
    dtype: Any = None,
) -> Path:
    """GPT-NeoX ``global_stepN`` -> new neoxt run directory ``output_dir``. Returns its step dir.

    ``run_cfg`` is the user's GPT-NeoX config (loaded by ``load_config``); its ``padded_vocab_size``
    is taken from the checkpoint's embedding. Everything is read and checked before anything is
    written; the run directory is built under a temporary name and renamed when complete, so a
    failure leaves nothing at ``output_dir``.
    """
    out = Path(output_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: output path already exists and is not empty; remove it or pick another")
    res = read_neox_checkpoint(input_dir, run_cfg.model, run_cfg.parallelism.model_parallel_size, dtype)
    new_cfg = dataclasses.replace(run_cfg, model=res.model)
    step = res.iteration if iteration is None else iteration
    tmp = temp_dir_beside(out, ConversionError)
    try:
        meta = {
            "source": str(Path(input_dir).absolute()),
            "source_format": f"gpt-neox-{res.files.layout}",
            "source_model_parallel_size": res.files.tp,
            "consumed_tokens": 0,
            "consumed_samples": 0,
        }
        write_neoxt_checkpoint(tmp, step, res.state_dict, new_cfg, meta)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / f"global_step{step}"


def export_neox(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_parallel_size: int = 1,
    pipeline: bool = False,
    te_layout: bool = False,
) -> Path:
    """neoxt checkpoint (run dir or ``global_stepN``) -> GPT-NeoX checkpoint. Returns the step dir.

    Tensors keep their saved dtype, so ``neoxt-to-neox`` then ``neox-to-neoxt`` is bit-exact.
    ``te_layout``: Transformer Engine names (the fork's converter default, for ``te_mha`` /
    ``te_layernorm_mlp`` configs) instead of the legacy ones.
    """
    from neoxt.checkpoint import read_meta, resolve_checkpoint
    from neoxt.checkpoint.loading import read_checkpoint_config, read_checkpoint_model_state

    ckpt = resolve_checkpoint(checkpoint)
    run_cfg = read_checkpoint_config(ckpt)
    model = run_cfg.model
    check_supported(model)
    iteration = int(read_meta(ckpt).get("iteration", 0))
    sd = read_checkpoint_model_state(ckpt, model)
    full = neoxt_to_neox(sd, model)
    if te_layout:
        if has_moe(model):  # with te_layernorm_mlp GPT-NeoX builds no pre-MLP norm for an MoE layer
            raise ConversionError("--te-layout: GPT-NeoX's MoE layers have no Transformer Engine form (with "
                                  "te_layernorm_mlp they lose their pre-MLP norm); export the legacy layout")
        full = legacy_to_te(full, model)
    shards = split_tp(full, model, model_parallel_size)
    out_cfg = dataclasses.replace(
        run_cfg,
        parallelism=dataclasses.replace(
            run_cfg.parallelism, model_parallel_size=model_parallel_size, pipe_parallel_size=1 if pipeline else 0
        ),
    )
    out = Path(output_dir)
    created = not out.exists()
    try:
        return write_neox_checkpoint(shards, out, iteration, out_cfg, pipeline)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
