"""An OpenAI-compatible HTTP server (FastAPI + uvicorn, the ``serve`` extra).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
as server-sent events), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.

One worker thread owns the model (:class:`Engine`); requests wait in a queue and are batched.
A generation request passes these gates in order, each answering one error in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` (so do FastAPI's own 404/405/422 and any 500):

1. the API key, when the server has one: 401, before anything is read;
2. the body, read within ``body_timeout_s`` (408, connection closed) and at most
   ``max_body_bytes`` (413); a client leaving mid-body is logged in one line;
3. JSON nesting at most ``max_json_depth`` (400), checked before parsing; malformed JSON 400;
4. fields: unknown or unsupported 400 naming the field, wrong types 422, an unknown model 404,
   prompt + max_tokens beyond the context 400;
5. admission: an in-flight slot is taken only now (429 past ``max_pending``), so a client that
   never finishes its body holds no slot;
6. generation: 504 past ``timeout_s``; a client that disconnects has its rows cancelled in the
   engine (the worker stops sampling them), logged in one line.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at
runtime (``request: Request`` is imported inside :func:`create_app`).
"""

import asyncio
import json
import re
import threading
import time
import uuid
from typing import Any

from moelab.config import ConfigError
from moelab.errors import UserError
from moelab.infer.chat import ChatTemplate
from moelab.infer.engine import Engine, Job
from moelab.infer.generate import SamplingParams
from moelab.infer.logprobs import chat_logprobs, completion_logprobs
from moelab.infer.openai_schema import HTTPFailure, chat_messages, error_body, parse_request
from moelab.infer.server_auth import RequireAPIKey, check_api_key
from moelab.infer.server_jobs import ClientGone, Row, Submission, finish, log_gone, usage
from moelab.infer.server_limits import ServerLimits, json_too_deep
from moelab.infer.server_stream import StreamRequest, sse

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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


async def read_body(request, limits: ServerLimits) -> bytes:
    """The whole body within ``limits.body_timeout_s`` and ``limits.max_body_bytes``.

    The timeout covers the whole body, not each read, so a client trickling one byte a second
    cannot hold a connection open for longer. Raises :class:`ClientGone` if the client leaves.
    """
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise HTTPFailure(413, f"request body is {declared} bytes; the limit is {limits.max_body_bytes}", close=True)

    async def collect() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise HTTPFailure(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes", close=True)
        return bytes(body)

    try:
        return await asyncio.wait_for(collect(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPFailure(
            408, f"the request body did not arrive within the server's body timeout of {limits.body_timeout_s:g} s",
            close=True,
        ) from None
    except ClientDisconnect:
        raise ClientGone from None


def parse_json(body: bytes, limits: ServerLimits) -> Any:
    """The parsed body, after the nesting check that keeps the parser from recursing too deep."""
    if json_too_deep(body, limits.max_json_depth):
        raise HTTPFailure(400, f"request body nests arrays/objects deeper than the limit of {limits.max_json_depth} levels")
    try:
        data = json.loads(body)
    except ValueError as exc:  # bad syntax, bad UTF-8, an integer past Python's digit limit
        raise HTTPFailure(400, f"request body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(body):  # "\ud800" alone is valid JSON but no text: refuse it here, once
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPFailure(400, "request body holds a lone UTF-16 surrogate escape (such as \\ud800); "
                                   "strings must be valid Unicode") from None
    return data


# ----------------------------------------------------------------------------- the app


def create_app(
    engine: Engine, model_name: str = "moelab", chat_template: ChatTemplate | None = None, api_key: str | None = None
):
    """The FastAPI application serving ``engine`` as ``model_name``; with ``api_key``, every
    request but ``GET /health`` must carry ``Authorization: Bearer <api_key>``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    template = chat_template or ChatTemplate()
    limits, tok = engine.limits, engine.tokenizer
    app = FastAPI(title="moelab", docs_url=None, redoc_url=None)
    app.state.engine = engine
    if api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=check_api_key(api_key))
    created = int(time.time())

    def error(exc: HTTPFailure, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**(headers or {}), **({"Connection": "close"} if exc.close else {})}
        return JSONResponse(error_body(exc.status, exc.message, exc.kind, exc.param), exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        where = f"{request.method} {request.url.path}"
        message = {404: f"no such endpoint: {where}",
                   405: f"method not allowed: {where} (allowed: {(exc.headers or {}).get('Allow', 'none')})"}
        return error(HTTPFailure(exc.status_code, message.get(exc.status_code, str(exc.detail))), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(HTTPFailure(422, f"{where}: {first.get('msg', 'invalid request')}", param=where or None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug: uvicorn still logs its traceback
        return error(HTTPFailure(500, f"internal server error: {type(exc).__name__}"))

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

    def rows_of(req, chat: bool) -> list[Row]:
        if chat:
            try:
                prompts, extra = [template.render(chat_messages(req))], template.stop
            except UserError as exc:  # the checkpoint's template refused these messages
                raise HTTPFailure(400, str(exc), param="messages") from None
        else:
            prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            if not 1 <= len(prompts) <= limits.max_batch:
                raise HTTPFailure(400, f"prompt lists must hold 1 to {limits.max_batch} prompts", param="prompt")
            extra = ()
        rows = []
        for p in prompts:
            ids = tok.encode(p) or [tok.bos_id]
            rows.append(Row(p, ids, sampling(req, len(ids), extra)))
        return rows

    def top_n(req, chat: bool) -> int | None:
        """How many alternatives each token reports; None when the request wants no logprobs."""
        if chat:
            return (req.top_logprobs or 0) if req.logprobs else None
        return req.logprobs

    def answer(req, chat: bool, ident: str, rows: list[Row], results, logprobs, want: int | None) -> dict[str, Any]:
        choices = []
        for i, (row, r) in enumerate(zip(rows, results)):
            if chat:
                lp = chat_logprobs(logprobs[i], tok.decode) if want is not None else None
                choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                                "logprobs": lp, "finish_reason": finish(r)})
            else:
                lp = completion_logprobs(logprobs[i], tok.decode, len(row.prompt))[0] if want is not None else None
                choices.append({"index": i, "text": r.text, "logprobs": lp, "finish_reason": finish(r)})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": req.model or model_name, "choices": choices, "usage": usage(results)}

    async def serve(request: Request, chat: bool):
        try:
            req = parse_request(parse_json(await read_body(request, limits), limits), chat)
            if req.model is not None and req.model != model_name:
                raise HTTPFailure(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                                  param="model")
            rows, want = rows_of(req, chat), top_n(req, chat)
        except HTTPFailure as exc:
            return error(exc)
        except ClientGone:
            log_gone(request.scope, "while sending its body")
            return Response(status_code=400)  # never delivered: the connection is gone
        if not engine.admit():
            return error(HTTPFailure(429, f"too many requests in flight (limit {limits.max_pending}); retry later"))
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            release = _Once(engine.release)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = StreamRequest(ident, req.model or model_name, chat, rows, want, include_usage, request.scope)
            # released when the stream ends, or after the response if the client left before it began
            return StreamingResponse(sse(engine, tok.decode, stream, release), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(release))
        try:
            sub = Submission(engine, rows, want, None)
            results = await sub.results(request.receive)
            return answer(req, chat, ident, rows, results, sub.logprobs, want)
        except HTTPFailure as exc:
            return error(exc)
        except ClientGone:
            log_gone(request.scope, "while its answer was generated; its rows were cancelled")
            return Response(status_code=400)
        finally:
            engine.release()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "moelab",
                "context_length": engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return error(HTTPFailure(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                                     param="model"))
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": engine.in_flight, "batches": engine.batches}

    return app


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted; the ``moelab.serve`` log lines (disconnects)
    go to uvicorn's console handler."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["moelab.serve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=log_config)


__all__ = ["Engine", "Job", "ServerLimits", "create_app", "read_body", "serve_forever"]
