"""Fused Triton kernels, each in its own subpackage beside the PyTorch reference it must equal.

Layout per op: ``reference.py`` (the readable specification and CPU fallback), ``kernel.py`` (the
Triton kernel, imported lazily) and ``__init__.py`` (the public function applying the dispatch rule
of :mod:`tokenlab.backend`).
"""

from tokenlab.kernels.temperature_softmax import temperature_softmax

__all__ = ["temperature_softmax"]
