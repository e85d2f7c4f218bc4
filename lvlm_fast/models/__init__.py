"""Long-video wrappers over transformers VLMs, their strategies and shipped configs.

``LongVideoVLM``, ``VideoPrompt``, ``STRATEGIES``, ``get_strategy``,
``SUPPORTED_MODEL_CLASSES`` and ``PreallocatedKVCache`` are imported on first access (they
pull in transformers), so ``lvlm_fast.models.configs`` and the CLI's argument parsing stay
light.
"""

from typing import Any

from lvlm_fast.models.configs import MODEL_CONFIGS, get_config

_LAZY = {
    "LongVideoVLM": "lvlm_fast.models.wrapper",
    "PreallocatedKVCache": "lvlm_fast.cache",
    "SUPPORTED_MODEL_CLASSES": "lvlm_fast.models.wrapper",
    "STRATEGIES": "lvlm_fast.models.strategies",
    "get_strategy": "lvlm_fast.models.strategies",
    "VideoPrompt": "lvlm_fast.models.strategies",
}

__all__ = ["MODEL_CONFIGS", "STRATEGIES", "SUPPORTED_MODEL_CLASSES", "LongVideoVLM",
           "PreallocatedKVCache", "VideoPrompt", "get_config", "get_strategy"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lvlm_fast.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
