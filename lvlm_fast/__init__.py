"""lvlm-fast: fused kernels for long-video vision-language models.

``import lvlm_fast`` is light: it registers the ``torch.ops.lvlm_fast`` operators and loads
the C++ CPU kernels. Triton is imported only when a CUDA tensor reaches an op, and
``transformers`` only by ``lvlm_fast.models`` / ``lvlm_fast.cache``.
"""

from lvlm_fast import ops

__all__ = ["ops"]
__version__ = "0.1.0"
