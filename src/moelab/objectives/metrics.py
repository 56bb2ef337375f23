"""Evaluation numbers as pure functions of logits and labels.

Why sums: evaluation runs over many batches of unequal target counts (MLM chooses ~15% of
tokens, prefix-LM a random suffix), so a mean of per-batch means would weight batches wrongly.
Every function returns additive sums (``loss_sum`` nats, ``tokens``, ``correct``, ``bytes``);
add them over batches and call :func:`summarize` once.

Legend: B batch, S positions, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import IGNORE_INDEX


def loss_sums(logits_BSV: Tensor, labels_BS: Tensor) -> dict[str, float]:
    """Summed cross-entropy (nats, fp32) over labelled positions and their count."""
    loss = F.cross_entropy(
        logits_BSV.float().reshape(-1, logits_BSV.shape[-1]),
        labels_BS.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return {"loss_sum": float(loss), "tokens": float((labels_BS != IGNORE_INDEX).sum())}


def accuracy_sums(logits_BSV: Tensor, labels_BS: Tensor) -> dict[str, float]:
    """How many labelled positions the argmax gets right."""
    keep = labels_BS != IGNORE_INDEX
    correct = (logits_BSV.argmax(-1) == labels_BS) & keep
    return {"correct": float(correct.sum())}


def byte_sums(labels_BS: Tensor, token_bytes_V: Tensor) -> dict[str, float]:
    """UTF-8 bytes of the labelled target tokens (for bits per byte)."""
    keep = labels_BS != IGNORE_INDEX
    ids = labels_BS.clamp_min(0)
    return {"bytes": float((token_bytes_V.to(ids.device)[ids] * keep).sum())}


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """``total += sums`` key by key (returns ``total``)."""
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + v
    return total


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """``loss`` (mean nats per target), plus ``accuracy`` and ``bpb`` when their sums are present.

    ``bpb`` = total nats / ln 2 / total bytes of the predicted tokens; NaN where nothing counts.
    """
    tokens = sums.get("tokens", 0.0)
    out = {"loss": sums["loss_sum"] / tokens if tokens else math.nan, "tokens": tokens}
    if "correct" in sums:
        out["accuracy"] = sums["correct"] / tokens if tokens else math.nan
    if "bytes" in sums:
        out["bpb"] = sums["loss_sum"] / math.log(2) / sums["bytes"] if sums["bytes"] else math.nan
    return out


def token_bytes(tokenizer) -> Tensor:
    """``[V]`` UTF-8 length of each token (0 for special tokens), for bits per byte.

    Bytes tokenizer: 1 per byte id. Byte-level BPE: the token string's length (each character
    of a byte-level token stands for one byte). Other HF tokenizers: length of the decoded token.
    """
    V = tokenizer.vocab_size
    out = torch.zeros(V, dtype=torch.long)
    specials = set(tokenizer.special_ids())
    tok = getattr(tokenizer, "tok", None)
    if tok is None:  # bytes
        out[: min(256, V)] = 1
    else:
        byte_level = type(tok.decoder).__name__ == "ByteLevel"
        for i in range(V):
            if i in specials:
                continue
            piece = tok.id_to_token(i)
            if piece is not None:
                out[i] = len(piece) if byte_level else len(tok.decode([i]).encode("utf-8"))
    out[list(specials)] = 0
    return out
