"""Tokenization: BPE and superword training, exact byte-level probabilities, tokenizer transplant,
dynamic tokenization, learned chunking modules and tokenizer metrics (catalogue section T)."""

from tokenlab.tokenization.byte_level import (
    EOS_BYTE,
    ByteLevelBPE,
    ByteLevelCost,
    ByteLevelEnsemble,
    ByteLevelLM,
    fill_in_the_middle,
    generate_bytes,
)
from tokenlab.tokenization.transplant import (
    TRANSPLANT_METHODS,
    orthogonal_matching_pursuit,
    transplant_tokenizer,
)

__all__ = [
    "EOS_BYTE",
    "TRANSPLANT_METHODS",
    "ByteLevelBPE",
    "ByteLevelCost",
    "ByteLevelEnsemble",
    "ByteLevelLM",
    "fill_in_the_middle",
    "generate_bytes",
    "orthogonal_matching_pursuit",
    "transplant_tokenizer",
]
