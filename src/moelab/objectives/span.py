"""``span``: T5 span corruption for an encoder–decoder (Raffel et al. 2020, §3.1.4 and §3.3.4).

For a block of S tokens (the semantics of T5's ``random_spans_noise_mask``):
- ``num_noise = round(S · noise_density)``, clamped to ``[1, S - 1]``;
  ``num_spans = round(num_noise / mean_span_length)``, clamped to ``[1, min(num_noise, S - num_noise)]``.
- The noise tokens are cut into ``num_spans`` non-empty spans and the other tokens into
  ``num_spans`` non-empty runs, each cut uniformly at random (distinct cut points), and the
  two are interleaved starting with a non-noise run: ``keep₀ noise₀ keep₁ noise₁ …``, so a
  block always starts with kept text and ends inside a noise span, as in T5.
- Encoder input: the kept tokens, each noise span replaced by one sentinel (span i → sentinel
  i), then EOS. Target: for each span i, sentinel i followed by the span's tokens, then EOS.
  Paper example: "Thank you <X> me to your party <Y> week." → "<X> for inviting <Y> last <Z>"
  (ours has no trailing sentinel since the block ends in a span).
- Decoder input: the target shifted right behind a start token, the PAD id (T5's
  ``decoder_start_token_id`` is its pad id).

Every row has the same ``num_noise`` and ``num_spans``, so inputs (``S - num_noise + num_spans
+ 1``) and targets (``num_noise + num_spans + 1``) need no padding.

Sentinels: dedicated special tokens ``<extra_id_0>`` … ``<extra_id_{n-1}>`` added to the
tokenizer (not the top of a fixed vocabulary, which would steal real tokens). They are added
in descending order, so ``<extra_id_0>`` gets the highest id: the same layout as T5's
vocabulary (``<extra_id_0>`` = vocab − 1, counting down). ``num_sentinels`` (default 100, as T5)
bounds the spans per block; a block that needs more is a clear error. A literal
``<extra_id_3>`` inside a BPE-encoded text becomes that sentinel (as in T5); reconstruction is
exact for any block without sentinel ids.

Evaluation: target-token loss (and accuracy) over the decoder targets.

Legend: B batch, S block length, N noise tokens per row, K spans per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.config import ConfigError
from moelab.data.tokenizer import Tokenizer, sentinel_token
from moelab.errors import UserError
from moelab.objectives import metrics
from moelab.objectives.base import Objective, ObjectiveBatch
from moelab.objectives.registry import OBJECTIVES


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """``(num_noise, num_spans)`` for a block of ``length`` tokens (see the module docstring)."""
    if length < 2:
        raise UserError(
            f"span corruption needs blocks of at least 2 tokens, got {length}: raise data.seq_len"
        )
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_segmentation(num_items: int, num_segments: int, generator: torch.Generator | None) -> Tensor:
    """``[num_segments]`` positive lengths summing to ``num_items``, cut points uniform and distinct."""
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([num_items])])
    return bounds.diff()


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, generator: torch.Generator | None = None
) -> Tensor:
    """``[length]`` bool, True = noise: ``num_spans`` noise spans between kept runs, kept run first."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, generator)
    lengths = torch.stack([keep_lengths, noise_lengths], dim=1).reshape(-1)  # keep₀ noise₀ keep₁ …
    is_noise = torch.tensor([False, True]).repeat(num_spans)
    return torch.repeat_interleave(is_noise, lengths)


def corrupt_spans(
    tokens_BS: Tensor, noise_BS: Tensor, sentinel_ids: Tensor, eos_id: int
) -> tuple[Tensor, Tensor]:
    """Apply a noise mask: ``(inputs [B, S-N+K+1], targets [B, N+K+1])`` (rows share N and K).

    Each position gets two slots, (sentinel, token): inputs keep the sentinel slot at a span
    start and the token slot where there is no noise; targets keep the sentinel slot at a
    span start and the token slot where there is noise.
    """
    B = tokens_BS.shape[0]
    prev = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=noise_BS.device), noise_BS[:, :-1]], dim=1)
    start_BS = noise_BS & ~prev
    span_BS = start_BS.long().cumsum(1) - 1
    sentinel_BS = sentinel_ids.to(tokens_BS.device)[span_BS.clamp_min(0)]
    slots_BS2 = torch.stack([sentinel_BS, tokens_BS], dim=2)
    eos = torch.full((B, 1), eos_id, dtype=tokens_BS.dtype, device=tokens_BS.device)

    def take(keep_BS2: Tensor) -> Tensor:
        counts = keep_BS2.sum((1, 2))
        if not bool((counts == counts[0]).all()):
            raise ValueError("every row needs the same number of noise tokens and spans")
        return torch.cat([slots_BS2[keep_BS2].view(B, -1), eos], dim=1)

    inputs = take(torch.stack([start_BS, ~noise_BS], dim=2))
    targets = take(torch.stack([start_BS, noise_BS], dim=2))
    return inputs, targets


def reconstruct_spans(inputs: list[int], targets: list[int], sentinel_ids: list[int]) -> list[int]:
    """Inverse of :func:`corrupt_spans` for one row (both end in EOS): the original tokens."""
    where = {s: i for i, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for t in targets[:-1]:
        if t in where:
            current = spans.setdefault(where[t], [])
        elif current is None:
            raise ValueError("targets must start with a sentinel")
        else:
            current.append(t)
    out: list[int] = []
    for t in inputs[:-1]:
        out.extend(spans[where[t]] if t in where else [t])
    return out


@OBJECTIVES.register("span")
@dataclass(frozen=True)
class SpanCorruption(Objective):
    name = "span"
    architecture = "encoder_decoder"
    attention = None
    metric = "target_loss"

    noise_density: float = 0.15
    mean_span_length: float = 3.0
    num_sentinels: int = 100

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(
                f"objective.noise_density = {self.noise_density!r} is invalid: must be in (0, 1)"
            )
        if not self.mean_span_length >= 1.0:
            raise ConfigError(
                f"objective.mean_span_length = {self.mean_span_length!r} is invalid: must be >= 1"
            )
        if not (isinstance(self.num_sentinels, int) and self.num_sentinels >= 1):
            raise ConfigError(
                f"objective.num_sentinels = {self.num_sentinels!r} is invalid: must be an integer >= 1"
            )

    def special_tokens(self) -> list[str]:
        # Descending, so <extra_id_0> gets the highest id (T5's layout).
        return [sentinel_token(i) for i in reversed(range(self.num_sentinels))]

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """``(encoder input length, decoder target length)`` for blocks of ``seq_len`` tokens."""
        n, k = span_counts(seq_len, self.noise_density, self.mean_span_length)
        return seq_len - n + k + 1, n + k + 1

    def noise_mask(self, batch: int, seq_len: int, generator: torch.Generator | None = None) -> Tensor:
        """``[B, S]`` bool, one independent :func:`random_spans_noise_mask` per row."""
        rows = [
            random_spans_noise_mask(seq_len, self.noise_density, self.mean_span_length, generator)
            for _ in range(batch)
        ]
        return torch.stack(rows)

    def prepare(
        self,
        input_ids: Tensor,
        labels: Tensor | None,
        tokenizer: Tokenizer,
        generator: torch.Generator | None = None,
    ) -> ObjectiveBatch:
        B, S = input_ids.shape
        _, k = span_counts(S, self.noise_density, self.mean_span_length)
        sentinels = tokenizer.sentinel_ids()
        if len(sentinels) < k:
            raise UserError(
                f"span objective: blocks of {S} tokens have {k} noise spans but the tokenizer has {len(sentinels)} "
                f"sentinels: raise objective.num_sentinels to at least {k} and call objective.prepare_tokenizer"
            )
        noise = self.noise_mask(B, S, generator).to(input_ids.device)
        inputs, targets = corrupt_spans(input_ids, noise, torch.tensor(sentinels[:k]), tokenizer.eos_id)
        # The same selection applied to block positions (sentinels and EOS → -1): where each input came from.
        pos_BS = torch.arange(S, device=input_ids.device).expand(B, S)
        no_sentinel = torch.full((k,), -1, dtype=torch.long)
        source_positions, _ = corrupt_spans(pos_BS, noise, no_sentinel, -1)
        start = torch.full((B, 1), tokenizer.pad_id, dtype=targets.dtype, device=targets.device)
        decoder_input_ids = torch.cat([start, targets[:, :-1]], dim=1)
        return ObjectiveBatch(
            input_ids=inputs,
            labels=targets,
            decoder_input_ids=decoder_input_ids,
            source_positions=source_positions,
        )

    def metric_sums(
        self, logits: Tensor, batch: ObjectiveBatch, token_bytes_V: Tensor | None = None
    ) -> dict[str, float]:
        return {**metrics.loss_sums(logits, batch.labels), **metrics.accuracy_sums(logits, batch.labels)}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = metrics.summarize(sums)
        out["target_loss"], out["target_accuracy"] = out["loss"], out["accuracy"]
        return out
