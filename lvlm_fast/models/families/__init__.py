"""Model families: one module per transformers VLM class (see :mod:`.base`).

Every module here registers its family on import; adding a family is one new file plus its
shipped configs in :mod:`lvlm_fast.models.configs`.
"""

import importlib
import pkgutil

from lvlm_fast.models.families.base import (
    FAMILIES,
    ModelFamily,
    PositionPlan,
    TokenBlocks,
    VisualLayout,
    family_for,
    family_for_config,
    family_for_model_type,
    register_family,
    supported_class_names,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["FAMILIES", "ModelFamily", "PositionPlan", "TokenBlocks", "VisualLayout", "family_for",
           "family_for_config", "family_for_model_type", "register_family",
           "supported_class_names"]
