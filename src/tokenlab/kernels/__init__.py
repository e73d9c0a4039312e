"""Fused Triton kernels, each in its own subpackage beside the PyTorch reference it must equal.

Layout per op: ``reference.py`` (the readable specification and CPU fallback), ``kernel.py`` (the
Triton kernel, imported lazily) and ``__init__.py`` (the kernel-level entry points; for the small ops
also the dispatch rule of :mod:`tokenlab.backend`, while the attention op's public, validated face is
:func:`tokenlab.attention.flash_attention`). ``attention/variant.py`` holds the attention flags as
one typed structure shared by the reference, the kernel and the HF adapter.
:mod:`tokenlab.kernels.warping` holds the logit warping (temperature, top-k, top-p) that the
verification kernel and every sampling loop share.

This package is a leaf of tokenlab: it imports ``torch``, ``triton``, :mod:`tokenlab.backend` and
:mod:`tokenlab._checks`, never a family.
"""

from tokenlab.kernels.speculative_verify import speculative_verify
from tokenlab.kernels.temperature_softmax import temperature_softmax
from tokenlab.kernels.tree_verify import tree_verify
from tokenlab.kernels.warping import Warping

__all__ = ["Warping", "speculative_verify", "temperature_softmax", "tree_verify"]
