"""Tokenization: BPE and superword training, exact byte-level probabilities, tokenizer transplant,
dynamic tokenization, learned chunking modules and tokenizer metrics (catalogue section T)."""

from tokenlab.tokenization.bpe import BPETokenizer, bytes_to_unicode, train_bpe, train_superword_bpe
from tokenlab.tokenization.pretokenize import (
    DIGIT_SPLITS,
    SPLITS,
    PreTokenizer,
    RegexSplit,
    make_pre_tokenizer,
)

__all__ = [
    "DIGIT_SPLITS",
    "SPLITS",
    "BPETokenizer",
    "PreTokenizer",
    "RegexSplit",
    "bytes_to_unicode",
    "make_pre_tokenizer",
    "train_bpe",
    "train_superword_bpe",
]
