"""Tokenization: BPE and superword (SuperBPE) training with digit pre-tokenisers and HF export, exact
byte-level probabilities of token-level LMs (pre-token-aware cover encodings, next-byte laws with
KV-cache reuse, fill-in-the-middle, byte-level ensembles with CoRE weights), and tokenizer transplant
(OMP, TokenAdapt and baselines)."""

from tokenlab.tokenization.bpe import BPETokenizer, bytes_to_unicode, train_bpe, train_superword_bpe
from tokenlab.tokenization.byte_level import (
    EOS_BYTE,
    ByteLevelBPE,
    ByteLevelCost,
    ByteLevelEnsemble,
    ByteLevelLM,
    core_weights,
    fill_in_the_middle,
    generate_bytes,
)
from tokenlab.tokenization.pretokenize import (
    DIGIT_SPLITS,
    SPLITS,
    PreTokenizer,
    RegexSplit,
    make_pre_tokenizer,
)
from tokenlab.tokenization.transplant import (
    TRANSPLANT_METHODS,
    hf_text_embedder,
    orthogonal_matching_pursuit,
    transplant_tokenizer,
)

__all__ = [
    "DIGIT_SPLITS",
    "EOS_BYTE",
    "SPLITS",
    "TRANSPLANT_METHODS",
    "BPETokenizer",
    "ByteLevelBPE",
    "ByteLevelCost",
    "ByteLevelEnsemble",
    "ByteLevelLM",
    "PreTokenizer",
    "RegexSplit",
    "bytes_to_unicode",
    "core_weights",
    "fill_in_the_middle",
    "generate_bytes",
    "hf_text_embedder",
    "make_pre_tokenizer",
    "orthogonal_matching_pursuit",
    "train_bpe",
    "train_superword_bpe",
    "transplant_tokenizer",
]
