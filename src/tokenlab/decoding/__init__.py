"""Decoding: speculative decoding (chain, batched, token trees) with a fused verification kernel,
contrastive/context-aware decoding, counterfactual generation, steering logits processors,
constrained sampling and generation metrics (catalogue section D)."""
