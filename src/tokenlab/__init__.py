"""tokenlab: token-level language-model techniques from recent papers.

Five families — :mod:`tokenlab.attention`, :mod:`tokenlab.tokenization`, :mod:`tokenlab.decoding`,
:mod:`tokenlab.alignment`, :mod:`tokenlab.merging` — plus :mod:`tokenlab.kernels` (fused Triton
kernels beside their PyTorch references, chosen by :mod:`tokenlab.backend`) and :mod:`tokenlab.tour.toy`
(the embedded toy world: a stdlib corpus, a BPE tokenizer and two tiny trained Llama models).
Run ``python -m tokenlab.tour`` for a report of every family on the toy world.
"""

__version__ = "0.1.0"
