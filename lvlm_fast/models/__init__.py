"""Long-video wrappers over transformers VLMs, their strategies and shipped configs."""

from lvlm_fast.models.configs import MODEL_CONFIGS, get_config
from lvlm_fast.models.strategies import STRATEGIES, get_strategy
from lvlm_fast.models.wrapper import SUPPORTED_MODEL_CLASSES, LongVideoVLM, PreallocatedKVCache

__all__ = ["MODEL_CONFIGS", "STRATEGIES", "SUPPORTED_MODEL_CLASSES", "LongVideoVLM",
           "PreallocatedKVCache", "get_config", "get_strategy"]
