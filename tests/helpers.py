"""Shared test helpers: tiny configs small enough for a test to run in milliseconds."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import MLAConfig, ModelConfig, MoEConfig, RouterConfig

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer model (vocab 97, d 32) with the given overrides."""
    moe = overrides.pop("moe", None)
    base = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64)
    return replace(base, moe=moe, **overrides)


def tiny_moe(**overrides) -> MoEConfig:
    """E=4, k=2, F=24 unless overridden."""
    router = overrides.pop("router", RouterConfig())
    return replace(MoEConfig(num_experts=4, top_k=2, expert_hidden=24), router=router, **overrides)


def tiny_mla(**overrides) -> MLAConfig:
    """Multi-head latent attention for ``tiny_config`` (r 12, dr 4; no query bottleneck unless
    ``q_lora_rank`` is given): 16 cached numbers per token and layer against 2·G·Dh = 32 for GQA."""
    base = MLAConfig(kv_lora_rank=12, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    return replace(base, **overrides)


class CharTestTokenizer:
    """A tokenizer for models of ``tiny_config`` (vocab 97): ids 0-89 are the characters
    chr(32)..chr(121), then PAD 94, EOS 95, BOS 96. Other characters encode as '?'."""

    vocab_size = 97
    pad_id, eos_id, bos_id = 94, 95, 96

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 if 32 <= ord(c) < 122 else ord("?") - 32 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(32 + i) for i in ids if 0 <= i < 90)


def study_cli(*args: str, cwd: Path):
    """``python -m moelab study ARGS`` in a subprocess on one thread, with this checkout's ``src`` first."""
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moelab", "study", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def all_finite(x) -> bool:
    """Every float in a nested JSON-like structure of dicts and lists is finite."""
    import math

    if isinstance(x, dict):
        return all(all_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(all_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: equal snapshots mean nothing was lost or changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    """The one line a failed command wrote to stderr (and nothing else, warnings included)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def error_line(capsys) -> str:
    """The one error line a failed command wrote to stderr, beside any ``moelab: warning:`` lines."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("moelab: warning:")]
    assert len(err) == 1, err
    return err[0]


def wait_for(ok, seconds: float) -> bool:
    """Poll ``ok()`` every 10 ms for up to ``seconds``; its last value."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if ok():
            return True
        time.sleep(0.01)
    return ok()


class LoopbackServer:
    """``moelab serve``'s app for ``engine`` on a real uvicorn in a thread, on a free port of 127.0.0.1.

    Entered, it has ``port``, ``url``, ``http`` (httpx) and ``client`` (openai); ``raw`` sends bytes on a
    socket of its own. ``log_config=None`` leaves uvicorn's loggers to the root logger (caplog sees them);
    ``app_kwargs`` go to ``create_app`` (e.g. ``api_key``). Needs the serve extra, httpx and openai.
    """

    def __init__(self, engine, log_config: Any = "uvicorn's", **app_kwargs: Any) -> None:
        import threading

        import uvicorn

        from moelab.infer.server import create_app

        self.engine = engine
        self.app = create_app(engine, model_name="tiny", **app_kwargs)
        logging = {} if log_config == "uvicorn's" else {"log_config": log_config}
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", **logging))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import httpx
        import openai

        self.thread.start()
        assert wait_for(lambda: self.server.started, 10), "uvicorn did not start in 10 s"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=30)
        self.http = httpx.Client(base_url=self.url, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()

    def raw(self, head: bytes, body: bytes = b""):
        """A socket that has sent ``head + body`` (a request as a hostile client writes it)."""
        import socket

        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        s.sendall(head + body)
        return s
