"""One HTTP request's rows in the engine: submit them, collect their results and logprobs, and
cancel them when the client leaves or the deadline passes.

Why a separate object: both answers (one JSON body, or a stream of events) need the same
bookkeeping, and both must cancel the engine's jobs on every way out, so the work of a client that
is gone stops instead of running to its last token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from moelab.config import ConfigError
from moelab.errors import UserError
from moelab.infer.engine import Engine, Job
from moelab.infer.generate import Completion, SamplingParams
from moelab.infer.logprobs import TokenLogprob
from moelab.infer.openai_schema import HTTPFailure

log = logging.getLogger("moelab.serve")


@dataclass(frozen=True)
class Row:
    """One prompt of a request: its text, token ids and sampling parameters."""

    prompt: str
    ids: list[int]
    params: SamplingParams


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def log_gone(scope: dict[str, Any], when: str) -> None:
    """The one log line a disconnect gets (no traceback: a client leaving is not a server error)."""
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "a client"
    log.info("%s went away %s (%s %s)", who, when, scope.get("method"), scope.get("path"))


class Submission:
    """The engine jobs of one request. ``events`` (streaming only) receives ``(row, kind, value)``
    tuples in order: ``("token", TokenLogprob)``, ``("text", delta)`` and finally ``("done", None)``."""

    def __init__(self, engine: Engine, rows: list[Row], logprobs: int | None, events: asyncio.Queue | None) -> None:
        loop = asyncio.get_running_loop()
        self.timeout_s = engine.limits.timeout_s
        self.deadline = time.monotonic() + self.timeout_s
        self.jobs: list[Job] = []
        self.futures: list[asyncio.Future] = []
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in rows]

        def post(*event) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed (server shutting down)
                loop.call_soon_threadsafe(events.put_nowait, event)

        for i, row in enumerate(rows):
            fut = loop.create_future()

            def done(result, fut=fut, i=i) -> None:
                def settle() -> None:
                    if not fut.done():
                        fut.set_result(result)

                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle)
                if events is not None:
                    post(i, "done", None)

            on_text = on_token = None
            if events is not None:
                def on_text(delta: str, i=i) -> None:
                    post(i, "text", delta)

                def on_token(entry: TokenLogprob, i=i) -> None:
                    post(i, "token", entry)
            else:
                on_token = self.logprobs[i].append  # read only after the row's future settles
            job = Job(row.ids, row.params, self.deadline, on_text, done, logprobs=logprobs, on_token=on_token)
            self.jobs.append(job)
            self.futures.append(fut)
            engine.submit(job)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def cancel(self) -> None:
        for j in self.jobs:
            j.cancelled.set()

    def timeout(self) -> HTTPFailure:
        return HTTPFailure(504, f"the request took longer than the server's timeout of {self.timeout_s:g} s")

    async def results(self, receive) -> list[Completion]:
        """Every row's checked result; :class:`ClientGone` (jobs cancelled) as soon as the ASGI
        ``receive`` reports a disconnect, 504 (jobs cancelled) past the deadline."""
        gathered = asyncio.gather(*self.futures)
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait({gathered, gone}, timeout=self.remaining() + 1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if gathered in done:
            return [self.check(r) for r in gathered.result()]
        self.cancel()  # the engine settles every future soon (as "cancelled"), so `gathered` ends quietly
        if gone in done:
            raise ClientGone
        raise self.timeout()

    def check(self, result: Completion | Exception) -> Completion:
        """``result`` if it is a completion; else the HTTP error it stands for."""
        if isinstance(result, Exception):
            if isinstance(result, (UserError, ConfigError)):
                raise HTTPFailure(400, str(result))
            raise HTTPFailure(500, f"generation failed: {type(result).__name__}: {result}")
        if result.finish_reason == "cancelled":
            raise self.timeout()
        return result


async def _disconnected(receive) -> None:
    """Return when the client disconnects (after the body was read, ``receive`` only reports that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def usage(results: list[Completion]) -> dict[str, int]:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def finish(r: Completion) -> str:
    return "length" if r.finish_reason == "length" else "stop"


__all__ = ["ClientGone", "Row", "Submission", "finish", "log_gone", "usage"]
