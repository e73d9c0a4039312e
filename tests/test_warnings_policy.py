"""A deprecation reached through tokenlab's own calls fails the test (pyproject's ``filterwarnings`` and
the attribution in tests/conftest.py), while a test's own direct call into a library only warns.

The case is the one transformers 5.24 raised from ``speculative_generate`` and ``set_based_generate``:
``model(..., past_key_values=cache)`` warns "``past_key_values`` is deprecated" with a stacklevel that
names ``torch.nn.Module.__call__``, not the caller; a module filter ``error::FutureWarning:tokenlab``
alone let it scroll past. The same shape is reproduced with a small library compiled here, so the
test does not depend on the installed transformers deprecating anything.
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


RENAMED = Version(transformers.__version__) >= Version("5.24")  # `cache=`; `past_key_values=` deprecated

# A library as transformers is one: the deprecated function warns naming its caller, the plumbing
# (`call`, as torch's Module.__call__), not whoever called the plumbing. Compiled with a file name
# outside tokenlab and the tests, so it counts as third-party code.
_LIBRARY = """
import warnings

def deprecated(**kwargs):
    warnings.warn("`old` is deprecated, use `new`", FutureWarning, stacklevel=2)

def call(fn, **kwargs):
    return fn(**kwargs)
"""


def _library_call():
    library: dict = {}
    exec(compile(_LIBRARY, "<a library>", "exec"), library)
    return functools.partial(library["call"], library["deprecated"], old=1)


def _old_transformers_spelling():
    ids = torch.tensor([[1, 2, 3]])
    return functools.partial(_model(), input_ids=ids, past_key_values=DynamicCache(), use_cache=True)


def test_a_deprecated_call_made_by_tokenlab_fails_and_one_made_by_a_test_warns():
    cases = [(_library_call(), "`old` is deprecated", "<a library>")]
    if RENAMED:
        cases.append((_old_transformers_spelling(), "past_key_values", "torch/nn/modules/module.py"))
    cpu = torch.device("cpu")
    for call, message, blamed in cases:
        with pytest.raises(FutureWarning, match=message):
            timing.timed(call, cpu)  # tokenlab makes the call: the test fails
        with pytest.warns(FutureWarning, match=message) as caught:
            call()  # the test makes the call: a warning, attributed where the library says
            timing.timed(call, cpu)  # expected with pytest.warns: a warning, attributed to tokenlab
        assert caught[0].filename.replace("\\", "/").endswith(blamed)
        assert caught[1].filename == timing.__file__


def test_a_deprecated_call_made_by_a_third_library_is_that_librarys():
    """tokenlab → another library → the deprecated function: the other library made the deprecated call
    (TRL calling transformers' renamed ``is_gradient_checkpointing`` from tokenlab's TRL trainers)."""
    other: dict = {}
    exec(compile("def run(fn):\n    return fn()\n", "<another library>", "exec"), other)
    with pytest.warns(FutureWarning, match="`old` is deprecated") as caught:
        timing.timed(functools.partial(other["run"], _library_call()), torch.device("cpu"))
    assert caught[0].filename == "<a library>"


def test_cache_kwargs_uses_the_name_the_model_declares():
    model = _model()
    cache = DynamicCache()
    expected = "cache" if RENAMED else "past_key_values"
    assert cache_kwargs(model, cache) == {expected: cache}
    model(input_ids=torch.tensor([[1, 2]]), **cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == 2  # filled in place, without a warning (it would fail here)

    class OldSpelling(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert cache_kwargs(OldSpelling(), cache) == {"past_key_values": cache}
