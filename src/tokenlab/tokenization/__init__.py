"""Tokenization: BPE and superword training, exact byte-level probabilities, tokenizer transplant,
dynamic tokenization, learned chunking modules and tokenizer metrics (catalogue section T)."""
