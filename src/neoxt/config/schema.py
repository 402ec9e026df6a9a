"""The resolved run configuration: one frozen dataclass per section.

Field names are GPT-NeoX key names wherever GPT-NeoX has the key, so a user's YAML maps onto these
fields one to one (see ``neox_keys.py`` for the few keys that need translation, such as the nested
``optimizer`` block). Every value here is already resolved: derived values (global batch, warmup
iterations, MLP width, per-layer attention types) are computed once in ``load.py`` and code that
uses the config never re-derives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

Precision = Literal["fp32", "fp16", "bf16"]
AttentionType = Literal["global", "sliding"]


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

    # One entry per layer: "global" (full causal) or "sliding" (causal within sliding_window_width).
    attention_types: tuple[AttentionType, ...] = ("global", "global")
    sliding_window_width: int | None = None

    init_method: str = "normal"
    output_layer_init_method: str = "scaled_normal"
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def norm_eps(self) -> float:
        return self.rms_norm_epsilon if self.norm == "rmsnorm" else self.layernorm_epsilon

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu", "reglu")

    @property
    def tie_word_embeddings(self) -> bool:
        return not self.no_weight_tying

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
    dataset_impl: Literal["gpt2", "pairwise"] = "gpt2"
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
    precompute_model_name: str | None = None


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
    compile: bool = False
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"
    # Number of data-parallel replica groups for HSDP (shard within, replicate across).
    data_parallel_replicate: int = 1
    dist_timeout_s: float = 1800.0  # collective timeout of the process group (neoxt.distributed.mesh)
    dist_startup_timeout_s: float = 600.0  # all ranks must join within this (neoxt.distributed.rendezvous)


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    # The files this config was merged from, in order (for error messages and checkpoints).
    source_files: tuple[str, ...] = field(default=(), compare=False)


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(RunConfig) if f.name != "source_files")
