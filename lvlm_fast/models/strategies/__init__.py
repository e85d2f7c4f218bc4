"""Strategy registry: every module in this package registers its strategy on import.

Adding a strategy is one new file here (see :mod:`.base` for the contract).
"""

import importlib
import pkgutil

from lvlm_fast.models.strategies.base import (
    STRATEGIES,
    EmbeddingStrategy,
    PrefillResult,
    Strategy,
    StrategyConfig,
    StrategyWarning,
    VideoPrompt,
    get_strategy,
    register,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["STRATEGIES", "EmbeddingStrategy", "PrefillResult", "Strategy", "StrategyConfig",
           "StrategyWarning", "VideoPrompt", "get_strategy", "register"]
