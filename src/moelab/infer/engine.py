"""The serving engine: one worker thread owns the model and batches queued requests.

Requests become :class:`Job` rows in a queue; the worker takes the first, waits up to
``batch_wait_s`` for up to ``max_batch`` rows, and runs one :func:`generate` call for all of
them (each row with its own sampling parameters and seed, so answers do not depend on the
batch). Admission (:meth:`Engine.admit`) bounds the requests in flight for the HTTP layer's 429.
Callbacks run on the worker thread.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from moelab.config import ConfigError
from moelab.infer.generate import SamplingParams, TokenizerLike, generate


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts. Every field is a ``moelab serve`` flag."""

    max_body_bytes: int = 1_000_000
    max_pending: int = 64  # requests admitted (queued or running) at once; more get 429
    max_batch: int = 8  # rows per generate() call
    batch_wait_s: float = 0.005  # how long the worker waits to fill a batch
    timeout_s: float = 120.0  # per request, from admission to the last token
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    max_stop: int = 4

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_pending", "max_batch", "default_max_tokens", "max_stop"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"server.{name}={value!r} is invalid: must be an integer >= 1")
        for name in ("batch_wait_s", "timeout_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"server.{name}={value!r} is invalid: must be >= 0")


@dataclass
class Job:
    """One row waiting for (or in) a batch. Callbacks run on the worker thread."""

    ids: list[int]
    params: SamplingParams
    deadline: float
    on_text: Any = None  # (delta) -> None
    on_done: Any = None  # (Completion | Exception) -> None
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """A model, its tokenizer and the worker thread that batches jobs into generate() calls."""

    def __init__(self, model, tokenizer: TokenizerLike, limits: ServerLimits, generate_fn=generate) -> None:
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.generate_fn = generate_fn
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.in_flight = 0
        self.batches = 0
        self._thread = threading.Thread(target=self._work, name="moelab-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def admit(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limits.max_pending:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            end = time.monotonic() + self.limits.batch_wait_s
            while len(batch) < self.limits.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                batch.append(job)
            batch = [j for j in batch if not j.cancelled.is_set()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        self.batches += 1

        def on_text(row: int, delta: str) -> None:
            if batch[row].on_text is not None:
                batch[row].on_text(delta)

        def should_cancel(row: int) -> bool:
            return batch[row].cancelled.is_set() or time.monotonic() > batch[row].deadline

        try:
            results = self.generate_fn(
                self.model, [j.ids for j in batch], [j.params for j in batch], self.tokenizer,
                on_text=on_text, should_cancel=should_cancel,
            )
        except Exception as exc:  # reported to every waiting request as a 500
            for j in batch:
                j.on_done(exc)
            return
        for j, r in zip(batch, results):
            j.on_done(r)


__all__ = ["Engine", "Job", "ServerLimits"]
