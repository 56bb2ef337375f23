"""llama.cpp as a peer engine: load a GGUF written by :func:`moelab.convert.gguf.export_gguf` and time
prefill and greedy decode as moelab's fast path is timed, on the same weights.

Why: a tok/s figure means little without the best-known engine beside it, measured in the same run
on the same machine (the bandwidth here moves by tens of percent within minutes). llama.cpp is that
engine for CPU decoding; ``llama-cpp-python`` builds it from source with pip (``pip install -e
".[peer]"``), so it uses this CPU's instructions as moelab's native kernels do.

Timing, as :func:`moelab.bench_decode.time_moelab_interleaved`: prefill = one pass over the prompt
per row; decode = ``new`` greedy steps after one warm-up step, tok/s counting every row's token.
Batch B runs B sequences in one context, one ``llama_decode`` call per step for all rows (llama.cpp's
batched decode: each weight matrix read once per step for every row).

Legend: B rows, P prompt tokens, N new tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import UserError

INSTALL = 'pip install -e ".[peer]"'


def llama_cpp_module() -> Any:
    """The ``llama_cpp`` package, or a UserError naming how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"the llama.cpp peer needs llama-cpp-python: {INSTALL} (builds llama.cpp from source)") from None
    return llama_cpp


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))


class LlamaCppModel:
    """One GGUF model in one llama.cpp context of ``batch`` sequences of up to ``positions`` tokens each
    (keys and values cached in llama.cpp's default f16, or f32 with ``kv_f32``)."""

    def __init__(self, path: str | Path, batch: int, positions: int, threads: int, kv_f32: bool = False) -> None:
        lc = llama_cpp_module()
        self.lc = lc
        self.model = self.ctx = self.llama_batch = None  # what close() frees, whatever failed below
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.use_mmap = True
        self.model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise UserError(f"llama.cpp could not load {path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = batch * positions
        cparams.n_batch = max(batch * positions, 512)
        cparams.n_ubatch = cparams.n_batch
        cparams.n_seq_max = batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        if hasattr(cparams, "kv_unified"):
            cparams.kv_unified = True
        if kv_f32:  # llama.cpp caches keys and values in f16 by default; f32 to compare with an fp32 forward
            cparams.type_k = cparams.type_v = lc.GGML_TYPE_F32
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise UserError(f"llama.cpp could not make a context of {batch} × {positions} positions for {path}")
        self.file_mib = Path(path).stat().st_size / 2**20
        vocab = lc.llama_model_get_vocab(self.model)
        self.vocab_size = lc.llama_vocab_n_tokens(vocab)
        self.batch_size = batch
        self.capacity = max(batch * positions, 1)
        self.llama_batch = lc.llama_batch_init(self.capacity, 0, batch)

    def close(self) -> None:
        lc = self.lc
        if self.llama_batch is not None:
            lc.llama_batch_free(self.llama_batch)
            self.llama_batch = None
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lc.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have unloaded the library
            self.close()

    def clear(self) -> None:
        """Forget every sequence (the KV cache), as a new generation starts."""
        lc = self.lc
        if hasattr(lc, "llama_memory_clear"):
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        else:
            lc.llama_kv_self_clear(self.ctx)

    def decode(self, rows: list[list[int]], start: int) -> np.ndarray:
        """Feed ``rows[b]`` to sequence b at positions ``start…``; returns the last position's logits ``[B, V]``."""
        b = self.llama_batch
        n = 0
        for s, toks in enumerate(rows):
            for j, tok in enumerate(toks):
                b.token[n] = tok
                b.pos[n] = start + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s
                b.logits[n] = j == len(toks) - 1
                n += 1
        b.n_tokens = n
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
        last = 0
        for s, toks in enumerate(rows):
            last += len(toks)
            ptr = self.lc.llama_get_logits_ith(self.ctx, last - 1)
            out[s] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab_size,))
        return out


def time_llama_cpp(model: LlamaCppModel, ids_BP: list[list[int]], new: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s): the prompts ``ids_BP`` (one per sequence) in one pass, a warm-up
    step, then ``new`` greedy steps of all rows together."""
    batch, prompt = len(ids_BP), len(ids_BP[0])
    model.clear()
    t0 = time.perf_counter()
    logits = model.decode(ids_BP, 0)
    prefill = batch * prompt / (time.perf_counter() - t0)
    nxt = [[int(t)] for t in logits.argmax(-1)]
    logits = model.decode(nxt, prompt)  # warm-up step
    t0 = time.perf_counter()
    for step in range(new):
        nxt = [[int(t)] for t in logits.argmax(-1)]
        logits = model.decode(nxt, prompt + 1 + step)
    return prefill, batch * new / (time.perf_counter() - t0)


__all__ = ["LlamaCppModel", "llama_cpp_module", "llama_cpp_version", "time_llama_cpp"]
