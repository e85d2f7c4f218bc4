"""Plain-PyTorch references: the executable spec of every op. Readable, slow, and the
thing every kernel is tested against. Each follows its paper's formula line by line."""

from lvlm_fast.reference.context_content_pool import context_content_pool
from lvlm_fast.reference.diff_weighted_pool import cosine, diff_weighted_pool
from lvlm_fast.reference.keyframe_select import keyframe_select
from lvlm_fast.reference.kv_compact import kv_compact
from lvlm_fast.reference.qformer_cross_attention import qformer_cross_attention
from lvlm_fast.reference.slowfast_pool import slowfast_pool
from lvlm_fast.reference.summary_attention import summary_attention

__all__ = ["cosine", "diff_weighted_pool"]
__all__ += ["slowfast_pool"]
__all__ += ["context_content_pool"]
__all__ += ["keyframe_select"]
__all__ += ["summary_attention"]
__all__ += ["qformer_cross_attention"]
__all__ += ["kv_compact"]
