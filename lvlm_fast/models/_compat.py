"""Compatibility with the range of ``transformers`` releases in ``pyproject.toml``.

transformers renamed the KV-cache keyword of the model ``forward`` from ``past_key_values``
to ``cache`` (5.x; ``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``).
Passing the old name to a new release emits a ``FutureWarning`` on every forward call and
stops working in 5.40; passing the new name to an old release is silently swallowed by
``**kwargs`` (the cache is then not used at all). So the name is chosen from the callee's
own signature: once per class (``inspect.signature`` follows the decorator's
``__wrapped__``), never by try/except around each call.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

NEW_CACHE_KWARG = "cache"
OLD_CACHE_KWARG = "past_key_values"


@functools.cache
def _cache_kwarg_for(cls: type) -> str:
    forward = getattr(cls, "forward", None)
    if forward is None:
        return OLD_CACHE_KWARG
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # builtins / C callables: assume the long-standing name
        return OLD_CACHE_KWARG
    # A forward that names ``cache`` explicitly is a release that has the new keyword;
    # anything else (old releases, remote-code models) only knows ``past_key_values``.
    return NEW_CACHE_KWARG if NEW_CACHE_KWARG in params else OLD_CACHE_KWARG


def cache_kwarg(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` takes its KV cache."""
    return _cache_kwarg_for(type(module))


def cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to splat into ``module(...)``, with the name ``module`` expects."""
    return {cache_kwarg(module): cache}
