"""Server-sent events for ``stream: true``: the chunks OpenAI sends, in its order.

One chunk per text delta; a chunk with ``finish_reason`` per row; with
``stream_options.include_usage`` a last chunk with ``"choices": []`` and the usage (every other
chunk then carries ``"usage": null``, as OpenAI's do); then ``data: [DONE]``. With logprobs each
chunk carries the logprobs of the tokens sampled since the previous chunk of its row, so the
stream's logprobs put together equal the non-streaming answer's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from moelab.infer.engine import Engine
from moelab.infer.logprobs import Decode, TokenLogprob, chat_logprobs, completion_logprobs
from moelab.infer.openai_schema import HTTPFailure
from moelab.infer.server_jobs import Row, Submission, finish, log_gone, usage


@dataclass(frozen=True)
class StreamRequest:
    """What one streamed answer needs to know about its request."""

    ident: str
    model: str
    chat: bool
    rows: list[Row]
    logprobs: int | None  # None: off
    include_usage: bool
    scope: dict[str, Any]  # the ASGI scope, for the disconnect log line


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _error_event(exc: HTTPFailure) -> str:
    return _event({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}})


async def sse(engine: Engine, decode: Decode, req: StreamRequest, release: Callable[[], None]) -> AsyncIterator[str]:
    """The events of one streamed answer; cancels its jobs and calls ``release`` however it ends."""
    events: asyncio.Queue = asyncio.Queue()
    now = int(time.time())
    pending: list[list[TokenLogprob]] = [[] for _ in req.rows]
    offsets = [len(r.prompt) for r in req.rows]
    obj = "chat.completion.chunk" if req.chat else "text_completion"

    def chunk(row: int, text: str | None, reason: str | None, first: bool = False) -> str:
        lp = None
        if req.logprobs is not None and not first:
            entries, pending[row] = pending[row], []
            if req.chat:
                lp = chat_logprobs(entries, decode)
            else:
                lp, offsets[row] = completion_logprobs(entries, decode, offsets[row])
        if req.chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": row, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": row, "text": text or "", "logprobs": lp, "finish_reason": reason}
        body: dict[str, Any] = {"id": req.ident, "object": obj, "created": now, "model": req.model, "choices": [choice]}
        if req.include_usage:
            body["usage"] = None
        return _event(body)

    sub: Submission | None = None
    try:
        sub = Submission(engine, req.rows, req.logprobs, events)
        if req.chat:
            yield chunk(0, None, None, first=True)
        results = []
        open_rows = len(req.rows)
        while open_rows:
            try:
                row, kind, value = await asyncio.wait_for(events.get(), timeout=sub.remaining() + 1.0)
            except asyncio.TimeoutError:
                yield _error_event(sub.timeout())
                break
            if kind == "token":
                pending[row].append(value)
            elif kind == "text":
                yield chunk(row, value, None)
            else:
                open_rows -= 1
                try:
                    result = sub.check(sub.futures[row].result())
                except HTTPFailure as exc:
                    yield _error_event(exc)
                    continue
                results.append(result)
                yield chunk(row, None, finish(result))
        else:
            if req.include_usage:
                yield _event({"id": req.ident, "object": obj, "created": now, "model": req.model, "choices": [],
                              "usage": usage(results)})
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: the response was cancelled
        log_gone(req.scope, "during its stream; its rows were cancelled")
        raise
    finally:
        if sub is not None:
            sub.cancel()  # frees the rows of a client that went away
        release()


__all__ = ["StreamRequest", "sse"]
