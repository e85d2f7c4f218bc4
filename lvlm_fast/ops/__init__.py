"""Public ops. Each is also ``torch.ops.lvlm_fast.<name>`` (the raw registered op, which
takes every argument positionally and skips the Python-side validation)."""

from lvlm_fast import _extension
from lvlm_fast.ops import context_content_pool as _ccp
from lvlm_fast.ops import diff_weighted_pool as _dwp
from lvlm_fast.ops import evict_summaries as _evs
from lvlm_fast.ops import keyframe_select as _kfs
from lvlm_fast.ops import kv_compact as _kvc
from lvlm_fast.ops import qformer_cross_attention as _qca
from lvlm_fast.ops import slowfast_pool as _sfp
from lvlm_fast.ops import summary_attention as _sat
from lvlm_fast.ops.context_content_pool import context_content_pool
from lvlm_fast.ops.diff_weighted_pool import diff_weighted_pool
from lvlm_fast.ops.evict_summaries import evict_summaries
from lvlm_fast.ops.keyframe_select import (
    keyframe_select,
    reference_index_from_keyframes,
    released_reference_index,
)
from lvlm_fast.ops.kv_compact import KVCompactResult, kv_compact, stacked_layer_view
from lvlm_fast.ops.qformer_cross_attention import merge as qformer_merge
from lvlm_fast.ops.qformer_cross_attention import qformer_cross_attention
from lvlm_fast.ops.slowfast_pool import SlowFastConfig, slowfast_pool
from lvlm_fast.ops.summary_attention import summary_attention

_FALLBACKS = {**_dwp.CPU_FALLBACKS}
_FALLBACKS.update(_sfp.CPU_FALLBACKS)
_FALLBACKS.update(_ccp.CPU_FALLBACKS)
_FALLBACKS.update(_kfs.CPU_FALLBACKS)
_FALLBACKS.update(_sat.CPU_FALLBACKS)
_FALLBACKS.update(_evs.CPU_FALLBACKS)
_FALLBACKS.update(_kvc.CPU_FALLBACKS)
_FALLBACKS.update(_qca.CPU_FALLBACKS)

_extension.load_cpu_kernels()
_extension.register_cpu_fallbacks(_FALLBACKS)

__all__ = ["diff_weighted_pool"]
__all__ += ["SlowFastConfig", "slowfast_pool"]
__all__ += ["context_content_pool"]
__all__ += ["keyframe_select", "reference_index_from_keyframes", "released_reference_index"]
__all__ += ["evict_summaries", "summary_attention"]
__all__ += ["qformer_cross_attention", "qformer_merge"]
__all__ += ["KVCompactResult", "kv_compact", "stacked_layer_view"]
