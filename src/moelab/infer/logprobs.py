"""Log-probabilities of generated tokens, and the two shapes OpenAI returns them in.

Why from the sampler's logits: the numbers must describe the distribution the token was actually
drawn from at that step, not a second forward pass that could differ (batching, caches). The
engine receives each sampled token together with the logits row :func:`generate` handed to the
sampler, and keeps the log-softmax of that row over the whole vocabulary: the model's own
distribution, before temperature, top-k and top-p (as OpenAI reports it).

Token strings are ``tokenizer.decode([id])``; a token that is part of a multi-byte character
decodes to U+FFFD, as in OpenAI's answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IMPOSSIBLE = -9999.0  # OpenAI's stand-in for log(0): keeps the JSON finite

Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its log-probability and the ``top`` most likely tokens of that step,
    most likely first, as ``(token id, logprob)`` pairs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _finite(x: float) -> float:
    return x if math.isfinite(x) else IMPOSSIBLE


def token_logprob(logits_V: Tensor, token: int, top_n: int) -> TokenLogprob:
    """The log-probability of ``token`` and the ``top_n`` best tokens under ``softmax(logits_V)``."""
    logp_V = torch.log_softmax(logits_V.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        values, ids = torch.topk(logp_V, min(top_n, logp_V.shape[-1]))
        top = tuple((i, _finite(v)) for i, v in zip(ids.tolist(), values.tolist()))
    return TokenLogprob(int(token), _finite(float(logp_V[token])), top)


def completion_logprobs(entries: Sequence[TokenLogprob], decode: Decode, offset: int) -> tuple[dict[str, Any], int]:
    """``/v1/completions``' shape ``{tokens, token_logprobs, top_logprobs, text_offset}``, where
    ``text_offset`` counts characters from the start of the prompt and the first token sits at
    ``offset``; also returns the offset after the last token (where a next streamed chunk starts)."""
    tokens, offsets, tops = [], [], []
    for e in entries:
        text = decode([e.token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top: dict[str, float] = {}
        for t, lp in e.top:
            top.setdefault(decode([t]), lp)  # two ids with one string: the likelier one stands
        tops.append(top)
    shape = {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
             "text_offset": offsets}
    return shape, offset


def chat_logprobs(entries: Sequence[TokenLogprob], decode: Decode) -> dict[str, Any]:
    """``/v1/chat/completions``' shape ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}``."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


__all__ = ["IMPOSSIBLE", "TokenLogprob", "chat_logprobs", "completion_logprobs", "token_logprob"]
