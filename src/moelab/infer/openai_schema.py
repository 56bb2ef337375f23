"""OpenAI's request and error shapes: which fields a request may carry, and what an error says.

Why a list of known-but-unsupported fields: a client that sends ``tools`` or ``logit_bias`` expects
them to act; answering as if they were absent gives a plausible but wrong reply. So every field
of OpenAI's API is either supported, accepted at its neutral value (``presence_penalty: 0``,
``echo: false``, ``null`` for any of them), or refused with a 400 naming it; a field OpenAI does
not know is refused too, as OpenAI refuses it ("unrecognized request argument").

Status codes: 400 for a request the server will not serve (unsupported or unknown field, bad
combination), 422 for a value of the wrong type or out of range (pydantic's verdict). Pydantic
is imported lazily so moelab imports without the serve extra.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

MAX_SEED = 2**63 - 1
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for /v1/chat/completions `top_logprobs`

_KIND_BY_STATUS = {401: "invalid_request_error", 408: "timeout", 429: "rate_limit_error", 504: "timeout"}


class HTTPFailure(Exception):
    """One error answer: status, message, OpenAI ``type`` and the ``param`` it is about.
    ``close`` asks the server to close the connection (its body may still be arriving)."""

    def __init__(
        self, status: int, message: str, kind: str | None = None, param: str | None = None, close: bool = False
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.close = status, message, param, close
        self.kind = kind or _KIND_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, kind: str | None = None, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, the shape OpenAI answers errors in
    (``code`` is the HTTP status)."""
    failure = HTTPFailure(status, message, kind, param)
    return {"error": {"message": message, "type": failure.kind, "param": param, "code": status}}


# Known OpenAI fields this server does not implement -> the values that mean "off" (null always does).
_COMMON_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
}
COMPLETION_UNSUPPORTED = {**_COMMON_UNSUPPORTED, "best_of": (1,), "echo": (False,), "suffix": ("",)}
CHAT_UNSUPPORTED = {
    **_COMMON_UNSUPPORTED,
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
}
# fields of a message that a client echoing back an earlier reply sends as null or empty
MESSAGE_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "name": (),
    "tool_calls": ([],),
    "tool_call_id": (),
    "function_call": (),
    "refusal": (),
    "audio": (),
    "annotations": ([],),
}


def _neutral(value: Any, neutrals: tuple[Any, ...]) -> bool:
    return value is None or any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutrals)


def _without_neutral(data: dict[str, Any], table: Mapping[str, tuple[Any, ...]], where: str) -> dict[str, Any]:
    """``data`` without the table's fields that hold their neutral value; 400 for the first that does not."""
    kept = {}
    for key, value in data.items():
        if key not in table:
            kept[key] = value
        elif not _neutral(value, table[key]):
            allowed = " or ".join(json.dumps(n) for n in (None, *table[key]))
            raise HTTPFailure(400, f"{where}{key} is not supported by this server (allowed: {allowed})", param=where + key)
    return kept


@functools.cache
def request_models() -> tuple[type, type]:
    """``(CompletionRequest, ChatRequest)``: pydantic models that refuse unknown fields."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        include_usage: bool | None = None

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        model: str | None = None
        max_tokens: Annotated[int, Field(ge=0)] | None = None
        max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
        temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
        top_k: Annotated[int, Field(ge=0)] | None = None
        n: Annotated[int, Field(ge=1)] | None = None
        seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
        stop: str | list[str] | None = None
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        ignore_eos: bool = False
        user: str | None = None  # names the end user for OpenAI's abuse monitoring; no effect on the answer

    class CompletionRequest(Sampling):
        prompt: str | list[str]
        logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal["system", "user", "assistant", "developer", "tool"]
        content: str | list[dict[str, Any]]

    class ChatRequest(Sampling):
        messages: Annotated[list[Message], Field(min_length=1)]
        logprobs: bool | None = None
        top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    return CompletionRequest, ChatRequest


def parse_request(data: Any, chat: bool):
    """A validated request model from a parsed JSON body, or :class:`HTTPFailure` for the first problem."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise HTTPFailure(400, "request body must be a JSON object")
    data = _without_neutral(data, CHAT_UNSUPPORTED if chat else COMPLETION_UNSUPPORTED, "")
    if chat and isinstance(data.get("messages"), list):
        data["messages"] = [
            _without_neutral(m, MESSAGE_UNSUPPORTED, f"messages.{i}.") if isinstance(m, dict) else m
            for i, m in enumerate(data["messages"])
        ]
    completion_cls, chat_cls = request_models()
    try:
        req = (chat_cls if chat else completion_cls).model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            raise HTTPFailure(400, f"unrecognized request argument supplied: {where}", param=where) from None
        raise HTTPFailure(422, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), param=where or None) from None
    if req.stream_options is not None and not req.stream:
        raise HTTPFailure(400, "stream_options is only allowed when stream is true", param="stream_options")
    if chat and req.top_logprobs is not None and not req.logprobs:
        raise HTTPFailure(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return req


def message_text(content: str | list[dict[str, Any]], where: str) -> str:
    """A message's text: a string as is, a list of ``{"type": "text", "text": ...}`` parts joined
    by newlines. Any other part type (images, audio, files) is refused with a 400 naming it."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.{j}"
        kind = part.get("type")
        if not isinstance(kind, str):
            raise HTTPFailure(422, f"{at}.type: a content part needs a string 'type' ('text')", param=f"{at}.type")
        if kind != "text":
            raise HTTPFailure(
                400, f"{at}.type: content parts of type {kind!r} are not supported; only 'text'", param=f"{at}.type"
            )
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise HTTPFailure(400, f"unrecognized request argument supplied: {at}.{extra[0]}", param=f"{at}.{extra[0]}")
        if not isinstance(part.get("text"), str):
            raise HTTPFailure(422, f"{at}.text: a text part needs a string 'text'", param=f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(req) -> list[dict[str, str]]:
    """The request's messages as ``{"role", "content"}`` dicts of plain text, for the chat template."""
    return [
        {"role": m.role, "content": message_text(m.content, f"messages.{i}.content")} for i, m in enumerate(req.messages)
    ]


__all__ = [
    "CHAT_UNSUPPORTED",
    "COMPLETION_UNSUPPORTED",
    "MAX_COMPLETION_LOGPROBS",
    "MAX_SEED",
    "MAX_TOP_LOGPROBS",
    "MESSAGE_UNSUPPORTED",
    "HTTPFailure",
    "chat_messages",
    "error_body",
    "message_text",
    "parse_request",
    "request_models",
]
