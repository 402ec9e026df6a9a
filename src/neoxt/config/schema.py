"""The resolved run configuration: one frozen dataclass per section.

Field names are GPT-NeoX key names wherever GPT-NeoX has the key, so a user's YAML maps onto these
fields one to one (see ``neox_keys.py`` for the few keys that need translation, such as the nested
``optimizer`` block). Every value here is already resolved: derived values (global batch, warmup
iterations, MLP width, per-layer attention types) are computed once in ``load.py`` and code that
uses the config never re-derives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

Precision = Literal["fp32", "fp16", "bf16"]
AttentionType = Literal["global", "sliding", "mamba", "mamba2"]
# Layer types that are state-space (Mamba) blocks rather than attention blocks.
MAMBA_TYPES: frozenset[str] = frozenset({"mamba", "mamba2"})


@dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of the one ``Transformer`` class.

    GPT-NeoX, LLaMA and OLMo-3 are points in this space (see ``neoxt.model.presets``).
    """

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    # Key/value heads for grouped-query attention; equals num_attention_heads for plain MHA.
    num_kv_heads: int = 4
    # Width of the MLP hidden layer; for gated activations the width of *each* branch (HF convention).
    intermediate_size: int = 256
    max_position_embeddings: int = 2048
    # Vocabulary rows in the embedding and output layers (GPT-NeoX's padded_vocab_size).
    # None until the tokenizer is known; the model requires it.
    padded_vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128

    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    layernorm_epsilon: float = 1e-5
    rms_norm_epsilon: float = 1e-8
    use_bias_in_norms: bool = True
    # "pre": norm before each sublayer (GPT-NeoX, LLaMA). "post": norm after the residual add
    # (original Transformer). "olmo3": norm on the sublayer output, before the residual add.
    norm_placement: Literal["pre", "post", "olmo3"] = "pre"
    # GPT-NeoX / GPT-J parallel residual: x + attn(ln1(x)) + mlp(ln2(x)).
    gpt_j_residual: bool = False
    # Parallel residual sharing one norm for attention and MLP (GPT-J).
    gpt_j_tied: bool = False

    # One RMS/LayerNorm over the whole query and key projections (OLMo-2/3 style) when
    # use_separate_qk_norms; GPT-NeoX's use_qk_layernorm normalises per head with a shared norm.
    use_qk_layernorm: bool = False
    use_separate_qk_norms: bool = False
    # Qwen3 / Qwen3-MoE: a q norm and a k norm over head_dim, each one gain shared by all heads.
    use_head_qk_norms: bool = False

    pos_emb: Literal["rotary", "learned", "none"] = "rotary"
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    # RoPE scaling for long context, with HF's rope_parameters meaning: "none", "linear", "llama3"
    # (LLaMA-3.1+) or "yarn" (OLMo-3 long-context checkpoints).
    rope_scaling_type: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    # YaRN's cos/sin multiplier; None means HF's default (0.1·ln(factor) + 1).
    rope_attention_factor: float | None = None
    # Which layers are scaled: "all", or "global" (OLMo-3 scales only its full-attention layers).
    rope_scaling_layers: Literal["all", "global"] = "all"

    activation: Literal["gelu", "relu", "silu", "swiglu", "geglu", "reglu"] = "gelu"
    use_bias_in_attn_linear: bool = True
    use_bias_in_mlp: bool = True
    no_weight_tying: bool = False

    # One entry per layer: "global" (full causal), "sliding" (causal within sliding_window_width),
    # "mamba" (a Mamba-1 selective-scan block) or "mamba2" (a Mamba-2 SSD block); see model/mamba.py.
    attention_types: tuple[AttentionType, ...] = ("global", "global")
    sliding_window_width: int | None = None

    # Mixture of experts (``neoxt.model.moe``; GPT-NeoX's moe_* keys). moe_num_experts 1 = dense MLPs.
    moe_num_experts: int = 1
    moe_top_k: int = 1
    # MoE layers: those listed in moe_layers, else every layer i with i % moe_expert_interval == 0
    # (upstream GPT-NeoX's rule, 0-based).
    moe_expert_interval: int = 1
    moe_layers: tuple[int, ...] | None = None
    # "sinkhorn" (upstream's default): experts chosen by Sinkhorn-balanced scores while training,
    # plain top-k in eval. "topk": top-k of the router scores always (Mixtral, OLMoE, Qwen3-MoE).
    moe_router_type: Literal["sinkhorn", "topk"] = "sinkhorn"
    # Read from a YAML without the key: "sigmoid" for sinkhorn with moe_top_k 1 (upstream's
    # SinkhornRouter weights a single choice by sigmoid(logit)), else "softmax".
    moe_score_func: Literal["softmax", "sigmoid"] = "softmax"
    # Renormalise the k chosen scores to sum to one (Mixtral; Qwen3-MoE's norm_topk_prob).
    moe_norm_topk_prob: bool = False
    # Width of each expert (HF moe_intermediate_size); None means intermediate_size.
    moe_intermediate_size: int | None = None
    # Always-on shared experts (DeepSeek style): one dense MLP of num_shared x the expert width.
    moe_num_shared_experts: int = 0
    # Load-balancing (Switch/HF formula) and router z-loss coefficients, added to the LM loss.
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0
    # Token dropping: each expert takes at most max(min_capacity, factor * tokens * top_k / experts)
    # tokens per micro-batch (first come, first served); off means dropless.
    moe_token_dropping: bool = False
    moe_train_capacity_factor: float = 1.0
    moe_eval_capacity_factor: float = 1.0
    moe_min_capacity: int = 4
    # Multiplicative uniform noise (1 +- eps) on the router input while training.
    moe_jitter_eps: float | None = None
    # Mamba blocks (GPT-NeoX: mamba_use_bias_in_conv, mamba_use_bias_in_linears; the rest are
    # neoxt's, with the state-spaces/HF defaults). mamba_d_inner None means mamba_expand * hidden_size;
    # mamba_dt_rank None means ceil(hidden_size / 16). mamba_headdim / mamba_ngroups are Mamba-2's.
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_d_inner: int | None = None
    mamba_dt_rank: int | None = None
    mamba_use_bias_in_conv: bool = True
    mamba_use_bias_in_linears: bool = False
    mamba_headdim: int = 64
    mamba_ngroups: int = 1
    mamba_chunk_size: int = 256
    mamba_dt_limit: tuple[float, float] = (0.0, math.inf)

    init_method: str = "normal"
    output_layer_init_method: str = "scaled_normal"
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # A scalar value head (one output) instead of the vocabulary head: a reward model. Set by
    # ``train_impl: rm`` (GPT-NeoX's is_rm output layer); exported as ``*ForSequenceClassification``.
    value_head: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_inner(self) -> int:
        """Channels inside a Mamba block (in_proj's width per branch)."""
        return self.mamba_d_inner or self.mamba_expand * self.hidden_size

    @property
    def mamba_rank(self) -> int:
        """Rank of Mamba-1's dt projection."""
        return self.mamba_dt_rank or math.ceil(self.hidden_size / 16)

    @property
    def has_attention(self) -> bool:
        return any(t not in MAMBA_TYPES for t in self.attention_types)

    @property
    def norm_eps(self) -> float:
        return self.rms_norm_epsilon if self.norm == "rmsnorm" else self.layernorm_epsilon

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu", "reglu")

    @property
    def tie_word_embeddings(self) -> bool:
        return not self.no_weight_tying

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` has a mixture-of-experts MLP (see the moe_* fields)."""
        if self.moe_num_experts <= 1:
            return False
        if self.moe_layers is not None:
            return i in self.moe_layers
        return i % self.moe_expert_interval == 0

    @property
    def moe_width(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def rotary_dim(self) -> int:
        """Rotary dimensions per head (GPT-NeoX: int(head_dim * rotary_pct), kept even)."""
        if self.pos_emb != "rotary":
            return 0
        return int(self.head_dim * self.rotary_pct) // 2 * 2


@dataclass(frozen=True)
class TokenizerConfig:
    tokenizer_type: str = "HFTokenizer"
    vocab_file: str | None = None
    merge_file: str | None = None
    # A Jinja chat template (text) or a path to a file holding one; used by chat data and generation.
    chat_template: str | None = None


@dataclass(frozen=True)
class DataConfig:
    seq_length: int = 2048
    data_path: str | None = None
    split: str = "969,30,1"
    train_data_paths: tuple[str, ...] = ()
    valid_data_paths: tuple[str, ...] = ()
    test_data_paths: tuple[str, ...] = ()
    train_label_data_paths: tuple[str, ...] = ()
    valid_label_data_paths: tuple[str, ...] = ()
    test_label_data_paths: tuple[str, ...] = ()
    train_reward_data_paths: tuple[str, ...] = ()
    valid_reward_data_paths: tuple[str, ...] = ()
    test_reward_data_paths: tuple[str, ...] = ()
    # Preference data (DPO / reward models): chosen ("pos") and rejected ("neg") sequences.
    pos_train_data_paths: tuple[str, ...] = ()
    neg_train_data_paths: tuple[str, ...] = ()
    pos_valid_data_paths: tuple[str, ...] = ()
    neg_valid_data_paths: tuple[str, ...] = ()
    pos_test_data_paths: tuple[str, ...] = ()
    neg_test_data_paths: tuple[str, ...] = ()
    pos_train_label_data_paths: tuple[str, ...] = ()
    neg_train_label_data_paths: tuple[str, ...] = ()
    pos_valid_label_data_paths: tuple[str, ...] = ()
    neg_valid_label_data_paths: tuple[str, ...] = ()
    pos_test_label_data_paths: tuple[str, ...] = ()
    neg_test_label_data_paths: tuple[str, ...] = ()
    train_data_weights: tuple[float, ...] = ()
    valid_data_weights: tuple[float, ...] = ()
    test_data_weights: tuple[float, ...] = ()
    weight_by_num_documents: bool = False
    weighted_sampler_alpha: float = 1.0
    pack_impl: Literal["packed", "pack_until_overflow", "unpacked"] = "packed"
    allow_chopped: bool = True
    # "online": the fork's REINFORCE data server; here train_data_paths give prompts, sampled in process.
    dataset_impl: Literal["gpt2", "pairwise", "online"] = "gpt2"
    num_workers: int = 2
    eod_mask_loss: bool = False
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    # Where sample/shuffle index caches go; None means next to the data (GPT-NeoX behaviour).
    index_cache_dir: str | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    # GPT-NeoX's `optimizer: {type, params: {...}}` block, flattened.
    optimizer_type: Literal["adam", "adamw", "sgd", "lion", "adagrad", "rmsprop"] = "adam"
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.1
    gradient_clipping: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    lr_decay_style: Literal["constant", "linear", "cosine", "exponential"] = "linear"
    lr_decay_iters: int = 0
    min_lr: float = 0.0
    # Warmup in iterations (GPT-NeoX's `warmup` fraction of lr_decay_iters, resolved); fractional as
    # upstream keeps it (0.01 of 150 iterations is 1.5).
    warmup_iters: float = 0.0
    override_lr_scheduler: bool = False
    use_checkpoint_lr_scheduler: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    train_iters: int = 0
    train_micro_batch_size_per_gpu: int = 1
    gradient_accumulation_steps: int = 1
    # Global batch in sequences = micro batch x gradient accumulation x data-parallel size.
    train_batch_size: int = 1
    data_parallel_size: int = 1
    seed: int = 1234
    precision: Precision = "fp32"
    # fp16 dynamic loss scaling (GPT-NeoX's fp16 block): 0 means dynamic.
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    eval_interval: int = 1000
    eval_iters: int = 100
    exit_interval: int | None = None
    # What a non-finite loss or gradient norm does: skip the update, or save the last good state and stop.
    on_nan: Literal["skip", "stop"] = "skip"
    # on_nan: skip gives up (status FAILED, exit 2, no save) after this many non-finite steps in a row.
    max_consecutive_nan: int = 10
    train_impl: str = "normal"  # a registered objective (neoxt.train.objectives), checked there
    dpo_beta: float = 0.1
    dpo_fp32: bool = True
    dpo_reference_free: bool = False
    kto_beta: float = 0.1
    kto_fp32: bool = True
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    z_loss: float = 0.0
    # Tokens per chunk of the output projection + loss (neoxt.train.chunked_loss): the full
    # [tokens, vocab] logits are never held. 0 computes full logits (the plain path).
    loss_chunk_size: int = 1024
    # float8 training through torchao: "tensorwise" or "rowwise" (neoxt.distributed.float8); CUDA sm89+ only.
    float8_recipe: str | None = None
    precompute_model_name: str | None = None
    # REINFORCE (train_impl: reinforce), the fork's keys: per-token KL penalty against the frozen
    # reference (abs / mse / kl of the sampled token's log-ratio, or the full-vocabulary KL), its
    # coefficient, log-probs in fp32, and the leave-one-out baseline over each prompt's samples.
    kl_impl: Literal["abs", "mse", "kl", "full"] = "mse"
    kl_div_beta: float = 0.1
    fp32_reinforce: bool = True
    reinforce_leave_one_out: bool = False
    # neoxt's own keys for the in-process sampler (the fork takes samples from an online data server):
    # the reward ("module:function", a reward-model checkpoint directory, or an http(s):// endpoint),
    # a JSONL of prompts (else the prompt part of each train_data_paths document), completions per
    # prompt, and their sampling.
    reinforce_reward: str | None = None
    reinforce_prompts: str | None = None
    reinforce_samples: int = 4
    reinforce_max_new_tokens: int = 16
    reinforce_temperature: float = 1.0
    reinforce_top_k: int = 0
    reinforce_top_p: float = 0.0


@dataclass(frozen=True)
class UnlearningConfig:
    """Gradient ascent on a forget corpus and gradient difference (the users' fork's ``ga_*`` / ``gd_*``
    keys, same names, defaults and meaning; ``neoxt.train.objectives.unlearning`` runs them)."""

    ga_dataset: str | None = None  # indexed-dataset prefix of the forget set; setting it turns unlearning on
    ga_dataset_impl: Literal["mmap", "infer"] = "mmap"
    ga_interval: int | None = None  # interval mode: a burst after every ga_interval-th iteration
    ga_iters: int | None = None  # interval mode: updates per burst (they do not count toward train_iters)
    ga_lr_scale: float = 1.0  # the learning rate of a GA/GD update is the schedule's times this
    ga_mode: Literal["interval", "interleaved"] = "interval"
    ga_interleave_ratio: int = 1  # interleaved mode: LM iterations per GA/GD iteration
    ga_loss_threshold: float | None = None  # no ascent once the forget loss is at or below this
    ga_threshold_check_mode: Literal["per_step", "per_burst", "ema"] = "per_step"
    ga_threshold_skip_forward: bool = False  # below the threshold, skip the forward as well
    gd_mode: bool = False  # gradient difference: minimise gd_retain_weight * L_retain - L_forget
    gd_retain_dataset: str | None = None
    gd_retain_dataset_impl: Literal["mmap", "infer"] = "mmap"
    gd_retain_weight: float = 40.0
    gd_log_separate_losses: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    iteration: int | None = None
    finetune: bool = False
    checkpoint_factor: int | None = None
    checkpoint_scale: Literal["linear", "log"] = "linear"
    extra_save_iters: tuple[int, ...] = ()
    keep_last_n_checkpoints: int | None = None
    no_save_optim: bool = False
    no_save_rng: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    # Write checkpoints in the background (neoxt.checkpoint.async_save): training waits only for a
    # copy of the state; ``latest`` moves when the write is complete.
    async_save: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    log_dir: str | None = None
    log_interval: int = 100
    tensorboard_dir: str | None = None
    use_wandb: bool = False
    wandb_project: str = "neox"
    wandb_group: str | None = None
    wandb_team: str | None = None
    wandb_run_name: str | None = None
    wandb_host: str | None = None
    log_grad_norm: bool = True
    # Peak dense TFLOP/s of one accelerator, for MFU; None picks a default from the device name.
    peak_theoretical_tflops: float | None = None


@dataclass(frozen=True)
class ParallelismConfig:
    model_parallel_size: int = 1
    # GPT-NeoX: 0 means no pipeline module, 1 means a one-stage pipeline; both are one stage here.
    pipe_parallel_size: int = 0
    sequence_parallel: bool = False
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    # "full" recomputes whole blocks; "selective" recomputes attention only.
    activation_checkpointing_mode: Literal["full", "selective"] = "full"
    # What "selective" keeps (torchtitan's options): "attention" recomputes attention only, "op" a
    # per-op policy over whole blocks, "N" (an integer) fully checkpoints every N-th block.
    selective_ac_option: str | int = "attention"
    compile: bool = False
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"
    # Number of data-parallel replica groups for HSDP (shard within, replicate across).
    data_parallel_replicate: int = 1
    dist_timeout_s: float = 1800.0  # collective timeout of the process group (neoxt.distributed.mesh)
    # Expert parallelism: MoE experts split over this many data-parallel ranks (tokens all-to-all).
    moe_expert_parallel_size: int = 1
    dist_startup_timeout_s: float = 600.0  # all ranks must join within this (neoxt.distributed.rendezvous)
    # A rank whose step makes no progress this long exits with one line (neoxt.train.watchdog); 0: off.
    step_timeout_s: float = 600.0
    # Context parallelism: every sequence split over this many ranks, attention by ring (or all-gathered
    # K/V where a document mask or sliding window applies); see neoxt.distributed.context_parallel.
    context_parallel_size: int = 1


@dataclass(frozen=True)
class GenerationConfig:
    text_gen_type: Literal["unconditional", "input-file", "interactive"] = "unconditional"
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    maximum_tokens: int = 64
    prompt_end: str = "\n"
    sample_input_file: str | None = None
    sample_output_file: str | None = None
    num_samples: int = 1
    recompute: bool = False
    apply_chat_template: bool = False
    system_prompt: str | None = None


@dataclass(frozen=True)
class EvaluationConfig:
    eval_tasks: tuple[str, ...] = ()
    eval_results_prefix: str = ""
    eval_num_fewshot: int | None = None
    eval_limit: float | None = None
    eval_include_path: str | None = None


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    # The files this config was merged from, in order (for error messages and checkpoints).
    source_files: tuple[str, ...] = field(default=(), compare=False)


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(RunConfig) if f.name != "source_files")
