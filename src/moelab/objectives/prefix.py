"""``prefix``: prefix language modelling (T5/UL2 "prefix LM").

Each sample gets a random prefix length P, uniform in ``[min_prefix, S - 1]`` (at least one
target remains). The model (``attention='prefix'``) attends bidirectionally inside the prefix
``[0, P)`` and causally after it. The loss covers only the targets *after* the prefix: position
i predicts token i+1, so positions ``i ≥ P - 1`` keep their label and ``i < P - 1`` get
``-100`` (those targets are prefix tokens the prefix positions can already see; training on
them would reward copying). Evaluation: target-token loss (the suffix) and bits per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.config import IGNORE_INDEX, ConfigError
from moelab.data.tokenizer import Tokenizer
from moelab.errors import UserError
from moelab.objectives import metrics
from moelab.objectives.base import Objective, ObjectiveBatch, next_token_labels
from moelab.objectives.registry import OBJECTIVES


@OBJECTIVES.register("prefix")
@dataclass(frozen=True)
class PrefixLM(Objective):
    name = "prefix"
    architecture = "decoder"
    attention = "prefix"
    metric = "target_loss"

    min_prefix: int = 1  # shortest prefix drawn

    def __post_init__(self) -> None:
        if not (isinstance(self.min_prefix, int) and self.min_prefix >= 1):
            raise ConfigError(
                f"objective.min_prefix = {self.min_prefix!r} is invalid: must be an integer >= 1"
            )

    def sample_prefix_len(self, batch: int, seq_len: int, generator: torch.Generator | None) -> Tensor:
        """``[B]`` prefix lengths, uniform in ``[min_prefix, seq_len - 1]``."""
        if seq_len - 1 < self.min_prefix:
            raise UserError(
                f"prefix objective: blocks of {seq_len} tokens leave no target after a prefix of at least "
                f"{self.min_prefix}: raise data.seq_len or lower objective.min_prefix"
            )
        return torch.randint(self.min_prefix, seq_len, (batch,), generator=generator)

    def prepare(
        self,
        input_ids: Tensor,
        labels: Tensor | None,
        tokenizer: Tokenizer,
        generator: torch.Generator | None = None,
    ) -> ObjectiveBatch:
        B, S = input_ids.shape
        labels = next_token_labels(input_ids, labels).clone()
        prefix_len = self.sample_prefix_len(B, S, generator).to(input_ids.device)
        in_prefix = torch.arange(S, device=input_ids.device)[None, :] < (prefix_len[:, None] - 1)
        labels[in_prefix] = IGNORE_INDEX
        return ObjectiveBatch(input_ids=input_ids, labels=labels, prefix_len=prefix_len)

    def metric_sums(
        self, logits: Tensor, batch: ObjectiveBatch, token_bytes_V: Tensor | None = None
    ) -> dict[str, float]:
        sums = metrics.loss_sums(logits, batch.labels)
        if token_bytes_V is not None:
            sums.update(metrics.byte_sums(batch.labels, token_bytes_V))
        return sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = metrics.summarize(sums)
        out["target_loss"] = out["loss"]
        return out
