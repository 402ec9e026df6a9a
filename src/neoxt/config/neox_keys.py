"""How GPT-NeoX key names map onto our config fields.

Most keys need no entry here: a YAML key is looked up by name among the fields of the section
dataclasses in ``schema.py``. This module lists only the exceptions:

* ``ALIASES``: a GPT-NeoX (or fork) spelling that lands in a field of another name;
* ``STRUCTURED``: keys whose value is a block resolved by ``load.py`` (optimizer, fp16, ...);
* ``IGNORED``: keys that only tune DeepSpeed, fused kernels, profilers or launchers (and the fork's
  external REINFORCE sampler: neoxt samples in process). torch does that work differently here, so
  they are accepted with one warning line listing them;
* ``UNSUPPORTED``: GPT-NeoX features neoxt does not implement. The key is accepted at its default
  (so users' files load unchanged) and any other value is an error naming the key.
"""

from __future__ import annotations

from typing import Any

# neox key -> (section, field)
ALIASES: dict[str, tuple[str, str]] = {
    "sliding_window": ("model", "sliding_window_width"),
    "clip_grad": ("optimizer", "gradient_clipping"),
    "min_scale": ("training", "min_loss_scale"),
    "batch_size": ("training", "train_micro_batch_size_per_gpu"),
    # The fork's converters write the HF model's vocab_size (its embedding rows) into neox_config.json.
    "vocab_size": ("model", "padded_vocab_size"),
    "moe_loss_coeff": ("model", "moe_aux_loss_coeff"),  # GPT-NeoX 2.x DeepSpeed-MoE spelling
    "expert_interval": ("model", "moe_expert_interval"),
}

# Keys resolved by load.py because their value is a block or derives several fields.
STRUCTURED: frozenset[str] = frozenset(
    {
        "optimizer",
        "lr",
        "fp16",
        "bf16",
        "precision",
        "attention_config",
        "warmup",
        "warmup_iters",
        "decay_lr_to",
        "lr_decay_iters",
        "lr_decay_fraction",
        "train_iters",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "intermediate_size",
        "expansion_factor",
        "mlp_multiple_of",
        "num_kv_heads",
        "max_position_embeddings",
        "seq_length",
        "data_impl",
        "attention_types",
        "train_data_weights",
        "valid_data_weights",
        "test_data_weights",
    }
)

IGNORED: frozenset[str] = frozenset(
    """
    zero_optimization zero_stage zero_reduce_scatter zero_contiguous_gradients zero_reduce_bucket_size
    zero_allgather_bucket_size zero_allow_untested_optimizer steps_per_print wall_clock_breakdown dump_state
    fp32_allreduce prescale_gradients gradient_predivide_factor sparse_gradients amp communication_data_type
    data_types flops_profiler autotuning autotuning_run activation_checkpointing tensorboard wandb csv_monitor
    elasticity comms_logger compression_training checkpoint data_efficiency curriculum_learning curriculum_seqlen
    deepspeed deepspeed_extra_args deepspeed_mpi deepspeed_slurm deepscale deepscale_config
    deepspeed_activation_checkpointing contiguous_checkpointing checkpoint_in_cpu partition_activations
    synchronize_each_layer profile_backward hostfile include exclude num_nodes num_gpus master_port master_addr
    launcher force_multi no_ssh_check comment account global_num_gpus distributed_backend local_rank rank
    world_size lazy_mpu_init user_script git_hash config_files onnx_safe adlr_autoresume adlr_autoresume_interval
    do_train do_valid do_test is_pipe_parallel pipe_partition_method use_cpu_initialization
    scaled_upper_triang_masked_softmax_fusion scaled_masked_softmax_fusion bias_gelu_fusion bias_dropout_fusion
    rope_fusion layernorm_fusion rmsnorm_fusion use_flashattn_swiglu fused_kernels_build_path
    fp16_lm_cross_entropy apply_query_key_layer_scaling attention_softmax_in_fp32 rotary_save_freqs_buffer
    output_layer_parallelism mamba_selective_fp32_params mamba_selective_scan_fusion mamba_causal_conv_fusion mamba_inner_func_fusion
    te_columnparallel te_rowparallel te_layernorm_mlp te_mha te_fp8_format te_fp8_wgrad te_fp8_amax_history_len
    te_fp8_amax_compute_algo te_fp8_margin te_fp8_mha memory_profiling memory_profiling_path profile
    profile_step_start profile_step_stop checkpoint_validation_with_forward_pass use_shared_fs mmap_warmup
    s3_path s3_chunk_size log_grad_pct_zeros log_param_norm log_optimizer_states log_gradient_noise_scale
    gradient_noise_scale_n_batches gradient_noise_scale_cpu_offload wandb_init_all_ranks use_comet
    comet_workspace comet_project comet_experiment_name comet_tags comet_others comet_experiment
    char_level_ppl short_seq_prob attention_type dynamic_loss_scale scheduler sparse_attention return_logits
    serve_model_weights weight_server_port online_dataserver_ips online_dataserver_ports
    moe_type moe_lbl_in_fp32 create_moe_param_group enable_expert_tensor_parallelism use_tutel
    """.split()
)

# key -> the default value under which the key is harmless (anything else is an unsupported feature).
UNSUPPORTED: dict[str, Any] = {
    # GPT-NeoX 2.x DeepSpeed-MoE: residual (PR-MoE) experts and a separate GLU switch.
    "moe_use_residual": False,
    "moe_glu": False,
    "use_mup": False,
    "coord_check": False,
    "save_base_shapes": False,
    "base_shapes_file": None,
    "mup_init_scale": 1.0,
    "mup_attn_temp": 1.0,
    "mup_output_temp": 1.0,
    "mup_embedding_mult": 1.0,
    "mup_rp_embedding_mult": 1.0,
    "mup_width_scale": 2,
    "use_bnb_optimizer": False,
    "sparsity_config": None,
    "num_unique_layers": None,
    "param_sharing_style": "grouped",
    "gmlp_attn_dim": 64,
    "soft_prompt_tuning": None,
    "rpe_num_buckets": None,
    "rpe_max_distance": None,
    "opt_pos_emb_offset": 0,
    "scalenorm_epsilon": 1e-8,
    "dim_att": None,
    "head_size": None,
    "ffn_dim": None,
    "train_epochs": None,
}

# Attention layer types from GPT-NeoX's attention_config that are plain causal attention here.
GLOBAL_ATTENTION_NAMES: frozenset[str] = frozenset({"global", "flash", "full", "full_attention"})
SLIDING_ATTENTION_NAMES: frozenset[str] = frozenset({"sliding", "local", "sliding_attention"})
# State-space layers: GPT-NeoX's "mamba" (Mamba-1), and neoxt's "mamba2" (Mamba-2 / SSD).
MAMBA_ATTENTION_NAMES: frozenset[str] = frozenset({"mamba", "mamba2"})

OPTIMIZER_TYPES: dict[str, str] = {
    "adam": "adam",
    "adamw": "adamw",
    "cpu_adam": "adam",
    "cpu_torch_adam": "adam",
    "fused_adam": "adam",
    "sgd": "sgd",
    "lion": "lion",
    "adagrad": "adagrad",
    "rmsprop": "rmsprop",
}
OPTIMIZER_PARAMS: frozenset[str] = frozenset({"lr", "betas", "eps", "momentum", "weight_decay"})

PRECISION_NAMES: dict[str, str] = {
    "fp32": "fp32",
    "float32": "fp32",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}
