"""Tokenization: BPE and superword (SuperBPE) training with digit pre-tokenisers and HF export, exact
byte-level probabilities of token-level LMs (cover encodings, next-byte laws, fill-in-the-middle,
byte-level ensembles), tokenizer transplant (OMP, TokenAdapt and baselines), tokenizer metrics
(bytes/token, fertility, token premiums, parity) and probes (CharBench-style character questions,
ADT-style adversarial strings)."""

from tokenlab.tokenization.bpe import BPETokenizer, bytes_to_unicode, train_bpe, train_superword_bpe
from tokenlab.tokenization.byte_level import (
    EOS_BYTE,
    ByteLevelBPE,
    ByteLevelCost,
    ByteLevelEnsemble,
    ByteLevelLM,
    fill_in_the_middle,
    generate_bytes,
)
from tokenlab.tokenization.metrics import (
    bytes_per_token,
    compare_tokenizers,
    corpus_token_count,
    encode_texts,
    fertility,
    parity,
    plot_tokenizer_comparison,
    token_premiums,
    vocabulary_utilisation,
)
from tokenlab.tokenization.pretokenize import (
    DIGIT_SPLITS,
    SPLITS,
    PreTokenizer,
    RegexSplit,
    make_pre_tokenizer,
)
from tokenlab.tokenization.probes import (
    CHAR_TASKS,
    AdversarialString,
    CharProbe,
    CharProbeReport,
    CharProbeResult,
    StringScores,
    adversarial_strings,
    char_probes,
    continuation_log_probs,
    run_char_probes,
    score_strings,
)
from tokenlab.tokenization.transplant import (
    TRANSPLANT_METHODS,
    orthogonal_matching_pursuit,
    transplant_tokenizer,
)

__all__ = [
    "CHAR_TASKS",
    "DIGIT_SPLITS",
    "EOS_BYTE",
    "SPLITS",
    "TRANSPLANT_METHODS",
    "AdversarialString",
    "BPETokenizer",
    "ByteLevelBPE",
    "ByteLevelCost",
    "ByteLevelEnsemble",
    "ByteLevelLM",
    "CharProbe",
    "CharProbeReport",
    "CharProbeResult",
    "PreTokenizer",
    "RegexSplit",
    "StringScores",
    "adversarial_strings",
    "bytes_per_token",
    "bytes_to_unicode",
    "char_probes",
    "compare_tokenizers",
    "continuation_log_probs",
    "corpus_token_count",
    "encode_texts",
    "fertility",
    "fill_in_the_middle",
    "generate_bytes",
    "make_pre_tokenizer",
    "orthogonal_matching_pursuit",
    "parity",
    "plot_tokenizer_comparison",
    "run_char_probes",
    "score_strings",
    "token_premiums",
    "train_bpe",
    "train_superword_bpe",
    "transplant_tokenizer",
    "vocabulary_utilisation",
]
