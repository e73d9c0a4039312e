"""A deprecation reached through tokenlab's own calls fails the test (pyproject's ``filterwarnings`` and
the attribution in tests/conftest.py), while a test's own direct call into a library only warns.

The case is the one transformers 5.24 raised from ``speculative_generate`` and ``set_based_generate``:
``model(..., past_key_values=cache)`` warns "``past_key_values`` is deprecated" with a stacklevel that
names ``torch.nn.Module.__call__``, not the caller; a module filter ``error::FutureWarning:tokenlab``
alone let it scroll past.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tokenlab._hf import cache_kwargs
from tokenlab.testing import timing


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config).eval()


def test_a_deprecated_call_made_by_tokenlab_fails_and_one_made_by_a_test_warns():
    model = _model()
    ids = torch.tensor([[1, 2, 3]])
    old_spelling = functools.partial(model, input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    cpu = torch.device("cpu")
    with pytest.raises(FutureWarning, match="past_key_values"):
        timing.timed(old_spelling, cpu)  # tokenlab calls the model: the test fails
    with pytest.warns(FutureWarning, match="past_key_values") as caught:
        old_spelling()  # the test calls the model: a warning, attributed where transformers says
        timing.timed(old_spelling, cpu)  # expected with pytest.warns: attributed to tokenlab
    assert caught[0].filename.endswith("module.py") and "torch" in caught[0].filename
    assert caught[1].filename == timing.__file__


def test_cache_kwargs_uses_the_name_the_model_declares():
    model = _model()
    cache = DynamicCache()
    renamed = Version(transformers.__version__) >= Version("5.24")
    expected = "cache" if renamed else "past_key_values"
    assert cache_kwargs(model, cache) == {expected: cache}
    model(input_ids=torch.tensor([[1, 2]]), **cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == 2  # filled in place, without a warning (it would fail here)

    class OldSpelling(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert cache_kwargs(OldSpelling(), cache) == {"past_key_values": cache}
