"""The transformers API differences the project spans, in one place.

transformers 5.2x renamed the forward argument that carries the KV cache from ``past_key_values``
to ``cache`` (the old name warns on every forward and goes in 5.40); older releases know only
``past_key_values``. Every cached forward passes its cache as ``**kv_cache(cache)``.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def cache_argument() -> str:
    """The name under which this transformers release's decoder models take a KV cache."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def kv_cache(cache) -> dict:
    """``model(..., **kv_cache(cache))``: the cache under this release's argument name."""
    return {cache_argument(): cache}
