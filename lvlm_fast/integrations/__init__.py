"""Optional adapters to other tools, installed as extras.

- :mod:`lvlm_fast.integrations.lmms_eval`: the ``lvlm_fast`` model of lmms-eval
  (``pip install 'lvlm-fast[eval]'``; registered through lmms-eval's ``lmms_eval.models``
  entry-point group).

Nothing here is imported by ``import lvlm_fast``: each adapter imports its tool.
"""


def lmms_eval_manifest():  # -> lmms_eval.models.registry_v2.ModelManifest
    """lmms-eval's entry point (group ``lmms_eval.models``): the ``lvlm_fast`` model.

    It lives here, not in :mod:`lvlm_fast.integrations.lmms_eval`, because lmms-eval loads
    its entry points while ``lmms_eval.models`` initialises: pointing it at a module that
    imports lmms-eval itself would make that load circular when the user imports the
    plugin module first. This module imports nothing; the manifest only names the class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lvlm_fast",
                         simple_class_path="lvlm_fast.integrations.lmms_eval.LvlmFast")
