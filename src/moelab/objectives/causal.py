"""``causal``: next-token prediction (GPT), the decoder-only default.

The loader's blocks already are next-token pairs (labels shifted, ``-100`` after an EOS), so
this objective passes them through unchanged: a run with ``causal`` is exactly the run without
an objective. Evaluation: loss per target token and bits per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.data.tokenizer import Tokenizer
from moelab.objectives import metrics
from moelab.objectives.base import Objective, ObjectiveBatch, next_token_labels
from moelab.objectives.registry import OBJECTIVES


@OBJECTIVES.register("causal")
@dataclass(frozen=True)
class CausalLM(Objective):
    name = "causal"
    architecture = "decoder"
    attention = "causal"
    metric = "loss"

    def prepare(
        self,
        input_ids: Tensor,
        labels: Tensor | None,
        tokenizer: Tokenizer,
        generator: torch.Generator | None = None,
    ) -> ObjectiveBatch:
        return ObjectiveBatch(input_ids=input_ids, labels=next_token_labels(input_ids, labels))

    def metric_sums(
        self, logits: Tensor, batch: ObjectiveBatch, token_bytes_V: Tensor | None = None
    ) -> dict[str, float]:
        sums = metrics.loss_sums(logits, batch.labels)
        if token_bytes_V is not None:
            sums.update(metrics.byte_sums(batch.labels, token_bytes_V))
        return sums
