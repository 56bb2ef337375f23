"""What every training objective is: packed token blocks → model inputs, labels and masks.

Why a separate layer: the data loader packs documents into blocks of next-token pairs, and the
models (decoder-only :class:`~moelab.model.transformer.Transformer`, encoder-only with
``attention='bidirectional'``, :class:`~moelab.model.encoder_decoder.EncoderDecoder`) each
take plain tensors. An objective sits between them: it decides what the model sees, what it
must predict and which attention it needs, and how its evaluation numbers are computed. The
trainer never branches on the objective's name; it calls these methods (docs/objectives.md).

Legend: B batch, S block length (loader's ``seq_len``), Si model/encoder input length, So
output (label) length, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from moelab.config import IGNORE_INDEX
from moelab.data.tokenizer import Tokenizer
from moelab.errors import UserError
from moelab.objectives import metrics

ARCHITECTURES = ("decoder", "encoder", "encoder_decoder")


@dataclass
class ObjectiveBatch:
    """Model-ready tensors for one batch.

    ``labels`` line up with the model's output logits (already shifted where shifting is
    meant), ``-100`` = no loss. ``input_ids`` is the decoder-only/encoder input or, for an
    encoder–decoder, the encoder input; ``decoder_input_ids`` is then the decoder input
    (labels shifted right behind a start token). ``model_inputs()`` gives the keyword
    arguments of the model's ``forward``.
    """

    input_ids: Tensor  # [B, Si] long
    labels: Tensor  # [B, So] long, -100 = ignore
    prefix_len: Tensor | None = None  # [B] long (prefix objective)
    attention_mask: Tensor | None = None  # [B, Si] 1 = real token, 0 = padding
    decoder_input_ids: Tensor | None = None  # [B, So] long (encoder–decoder objectives)
    # Not a model input: the block position each ``input_ids`` token came from (-1 = inserted, e.g. a
    # sentinel), for objectives that move tokens (span); None = position i is block position i. Lets
    # routing analysis look up the loader's per-token labels (domain, language) for encoder tokens.
    source_positions: Tensor | None = None  # [B, Si] long

    def model_inputs(self) -> dict[str, Tensor]:
        """``model(**batch.model_inputs())`` runs the forward pass with the loss."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None and f.name != "source_positions"
        }

    @property
    def num_targets(self) -> int:
        """Positions that carry a loss."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> ObjectiveBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return ObjectiveBatch(**{k: None if v is None else v.to(device) for k, v in kw.items()})


class Objective:
    """Base of the registered objectives (each a frozen dataclass of its settings).

    Class attributes say what the objective needs from the model:
    ``architecture`` (``decoder`` | ``encoder`` | ``encoder_decoder``), ``attention`` (the
    ``ModelConfig.attention`` a single-stack model must use; None for encoder–decoder) and
    ``metric`` (the headline evaluation number, a key of :meth:`summarize`).
    """

    name: ClassVar[str]
    architecture: ClassVar[str]
    attention: ClassVar[str | None]
    metric: ClassVar[str]

    # ---------------------------------------------------------------- tokenizer
    def special_tokens(self) -> list[str]:
        """Tokens this objective needs the tokenizer to have (added by :meth:`prepare_tokenizer`)."""
        return []

    def prepare_tokenizer(self, tokenizer: Tokenizer) -> Tokenizer:
        """Add the objective's special tokens (appended: existing ids never move); idempotent.

        Call it before the model's vocab size is taken from ``tokenizer.vocab_size``.
        """
        needed = self.special_tokens()
        if needed:
            tokenizer.add_special_tokens(needed)
        return tokenizer

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in self.special_tokens() if tokenizer.token_to_id(t) is None]
        if missing:
            raise UserError(
                f"objective {self.name!r} needs the tokenizer tokens {missing[:3]}{' …' if len(missing) > 3 else ''}: "
                "call objective.prepare_tokenizer(tokenizer) before building the model"
            )

    # ---------------------------------------------------------------- batches
    def prepare(
        self,
        input_ids: Tensor,
        labels: Tensor | None,
        tokenizer: Tokenizer,
        generator: torch.Generator | None = None,
    ) -> ObjectiveBatch:
        """Turn one packed batch (the loader's ``input_ids``/``labels``, ``[B, S]``) into model tensors.

        ``labels`` are the loader's shifted next-token labels (``-100`` after an EOS); objectives
        that do not predict the next token ignore them; None derives them from ``input_ids``.
        ``generator`` drives all randomness (masking, span and prefix sampling), so a seeded
        generator reproduces a batch exactly.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluation
    def metric_sums(
        self, logits: Tensor, batch: ObjectiveBatch, token_bytes_V: Tensor | None = None
    ) -> dict[str, float]:
        """Additive sums for one batch (add them over batches, then :meth:`summarize`)."""
        return metrics.loss_sums(logits, batch.labels)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Sums over the evaluation set → metrics (``loss`` always, plus the objective's own)."""
        return metrics.summarize(sums)

    def evaluate(
        self, logits: Tensor, batch: ObjectiveBatch, token_bytes_V: Tensor | None = None
    ) -> dict[str, float]:
        """Metrics of a single batch: ``summarize(metric_sums(...))``."""
        return self.summarize(self.metric_sums(logits, batch, token_bytes_V))


def next_token_labels(input_ids: Tensor, labels: Tensor | None) -> Tensor:
    """The loader's labels, or (when None) ``input_ids`` shifted left with the last position ignored."""
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise UserError(
                f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        return labels
    out = torch.full_like(input_ids, IGNORE_INDEX)
    out[:, :-1] = input_ids[:, 1:]
    return out
