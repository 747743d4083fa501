"""Configuration: one dataclass tree, YAML presets, overrides, validation."""

from megafusion.config.loader import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    list_presets,
    load_config,
    parse_overrides,
)
from megafusion.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    ImageConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RopeScalingConfig,
)
from megafusion.config.validate import config_problems, validate_config

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "ImageConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "config_from_dict",
    "config_problems",
    "config_to_dict",
    "dump_config",
    "list_presets",
    "load_config",
    "parse_overrides",
    "validate_config",
]
