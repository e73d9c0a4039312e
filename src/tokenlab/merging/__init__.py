"""Merging: task arithmetic, TIES, DARE, SLERP, magnitude pruning and Self-Positioning behind one
registry, streaming checkpoint merges and cross-vocabulary ensembles (catalogue section M)."""
