"""The serving engine: one worker thread owns the model and batches queued requests.

Requests become :class:`Job` rows in a queue; the worker takes the first, waits up to
``batch_wait_s`` for up to ``max_batch`` rows, and runs one :func:`generate` call for all of
them (each row with its own sampling parameters and seed, so answers do not depend on the
batch). Admission (:meth:`Engine.admit`) bounds the requests in flight for the HTTP layer's 429.
Callbacks run on the worker thread.

Cancellation is real work saved, not a flag read at the end: a job cancelled while queued never
reaches the model (its ``on_done`` gets a ``"cancelled"`` completion at once), and a running row is
polled every decode step by :func:`generate`, which stops sampling it and ends the batch early
when every row is done or cancelled. A cancelled row that shares a batch with live rows stops
sampling but its slot stays in the batch's forward pass until the batch ends (``generate`` keeps
one static batch).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moelab.infer.generate import Completion, SamplingParams, TokenizerLike, generate
from moelab.infer.logprobs import token_logprob
from moelab.infer.server_limits import ServerLimits


@dataclass
class Job:
    """One row waiting for (or in) a batch. Callbacks run on the worker thread."""

    ids: list[int]
    params: SamplingParams
    deadline: float
    on_text: Any = None  # (delta) -> None
    on_done: Any = None  # (Completion | Exception) -> None
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # None: off; else how many top alternatives each token reports
    on_token: Any = None  # (TokenLogprob) -> None, before the on_text of the same step


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
            live = []
            for j in batch:
                if j.cancelled.is_set():  # its client left while it waited: it never reaches the model
                    if j.on_done is not None:
                        j.on_done(Completion(finish_reason="cancelled", prompt_tokens=len(j.ids)))
                else:
                    live.append(j)
            if live:
                self._run(live)

    def _run(self, batch: list[Job]) -> None:
        self.batches += 1

        def on_text(row: int, delta: str) -> None:
            if batch[row].on_text is not None:
                batch[row].on_text(delta)

        def should_cancel(row: int) -> bool:
            return batch[row].cancelled.is_set() or time.monotonic() > batch[row].deadline

        def on_token(row: int, token: int, logits_V: Tensor) -> None:
            job = batch[row]
            if job.logprobs is not None and job.on_token is not None:
                job.on_token(token_logprob(logits_V, token, job.logprobs))

        extra = {"on_token": on_token} if any(j.logprobs is not None for j in batch) else {}
        try:
            with torch.no_grad():  # grad mode is per thread: this worker's starts enabled
                results = self.generate_fn(
                    self.model, [j.ids for j in batch], [j.params for j in batch], self.tokenizer,
                    on_text=on_text, should_cancel=should_cancel, **extra,
                )
        except Exception as exc:  # reported to every waiting request as a 500
            for j in batch:
                j.on_done(exc)
            return
        for j, r in zip(batch, results):
            j.on_done(r)


__all__ = ["Engine", "Job", "ServerLimits"]
