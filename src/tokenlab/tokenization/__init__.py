"""Tokenization: BPE and superword (SuperBPE) training with digit pre-tokenisers and HF export, exact
byte-level probabilities of token-level LMs (pre-token-aware cover encodings, next-byte laws with
KV-cache reuse, fill-in-the-middle, byte-level ensembles with CoRE weights), tokenizer transplant
(OMP, TokenAdapt and baselines), tokenizer metrics (bytes/token, fertility, token premiums, parity)
and probes (CharBench-style character questions, ADT-style adversarial strings), dynamic
tokenization (batch-level merges) and learned chunking modules (MrT5 delete gate, H-Net dynamic
chunking, word pooling, lexinvariant embeddings)."""

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
from tokenlab.tokenization.chunking import (
    ChunkingOutput,
    DeleteGateEncoder,
    DeleteGateOutput,
    DynamicChunking,
    LexinvariantEmbedding,
    MrT5DeleteGate,
    WordPooling,
    word_ids_from_text,
)
from tokenlab.tokenization.dynamic import (
    DynamicBatch,
    batch_merges,
    dynamic_tokenize,
    mean_of_parts,
    run_dynamic,
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
    hf_text_embedder,
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
    "ChunkingOutput",
    "DeleteGateEncoder",
    "DeleteGateOutput",
    "DynamicBatch",
    "DynamicChunking",
    "LexinvariantEmbedding",
    "MrT5DeleteGate",
    "PreTokenizer",
    "RegexSplit",
    "StringScores",
    "WordPooling",
    "adversarial_strings",
    "batch_merges",
    "bytes_per_token",
    "bytes_to_unicode",
    "char_probes",
    "compare_tokenizers",
    "continuation_log_probs",
    "core_weights",
    "corpus_token_count",
    "dynamic_tokenize",
    "encode_texts",
    "fertility",
    "fill_in_the_middle",
    "generate_bytes",
    "hf_text_embedder",
    "make_pre_tokenizer",
    "mean_of_parts",
    "orthogonal_matching_pursuit",
    "parity",
    "plot_tokenizer_comparison",
    "run_char_probes",
    "run_dynamic",
    "score_strings",
    "token_premiums",
    "train_bpe",
    "train_superword_bpe",
    "transplant_tokenizer",
    "vocabulary_utilisation",
    "word_ids_from_text",
]
