"""Optional adapters to other tools, installed as extras.

- :mod:`lvlm_fast.integrations.lmms_eval`: the ``lvlm_fast`` model of lmms-eval
  (``pip install 'lvlm-fast[eval]'``; registered through lmms-eval's ``lmms_eval.models``
  entry-point group).

Nothing here is imported by ``import lvlm_fast``: each adapter imports its tool.
"""
