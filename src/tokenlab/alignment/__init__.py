"""Alignment: token-level preference and policy losses (DPO family, KTO/BCO, GRPO/GTPO, ...) as small
formulas over one chunked fused-linear mechanism that never materialises ``[N, V]`` logits
(catalogue section L)."""
