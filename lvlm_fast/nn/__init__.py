"""nn.Modules with learned parameters around the fused ops."""

from lvlm_fast.nn.dfm import (
    DifferentialFeatureMerging,
    dfm_reference,
    nearest_preceding_reference,
    released_reference,
)

__all__ = [
    "DifferentialFeatureMerging",
    "dfm_reference",
    "nearest_preceding_reference",
    "released_reference",
]

from lvlm_fast.nn.context_content import ContextContentPooling
from lvlm_fast.nn.qformer import AudioQFormer, VideoQFormer

__all__ += ["ContextContentPooling"]
__all__ += ["AudioQFormer", "VideoQFormer"]
