"""Autoregressive generation: one prefill pass, then one cached decode step per token.

Batched prompts are left-padded so every row's next token sits in the last column; padding is
masked from attention (``attention_mask`` / ``past_mask``) and each row's positions start at 0
at its first real token, so a row's logits do not depend on the other rows (tested: batched
generation equals one-by-one). With a capacity factor (token dropping) MoE routing does depend
on the batch; generation is exact only for dropless models.

Sampling is per row (each row has its own :class:`SamplingParams` and its own seeded generator),
so a request gets the same tokens whichever batch it is served in.

Legend: B batch rows, P padded prompt length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from moelab.config import ConfigError
from moelab.errors import UserError
from moelab.model.kv_cache import make_cache

FINISH_REASONS = ("stop", "length", "cancelled")


class TokenizerLike(Protocol):
    """What generation needs from a tokenizer (``moelab.data.tokenizer.Tokenizer`` fits)."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "must be an integer >= 0"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100] (0 = greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0 (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"sampling.{name}={getattr(self, name)!r} is invalid: {allowed}")


@dataclass
class Completion:
    """One row's result. ``token_ids`` excludes the prompt and a final EOS; ``text`` is cut
    before a matched stop string."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# (row, text delta) for every piece of text that became final; called from the generating thread.
StreamCallback = Callable[[int, str], None]
# (row, token, logits_V) for every token added to a row's completion, with the logits row the
# sampler drew it from (the server's logprobs); called from the generating thread before on_text.
TokenCallback = Callable[[int, int, Tensor], None]


def filter_logits(logits_V: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (the token that crosses the threshold is kept), as transformers' ``TopPLogitsWarper``.
    """
    logits = logits_V.float() / max(temperature, 1e-6)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already enough
        remove_sorted[..., 0] = False  # always keep the most likely token (a top_p that rounds to 0 in fp32)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_token(logits_V: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token of one row: argmax when greedy, else a draw from the filtered distribution."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits_V))
    probs = filter_logits(logits_V.float().cpu(), params.temperature, params.top_k, params.top_p).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class RowState:
    """Decode state of one row: tokens, text emitted so far, stop handling."""

    def __init__(self, prompt_len: int, params: SamplingParams, tokenizer: TokenizerLike | None) -> None:
        self.params = params
        self.tokenizer = tokenizer
        self.out = Completion(prompt_tokens=prompt_len)
        self.done = params.max_new_tokens == 0
        self.emitted = 0
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        if params.stop and tokenizer is None:
            raise ConfigError("sampling.stop needs a tokenizer to decode text")

    def push(self, token: int) -> None:
        p, tok = self.params, self.tokenizer
        if p.stop_at_eos and tok is not None and token == tok.eos_id:
            self.finish("stop")
            return
        self.out.token_ids.append(token)
        if tok is not None:
            text = tok.decode(self.out.token_ids)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            self.out.text = text[: min(hits)] if hits else text
            if hits:
                self.finish("stop")
                return
        if len(self.out.token_ids) >= p.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.done = True
        self.out.finish_reason = reason

    def stream_delta(self) -> str:
        """Text that can no longer change: hold back a partial UTF-8 character and any suffix
        that could still grow into a stop string."""
        text = self.out.text
        end = len(text)
        if not self.done:
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
            for s in self.params.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:n]):
                        end -= n
                        break
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


def check_prompts(prompts: Sequence[Sequence[int]], cfg) -> list[int]:
    """Each prompt's length, after one clear error for an empty prompt, one longer than the
    context, or a token id outside the vocabulary (a tokenizer that does not match the model)."""
    lengths = [len(p) for p in prompts]
    for i, (n, prompt) in enumerate(zip(lengths, prompts)):
        if n == 0:
            raise UserError(f"prompt {i} is empty: generation needs at least one token (e.g. the BOS token)")
        if n > cfg.max_seq_len:
            raise UserError(f"prompt {i} has {n} tokens, more than the model's context (max_seq_len={cfg.max_seq_len})")
        bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise UserError(
                f"prompt {i} has token id {int(bad[0])}, outside the model's vocabulary of {cfg.vocab_size}: "
                "encode prompts with the checkpoint's own tokenizer"
            )
    return lengths


def require_causal(model) -> None:
    """UserError unless ``model`` is a decoder-only causal model: an encoder–decoder (a ``span``
    checkpoint, a converted T5/Switch) or a bidirectional/prefix model is refused in one line."""
    cfg = model.cfg
    if not hasattr(cfg, "attention"):  # EncoderDecoderConfig: two stacks, no single attention kind
        raise UserError(
            f"generation needs a decoder-only causal model; this one is an encoder–decoder ({type(model).__name__}): "
            "score it with `moelab eval`, or decode it in Python with its generate(input_ids, max_new_tokens, start_id)"
        )
    if cfg.attention != "causal":
        raise UserError(f"generation needs a causal model; this one has attention={cfg.attention!r}")


class Decoder(Protocol):
    """A decode backend: the model's state for ``B`` rows. ``prefill`` runs the left-padded prompts and
    returns the last column's logits ``[B, V]``; ``step`` takes one token per row ``[B, 1]`` and returns the
    next logits. :class:`ModuleDecoder` (the model's forward with a KV cache: the reference) and
    :class:`moelab.infer.fast_decode.FastDecoder` (packed weights, native fused blocks) are the two; every
    caller samples through the one loop of :func:`generate`."""

    def prefill(self, ids_BP: Tensor, mask_BP: Tensor) -> Tensor: ...

    def step(self, tokens_B1: Tensor) -> Tensor: ...


# (model, rows B, positions to hold M) → a Decoder for them
DecoderFactory = Callable[[Any, int, int], Decoder]


class ModuleDecoder:
    """The model's own forward with a KV cache (``static``: preallocated, or ``dynamic``: growing); both exact.
    Positions start at 0 at each row's first real token; padding is masked from attention."""

    def __init__(self, model, batch: int, max_len: int, cache: str = "static") -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.kv = make_cache(cache, model, batch, max_len)
        self.mask_BL: Tensor | None = None
        self.next_pos_B1: Tensor | None = None

    def prefill(self, ids_BP: Tensor, mask_BP: Tensor) -> Tensor:
        pos_BP = (mask_BP.cumsum(1) - 1).clamp(min=0)
        logits = self.model(ids_BP, attention_mask=mask_BP, position_ids=pos_BP, cache=self.kv).logits[:, -1]
        self.mask_BL, self.next_pos_B1 = mask_BP, pos_BP[:, -1:] + 1
        return logits

    def step(self, tokens_B1: Tensor) -> Tensor:
        assert self.mask_BL is not None and self.next_pos_B1 is not None, "prefill first"
        step_mask = torch.ones(tokens_B1.shape[0], 1, dtype=torch.long, device=self.device)
        logits = self.model(
            tokens_B1, attention_mask=step_mask, position_ids=self.next_pos_B1, cache=self.kv, past_mask=self.mask_BL
        ).logits[:, -1]
        self.mask_BL = torch.cat([self.mask_BL, step_mask], dim=1)
        self.next_pos_B1 = self.next_pos_B1 + 1
        return logits


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    tokenizer: TokenizerLike | None = None,
    on_text: StreamCallback | None = None,
    cache: str = "static",
    should_cancel: Callable[[int], bool] | None = None,
    on_token: TokenCallback | None = None,
    decoder: DecoderFactory | None = None,
) -> list[Completion]:
    """Generate a continuation of every prompt (token ids) in one batch.

    Args:
        model: a causal :class:`moelab.model.transformer.Transformer` (eval mode is set here).
        prompts: B lists of token ids, each non-empty.
        params: one :class:`SamplingParams` for all rows, or one per row.
        tokenizer: needed for ``text``, stop strings, EOS and streaming.
        on_text: streaming callback ``(row, delta)``.
        cache: ``static`` (preallocated) or ``dynamic`` KV cache; both are exact. MLA models
            get latent caches (the compressed KV latent and the RoPE key, see ``kv_cache``).
        should_cancel: ``row -> bool`` polled every step (server timeouts); a cancelled row
            finishes with ``finish_reason="cancelled"``.
        on_token: ``(row, token, logits_V)`` for every token kept in a completion (not a final
            EOS), with the logits it was sampled from; it does not change what is generated.
        decoder: the backend, ``(model, B, max_len) -> Decoder``; default :class:`ModuleDecoder` with
            ``cache`` (``moelab.infer.fast_decode.fast_generate`` passes its ``FastDecoder``).
    """
    require_causal(model)
    cfg = model.cfg
    B = len(prompts)
    if B == 0:
        return []
    per_row = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != B:
        raise ValueError(f"got {len(per_row)} SamplingParams for {B} prompts")
    lengths = check_prompts(prompts, cfg)
    model.eval()
    device = next(model.parameters()).device
    rows = [RowState(n, p, tokenizer) for n, p in zip(lengths, per_row)]
    budget = [min(p.max_new_tokens, cfg.max_seq_len - n) for n, p in zip(lengths, per_row)]
    steps = max(budget)

    P = max(lengths)
    pad = 0 if tokenizer is None else tokenizer.pad_id
    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, P - lengths[b] :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[b, P - lengths[b] :] = 1
    dec = (decoder or (lambda m, b, n: ModuleDecoder(m, b, n, cache)))(model, B, P + steps)
    logits_BV = dec.prefill(ids.to(device), mask.to(device))

    for _ in range(steps):
        logits_cpu = logits_BV.float().cpu()
        tokens = torch.full((B, 1), pad, dtype=torch.long)
        for b, row in enumerate(rows):
            if row.done:
                continue
            if should_cancel is not None and should_cancel(b):
                row.finish("cancelled")
                continue
            token = sample_token(logits_cpu[b], row.params, row.generator)
            tokens[b, 0] = token
            kept = len(row.out.token_ids)
            row.push(token)
            if on_token is not None and len(row.out.token_ids) > kept:
                on_token(b, token, logits_cpu[b])
            if not row.done and len(row.out.token_ids) >= budget[b]:
                row.finish("length")
            if on_text is not None:
                delta = row.stream_delta()
                if delta:
                    on_text(b, delta)
        if all(r.done for r in rows):
            break
        logits_BV = dec.step(tokens.to(device))
    for b, row in enumerate(rows):
        if not row.done:
            row.finish("length")
        if on_text is not None:
            delta = row.stream_delta()
            if delta:
                on_text(b, delta)
    return [r.out for r in rows]


def generate_text(
    model,
    tokenizer: TokenizerLike,
    prompts: Sequence[str],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    on_text: StreamCallback | None = None,
    cache: str = "static",
) -> list[Completion]:
    """:func:`generate` on text prompts; an empty prompt starts from the BOS token."""
    ids = [tokenizer.encode(p) or [tokenizer.bos_id] for p in prompts]
    return generate(model, ids, params, tokenizer, on_text, cache)


__all__ = [
    "Completion",
    "Decoder",
    "DecoderFactory",
    "ModuleDecoder",
    "SamplingParams",
    "StreamCallback",
    "TokenCallback",
    "TokenizerLike",
    "filter_logits",
    "generate",
    "generate_text",
    "require_causal",
    "sample_token",
]
