"""Long-video wrappers over transformers VLMs, their strategies and shipped configs."""

from lvlm_fast.models.configs import MODEL_CONFIGS, get_config

__all__ = ["MODEL_CONFIGS", "get_config"]
