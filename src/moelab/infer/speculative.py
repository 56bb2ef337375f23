"""Speculative decoding (greedy): a cheap draft proposes k tokens, the model verifies them in one pass.

Why: at batch 1 a decode step reads every active weight for one token, so it is bound by memory
bandwidth, not arithmetic. A pass over ``1 + k`` tokens reads the same weights once (for an MoE, the
union of the experts those tokens chose), so each draft token the model agrees with is a token
gained for little more than one step's bytes (Leviathan et al. 2023; Chen et al. 2023).

Greedy verification: the model's argmax after each prefix of ``[pending, d1..dk]`` is compared with
the next draft token; the longest agreeing prefix ``d1..dm`` is kept, then the model's own token
after it (so every pass yields ``m + 1 ≥ 1`` tokens), and the keys/values of the rejected draft
tokens are cut from the cache (:meth:`moelab.model.kv_cache.KVCache.truncate`). The output is plain
greedy decoding's token for token, as long as no argmax sits on a near-tie that the different
matmul shapes of a multi-token pass round the other way (tested equal on tiny models, fp32).

Drafts (:class:`Draft`):

- :class:`PromptLookupDraft` (Saxena 2023, "prompt lookup decoding"): the tokens that followed the
  most recent earlier occurrence of the context's last n-gram (longest n first). No model, no
  memory; it wins where output repeats input (code edits, quoting, summaries of the prompt).
- :class:`ModelDraft`: a smaller causal model with the same vocabulary (the MoE's dense twin, or
  any small model) decodes k tokens greedily from its own KV cache, kept in step with the context.

Requirements, checked with one clear error: a causal model, batch 1, greedy sampling, and routing
that treats each token alone (dropless token-choice routers): with a capacity factor or expert-choice
routing a token's experts depend on the other tokens of the pass, so the verify pass would route
differently from one-token steps.

Legend: S tokens fed in one pass, V vocab, k draft tokens per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor

from moelab.errors import UserError
from moelab.infer.generate import (
    Completion,
    RowState,
    SamplingParams,
    StreamCallback,
    TokenizerLike,
    check_prompts,
    require_causal,
)
from moelab.model.kv_cache import make_cache


class Draft(Protocol):
    """Proposes up to ``k`` tokens that may follow ``context`` (all tokens so far, prompt included)."""

    def propose(self, context: Sequence[int], k: int) -> list[int]: ...


@dataclass(frozen=True)
class PromptLookupDraft:
    """Copy what followed the last earlier occurrence of the context's final n-gram.

    ``max_ngram`` down to ``min_ngram`` tokens are tried (a longer match is more likely to continue
    the same way); the most recent occurrence wins. Costs a scan of the context per pass: nothing
    next to a model's pass at the context lengths moelab serves."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise UserError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                f"max_ngram={self.max_ngram}"
            )

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = list(context)
        L = len(ctx)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = ctx[L - n :]
            for start in range(L - n - 1, -1, -1):  # most recent first; never the tail itself
                if ctx[start : start + n] == tail:
                    return ctx[start + n : start + n + k]
        return []


class CachedModel:
    """A causal model and its KV cache at batch 1, with the tokens the cache holds.

    ``feed`` appends tokens and returns their logits; ``rollback`` forgets every token after the
    first ``n``. Positions are 0, 1, … from the first token (no padding at batch 1)."""

    def __init__(self, model, max_len: int, cache: str = "static") -> None:
        require_causal(model)
        self.model = model.eval()
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.kv = make_cache(cache, model, 1, max_len)
        self.tokens: list[int] = []

    @torch.no_grad()
    def feed(self, new: Sequence[int]) -> Tensor:
        """Logits ``[S, V]`` (fp32, CPU) after each of the ``S`` new tokens."""
        filled, end = len(self.tokens), len(self.tokens) + len(new)
        if end > self.max_len:
            raise ValueError(f"{end} positions needed, {self.max_len} allocated")
        ids = torch.tensor([list(new)], dtype=torch.long, device=self.device)
        pos = torch.arange(filled, end, device=self.device).unsqueeze(0)
        past = None if filled == 0 else torch.ones(1, filled, dtype=torch.long, device=self.device)
        logits = self.model(ids, position_ids=pos, cache=self.kv, past_mask=past).logits[0]
        self.tokens.extend(new)
        return logits.float().cpu()

    def rollback(self, n: int) -> None:
        self.kv.truncate(n)
        del self.tokens[n:]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ModelDraft:
    """A small causal model drafting greedily from its own cache, kept in step with the context:
    each ``propose`` cuts the cache back to where it agrees with the context, feeds the rest in one
    pass, then decodes ``k`` tokens one at a time."""

    def __init__(self, model, cache: str = "static") -> None:
        self.lm = CachedModel(model, model.cfg.max_seq_len, cache)
        self.vocab_size = model.cfg.vocab_size

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = list(context)
        k = min(k, self.lm.max_len - len(ctx) + 1)  # the last draft token is never fed
        if k <= 0 or not ctx:
            return []
        keep = min(_common_prefix(self.lm.tokens, ctx), len(ctx) - 1)  # the last token is fed again for its logits
        self.lm.rollback(keep)
        logits = self.lm.feed(ctx[keep:])[-1]
        out: list[int] = []
        while True:
            out.append(int(torch.argmax(logits)))
            if len(out) == k:
                return out
            logits = self.lm.feed(out[-1:])[-1]


@dataclass
class SpeculativeStats:
    """What the draft bought: ``accepted / drafted`` is the acceptance rate; ``tokens / passes`` the
    tokens each pass of the model yields (1 without speculation)."""

    passes: int = 0  # passes of the verified model, the prefill included (plain decoding: one per token)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the model agreed with (kept)
    tokens: int = 0  # tokens generated (completion plus a final EOS)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "tokens_per_pass": self.tokens_per_pass}


def require_token_independent_routing(model) -> None:
    """One clear error when a token's experts can depend on the other tokens of a pass."""
    for i, layer in enumerate(getattr(model, "moe_layers", [])):
        c = layer.cfg
        if layer.router.manages_capacity:
            raise UserError(
                f"speculative decoding needs routing that treats each token alone; MoE layer {i} uses "
                f"{type(layer.router).__name__}, which chooses tokens across the pass: decode without a draft"
            )
        if c.capacity_factor is not None or c.expert_capacity is not None:
            raise UserError(
                f"speculative decoding needs dropless routing; MoE layer {i} has a capacity "
                f"(capacity_factor={c.capacity_factor}, expert_capacity={c.expert_capacity}), so a token's "
                "experts depend on the others in the pass: set moe.capacity_factor to null for inference"
            )


def speculative_generate(
    model,
    prompt: Sequence[int],
    draft: Draft,
    params: SamplingParams | None = None,
    draft_tokens: int = 4,
    tokenizer: TokenizerLike | None = None,
    on_text: StreamCallback | None = None,
    cache: str = "static",
) -> tuple[Completion, SpeculativeStats]:
    """Greedy decoding of one prompt with a draft; the completion equals :func:`moelab.infer.generate`'s.

    Args:
        model: a causal, dropless :class:`moelab.model.transformer.Transformer`.
        prompt: token ids (non-empty).
        draft: a :class:`Draft` (:class:`PromptLookupDraft`, :class:`ModelDraft`).
        params: greedy (``temperature=0``; default ``SamplingParams()``); ``max_new_tokens``, ``stop`` and EOS
            apply as in ``generate``.
        draft_tokens: k, draft tokens verified per pass (≥ 1).
        on_text: streaming callback ``(0, delta)``.
    """
    require_causal(model)
    require_token_independent_routing(model)
    params = params or SamplingParams()
    if params.temperature != 0.0:
        raise UserError(
            f"speculative decoding here is greedy: temperature={params.temperature} given; use temperature 0, "
            "or decode without a draft to sample"
        )
    if not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise UserError(f"draft_tokens={draft_tokens!r} is invalid: give an integer >= 1")
    vocab = getattr(draft, "vocab_size", None)
    if vocab is not None and vocab != model.cfg.vocab_size:
        raise UserError(
            f"the draft model's vocabulary ({vocab}) differs from the model's ({model.cfg.vocab_size}): "
            "a draft must share the tokenizer"
        )
    (n,) = check_prompts([prompt], model.cfg)
    row = RowState(n, params, tokenizer)
    stats = SpeculativeStats()
    budget = min(params.max_new_tokens, model.cfg.max_seq_len - n)
    target = CachedModel(model, n + budget, cache)

    def emit(tokens: Sequence[int]) -> None:
        for t in tokens:
            if row.done:
                return
            row.push(t)
            stats.tokens += 1
            if not row.done and len(row.out.token_ids) >= budget:
                row.finish("length")
            if on_text is not None and (delta := row.stream_delta()):
                on_text(0, delta)

    context = list(prompt)
    if budget <= 0:
        row.finish("length")
    else:
        pending = int(torch.argmax(target.feed(context)[-1]))  # the prefill
        stats.passes += 1
        context.append(pending)
        emit([pending])
    while not row.done:
        # room: the pass feeds pending + k tokens; at most budget - generated tokens are still wanted
        left = budget - len(context) + n
        k = max(0, min(draft_tokens, left - 1, target.max_len - len(target.tokens) - 1))
        proposal = list(draft.propose(context, k))[:k] if k else []
        logits = target.feed([context[-1], *proposal])
        stats.passes += 1
        stats.drafted += len(proposal)
        chosen = torch.argmax(logits, dim=-1).tolist()  # the model's token after each fed prefix
        m = 0
        while m < len(proposal) and proposal[m] == chosen[m]:
            m += 1
        stats.accepted += m
        target.rollback(len(context) + m)  # keep pending and the accepted draft tokens
        new = [*proposal[:m], chosen[m]]
        context.extend(new)
        emit(new)
    if on_text is not None and (delta := row.stream_delta()):
        on_text(0, delta)
    return row.out, stats
