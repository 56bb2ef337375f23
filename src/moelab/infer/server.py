"""An OpenAI-compatible HTTP server (FastAPI + uvicorn, the ``serve`` extra).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
as server-sent events), ``GET /v1/models``, ``GET /health``.

One worker thread owns the model; requests wait in a queue and are batched (up to
``max_batch`` rows that arrive within ``batch_wait_s``) into one :func:`generate` call, each row
with its own sampling parameters and seed. Limits, all in :class:`ServerLimits`, answer:
413 body too large; 400 malformed JSON, prompt + max_tokens beyond the context, bad values;
422 wrong types; 429 more requests in flight than ``max_pending``; 504 past ``timeout_s``.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at
runtime (``request: Request`` is imported inside :func:`create_app`).
"""

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from moelab.config import ConfigError
from moelab.errors import UserError
from moelab.infer.chat import ChatTemplate
from moelab.infer.engine import Engine, Job, ServerLimits
from moelab.infer.generate import Completion, SamplingParams

MAX_SEED = 2**63 - 1


# ----------------------------------------------------------------------------- request bodies


def _models():
    """Pydantic request models, built lazily so moelab imports without the serve extra."""
    from pydantic import BaseModel, ConfigDict, Field

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
        model: str | None = None
        max_tokens: Annotated[int, Field(ge=0)] | None = None
        max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
        temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
        top_k: Annotated[int, Field(ge=0)] | None = None
        n: Annotated[int, Field(ge=1)] | None = None
        seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
        stop: str | list[str] | None = None
        stream: bool = False
        ignore_eos: bool = False

    class CompletionRequest(Sampling):
        prompt: str | list[str]

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "user", "assistant", "developer", "tool"]
        content: str

    class ChatRequest(Sampling):
        messages: Annotated[list[Message], Field(min_length=1)]

    return CompletionRequest, ChatRequest


class _Once:
    """Call ``fn`` the first time only (a slot released by whichever of two paths runs first)."""

    def __init__(self, fn) -> None:
        self.fn, self.done, self.lock = fn, False, threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        self.fn()


class HTTPFailure(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


# ----------------------------------------------------------------------------- the app


def create_app(engine: Engine, model_name: str = "moelab", chat_template: ChatTemplate | None = None):
    """The FastAPI application serving ``engine``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.background import BackgroundTask

    CompletionRequest, ChatRequest = _models()
    template = chat_template or ChatTemplate()
    limits, tok = engine.limits, engine.tokenizer
    app = FastAPI(title="moelab", docs_url=None, redoc_url=None)
    app.state.engine = engine
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise HTTPFailure(413, f"request body is {declared} bytes; the limit is {limits.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise HTTPFailure(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPFailure(400, f"request body is not valid JSON: {exc}") from None

    def validate(cls, data: Any):
        if not isinstance(data, dict):
            raise HTTPFailure(400, "request body must be a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise HTTPFailure(422, f"{where}: {first.get('msg')}", param=where or None) from None

    def sampling(req, prompt_len: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        if req.n not in (None, 1):
            raise HTTPFailure(400, "n > 1 is not supported: send one request per completion", param="n")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > limits.max_stop:
            raise HTTPFailure(400, f"at most {limits.max_stop} stop strings are allowed", param="stop")
        if any(not s for s in stop):
            raise HTTPFailure(400, "stop strings must not be empty", param="stop")
        room = engine.context - prompt_len
        asked = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if room <= 0 or (asked is not None and asked > room):
            raise HTTPFailure(
                400,
                f"this model's maximum context length is {engine.context} tokens; you requested "
                f"{prompt_len + (asked or 0)} ({prompt_len} in the prompt + {asked or 0} max_tokens)",
                param="max_tokens",
            )
        try:
            return SamplingParams(
                max_new_tokens=min(limits.default_max_tokens, room) if asked is None else asked,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=req.top_k or 0,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed,
                stop=stop + extra_stop,
                stop_at_eos=not req.ignore_eos,
            )
        except ConfigError as exc:
            raise HTTPFailure(400, str(exc)) from None

    def encode(text: str) -> list[int]:
        return tok.encode(text) or [tok.bos_id]

    def usage(results: list[Completion]) -> dict[str, int]:
        p = sum(r.prompt_tokens for r in results)
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def finish(r: Completion) -> str:
        return "length" if r.finish_reason == "length" else "stop"

    async def run_jobs(rows: list[tuple[list[int], SamplingParams]], stream_queue: asyncio.Queue | None):
        """Submit rows; returns their futures (and streams deltas as (row, text) into the queue)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + limits.timeout_s
        futures, jobs = [], []
        for row, (ids, params) in enumerate(rows):
            fut = loop.create_future()

            def done(result, fut=fut, row=row) -> None:
                def settle() -> None:
                    if not fut.done():
                        fut.set_result(result)
                    if stream_queue is not None:
                        stream_queue.put_nowait((row, None))

                with contextlib.suppress(RuntimeError):  # the event loop closed (server shutting down)
                    loop.call_soon_threadsafe(settle)

            on_text = None
            if stream_queue is not None:
                def on_text(delta: str, row=row) -> None:
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(stream_queue.put_nowait, (row, delta))

            job = Job(ids, params, deadline, on_text, done)
            jobs.append(job)
            futures.append(fut)
            engine.submit(job)
        return jobs, futures, deadline

    def check(result) -> Completion:
        if isinstance(result, Exception):
            if isinstance(result, (UserError, ConfigError)):
                raise HTTPFailure(400, str(result))
            raise HTTPFailure(500, f"generation failed: {type(result).__name__}: {result}", "server_error")
        if result.finish_reason == "cancelled":
            raise HTTPFailure(504, f"the request took longer than the server's timeout of {limits.timeout_s:g} s", "timeout")
        return result

    async def serve(request: Request, chat: bool):
        if not engine.admit():
            return error(429, f"too many requests in flight (limit {limits.max_pending}); retry later", "rate_limit_error")
        streaming = False
        try:
            data = await read_json(request)
            req = validate(ChatRequest if chat else CompletionRequest, data)
            if chat:
                text = template.render([m.model_dump() for m in req.messages])
                prompts, extra = [text], template.stop
            else:
                prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
                if not 1 <= len(prompts) <= limits.max_batch:
                    raise HTTPFailure(400, f"prompt lists must hold 1 to {limits.max_batch} prompts", param="prompt")
                extra = ()
            rows = []
            for p in prompts:
                ids = encode(p)
                rows.append((ids, sampling(req, len(ids), extra)))
            ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            name = req.model or model_name
            if req.stream:
                streaming = True
                release = _Once(engine.release)
                # released when the stream ends, or after the response if the client left before it began
                return StreamingResponse(
                    sse(ident, name, rows, chat, release), media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"}, background=BackgroundTask(release),
                )
            jobs, futures, deadline = await run_jobs(rows, None)
            try:
                results = await asyncio.wait_for(asyncio.gather(*futures), timeout=max(0.0, deadline - time.monotonic()) + 1.0)
            except asyncio.TimeoutError:
                for j in jobs:
                    j.cancelled.set()
                raise HTTPFailure(504, f"the request took longer than the server's timeout of {limits.timeout_s:g} s", "timeout") from None
            results = [check(r) for r in results]
            if chat:
                choices = [{"index": 0, "message": {"role": "assistant", "content": results[0].text},
                            "finish_reason": finish(results[0]), "logprobs": None}]
                obj = "chat.completion"
            else:
                choices = [{"index": i, "text": r.text, "finish_reason": finish(r), "logprobs": None}
                           for i, r in enumerate(results)]
                obj = "text_completion"
            return {"id": ident, "object": obj, "created": int(time.time()), "model": name,
                    "choices": choices, "usage": usage(results)}
        except HTTPFailure as exc:
            return error(exc.status, exc.message, exc.kind, exc.param)
        finally:
            if not streaming:
                engine.release()

    async def sse(ident: str, name: str, rows, chat: bool, release) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text delta, a final chunk per row, then [DONE]."""
        stream_queue: asyncio.Queue = asyncio.Queue()
        jobs: list[Job] = []
        now = int(time.time())

        def chunk(row: int, text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, str] = {"role": "assistant"} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": row, "delta": delta, "finish_reason": reason, "logprobs": None}
                body = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": name, "choices": [choice]}
            else:
                choice = {"index": row, "text": text or "", "finish_reason": reason, "logprobs": None}
                body = {"id": ident, "object": "text_completion", "created": now, "model": name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            jobs, futures, deadline = await run_jobs(rows, stream_queue)
            if chat:
                yield chunk(0, None, None, first=True)
            open_rows = len(rows)
            while open_rows:
                try:
                    row, delta = await asyncio.wait_for(stream_queue.get(), timeout=max(0.0, deadline - time.monotonic()) + 1.0)
                except asyncio.TimeoutError:
                    for j in jobs:
                        j.cancelled.set()
                    yield "data: " + json.dumps({"error": {"message": "timeout", "type": "timeout", "code": 504}}) + "\n\n"
                    break
                if delta is not None:
                    yield chunk(row, delta, None)
                    continue
                open_rows -= 1
                result = futures[row].result()
                try:
                    result = check(result)
                except HTTPFailure as exc:
                    yield "data: " + json.dumps({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}}) + "\n\n"
                    continue
                yield chunk(row, None, finish(result))
            yield "data: [DONE]\n\n"
        finally:
            for j in jobs:  # a client that went away frees its rows
                j.cancelled.set()
            release()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "moelab",
                                            "context_length": engine.context}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": engine.in_flight, "batches": engine.batches}

    return app


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["Engine", "Job", "ServerLimits", "create_app", "serve_forever"]
