"""Configuration: GPT-NeoX YAML files → one frozen, resolved ``RunConfig``.

``load_config(paths, overrides)`` merges files; ``config_to_yaml`` writes one back with GPT-NeoX
names; ``schema`` holds the dataclasses.
"""

from neoxt.config.dump import config_to_dict, config_to_yaml, model_only_dict, model_only_yaml
from neoxt.config.load import config_from_dict, load_config, with_overrides
from neoxt.config.schema import (
    CheckpointConfig,
    DataConfig,
    EvaluationConfig,
    GenerationConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    RunConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrainingConfig,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EvaluationConfig",
    "GenerationConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelismConfig",
    "RunConfig",
    "ScheduleConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "model_only_dict",
    "model_only_yaml",
    "with_overrides",
]
