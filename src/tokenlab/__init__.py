"""tokenlab: token-level language-model techniques from recent papers.

Five families — :mod:`tokenlab.attention`, :mod:`tokenlab.tokenization`, :mod:`tokenlab.decoding`,
:mod:`tokenlab.alignment`, :mod:`tokenlab.merging` — over :mod:`tokenlab.kernels` (fused Triton
kernels beside their PyTorch references, chosen by :mod:`tokenlab.backend`). Demo code lives in
:mod:`tokenlab.tour` (the toy world: a stdlib corpus, a BPE tokenizer and two tiny trained Llama
models); run ``python -m tokenlab.tour`` for a report of every family on it.
"""

__version__ = "0.1.0"
