"""A ``LogitsProcessor`` that records what it sees inside ``generate`` (for tests of processors)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class RecordingProcessor(LogitsProcessor):
    """Passes scores through unchanged and records ``(input_ids, scores)`` copies of every call.

    Placed before and after a processor in ``generate``'s ``logits_processor`` list, two recorders
    give the processor's input and output at every step, in every generation mode.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores
