"""``mlm``: BERT masked language modelling for an encoder (``attention='bidirectional'``).

Masking (Devlin et al. 2019, §3.1): each non-special token is chosen independently with
probability ``mask_prob`` (0.15); a chosen token is replaced by the mask token with
probability ``mask_token_frac`` (0.8), by a random non-special token with ``random_token_frac``
(0.1), and left unchanged otherwise (0.1). The loss covers the chosen positions only, and the
label is the original token at the same position (no shift). Special tokens (BOS/EOS/PAD,
mask, sentinels) are never chosen and never drawn as random replacements. A row in which
nothing was chosen gets one chosen token (so a batch never has zero targets; at S=128 this
happens with probability 0.85^128 ≈ 1e-9 per row, so the statistics are unaffected).

Evaluation: masked-token accuracy (argmax = original) and loss over the chosen positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.config import IGNORE_INDEX, ConfigError
from moelab.data.tokenizer import MASK, Tokenizer
from moelab.errors import UserError
from moelab.objectives import metrics
from moelab.objectives.base import Objective, ObjectiveBatch
from moelab.objectives.registry import OBJECTIVES


@OBJECTIVES.register("mlm")
@dataclass(frozen=True)
class MaskedLM(Objective):
    name = "mlm"
    architecture = "encoder"
    attention = "bidirectional"
    metric = "masked_accuracy"

    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1

    def __post_init__(self) -> None:
        for field_name in ("mask_prob", "mask_token_frac", "random_token_frac"):
            v = getattr(self, field_name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"objective.{field_name} = {v!r} is invalid: must be in [0, 1]")
        if self.mask_prob == 0.0:
            raise ConfigError(
                "objective.mask_prob = 0.0 is invalid: must be > 0 (nothing would be predicted)"
            )
        if self.mask_token_frac + self.random_token_frac > 1.0 + 1e-12:
            raise ConfigError(
                f"objective.mask_token_frac + objective.random_token_frac = "
                f"{self.mask_token_frac + self.random_token_frac} is invalid: must be <= 1"
            )

    def special_tokens(self) -> list[str]:
        return [MASK]

    def prepare(
        self,
        input_ids: Tensor,
        labels: Tensor | None,
        tokenizer: Tokenizer,
        generator: torch.Generator | None = None,
    ) -> ObjectiveBatch:
        mask_id = tokenizer.mask_id
        if mask_id is None:
            self.check_tokenizer(tokenizer)
        dev = input_ids.device
        specials = torch.tensor(tokenizer.special_ids(), dtype=torch.long)
        is_regular_V = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
        is_regular_V[specials[specials < tokenizer.vocab_size]] = False
        regular_ids = is_regular_V.nonzero().squeeze(1)
        if regular_ids.numel() == 0:
            raise UserError("mlm objective: the tokenizer has no regular (non-special) tokens")
        ids_cpu = input_ids.cpu()
        eligible_BS = ~torch.isin(ids_cpu, specials)

        u_BS = torch.rand(ids_cpu.shape, generator=generator)
        chosen_BS = eligible_BS & (u_BS < self.mask_prob)
        # Rows with no target: choose one eligible position (see module docstring).
        empty = (~chosen_BS.any(1)) & eligible_BS.any(1)
        if empty.any():
            score = torch.rand(ids_cpu.shape, generator=generator).masked_fill(~eligible_BS, -1.0)
            pick = score.argmax(1)
            rows = empty.nonzero().squeeze(1)
            chosen_BS[rows, pick[rows]] = True

        action_BS = torch.rand(ids_cpu.shape, generator=generator)
        to_mask = chosen_BS & (action_BS < self.mask_token_frac)
        to_random = (
            chosen_BS
            & (action_BS >= self.mask_token_frac)
            & (action_BS < self.mask_token_frac + self.random_token_frac)
        )
        random_BS = regular_ids[torch.randint(0, regular_ids.numel(), ids_cpu.shape, generator=generator)]

        inputs = ids_cpu.clone()
        inputs[to_mask] = mask_id  # type: ignore[assignment]
        inputs[to_random] = random_BS[to_random]
        out_labels = torch.where(chosen_BS, ids_cpu, torch.full_like(ids_cpu, IGNORE_INDEX))
        return ObjectiveBatch(input_ids=inputs.to(dev), labels=out_labels.to(dev))

    def metric_sums(
        self, logits: Tensor, batch: ObjectiveBatch, token_bytes_V: Tensor | None = None
    ) -> dict[str, float]:
        return {**metrics.loss_sums(logits, batch.labels), **metrics.accuracy_sums(logits, batch.labels)}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = metrics.summarize(sums)
        out["masked_loss"], out["masked_accuracy"] = out["loss"], out["accuracy"]
        return out
