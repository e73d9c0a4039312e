"""Calls into transformers whose spelling depends on its version: one home for them.

transformers 5.24 renamed the KV-cache argument of a model's ``forward`` from ``past_key_values`` to
``cache`` (the old name still works there, with a ``FutureWarning``, until 5.40); earlier versions,
and models whose code has not been renamed (remote code, some architectures), take
``past_key_values`` only. :func:`cache_kwargs` passes a cache under the name the model's own
``forward`` declares. Callers create their :class:`~transformers.DynamicCache` themselves and keep
it (the model fills it in place), so they never read the output's cache attribute, which was
renamed too.

This module sits at the bottom of the package: it imports no tokenlab module.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers import Cache

__all__ = ["cache_kwargs"]


def cache_kwargs(model: nn.Module, cache: Cache) -> dict[str, Cache]:
    """``{"cache": cache}`` when ``model.forward`` takes ``cache`` (transformers ≥ 5.24), else
    ``{"past_key_values": cache}``; spread into the call: ``model(ids, **cache_kwargs(model, cache))``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
