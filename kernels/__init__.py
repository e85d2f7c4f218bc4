"""Triton kernels (GPU), installed as ``lvlm_fast.kernels``. One file per op: the
``@triton.jit`` kernels (``_<op>_fwd_kernel``, ``_<op>_bwd_kernel``) and their launchers.
Pure kernels, no policy: validation lives in ``lvlm_fast.ops``. Importing this package
does not import triton; each op module does."""
