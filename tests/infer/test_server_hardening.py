"""The server against hostile or careless clients (issue 25), on a real uvicorn on 127.0.0.1:
half-sent bodies (slowloris), clients that leave mid-body or mid-generation, deep JSON, the API
key, OpenAI's error shape on every error, and a bounded fuzz of 600 requests from a fixed seed."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moelab import cli  # noqa: E402
from moelab.config import ConfigError  # noqa: E402
from moelab.infer.generate import generate  # noqa: E402
from moelab.infer.server import Engine, ServerLimits, create_app  # noqa: E402
from moelab.model.transformer import Transformer  # noqa: E402

from helpers import CharTestTokenizer, LoopbackServer, tiny_config, tiny_moe, wait_for  # noqa: E402

ERROR_KEYS = {"message", "type", "param", "code"}


class StrictTokenizer(CharTestTokenizer):
    """The test tokenizer, refusing text that is not valid Unicode as byte-level tokenizers do."""

    def encode(self, text: str) -> list[int]:
        text.encode("utf-8")
        return super().encode(text)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(moe=tiny_moe(num_experts=8))).eval()


class Loopback(LoopbackServer):
    """uvicorn in a thread on a free port; its log records reach the root logger (caplog)."""

    def __init__(self, limits: ServerLimits, generate_fn=generate, api_key: str | None = None) -> None:
        super().__init__(Engine(_model(), StrictTokenizer(), limits, generate_fn), log_config=None,
                         **({"api_key": api_key} if api_key else {}))  # fmt: skip



def _post_head(length: int, path: str = "/v1/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _read_to_eof(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _assert_error_shape(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["code"] == status and isinstance(err["message"], str)
    return err


def _gone_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "moelab.serve" and "went away" in r.getMessage()]


# ----------------------------------------------------------------------------- slowloris


def test_half_sent_bodies_hold_no_slot_and_are_closed_after_the_body_timeout() -> None:
    """Twice ``max_pending`` sockets that send headers and part of a body: a real request is still
    served, and every half-sent socket gets a 408 and a closed connection after the body timeout."""
    limits = ServerLimits(max_pending=4, body_timeout_s=1.0, default_max_tokens=4)
    with Loopback(limits) as s:
        half = [s.raw(_post_head(200), b'{"prompt": "sl' if i % 2 else b"") for i in range(8)]
        assert wait_for(lambda: s.engine.in_flight == 0, 0.3)  # none of them took a slot
        r = s.http.post("/v1/completions", json={"prompt": "real", "max_tokens": 3})
        assert r.status_code == 200, r.text
        for sock in half:
            answer = _read_to_eof(sock)  # returns only when the server closes the connection
            sock.close()
            assert answer.startswith(b"HTTP/1.1 408 ")
            err = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
            assert set(err) == ERROR_KEYS and err["code"] == 408 and "body timeout" in err["message"]
        assert s.engine.in_flight == 0
        assert s.http.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200


def test_a_client_leaving_mid_body_logs_one_line_and_no_traceback(caplog) -> None:
    caplog.set_level(logging.INFO, logger="moelab.serve")
    with Loopback(ServerLimits(body_timeout_s=20)) as s:
        sock = s.raw(_post_head(500), b'{"prompt": "I will l')
        time.sleep(0.1)
        sock.close()
        assert wait_for(lambda: _gone_lines(caplog), 10)
        time.sleep(0.1)
        assert s.http.get("/health").json()["in_flight"] == 0
    assert len(_gone_lines(caplog)) == 1 and "while sending its body" in _gone_lines(caplog)[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


# ----------------------------------------------------------------------------- cancellation


class Recorder:
    """A generate_fn that slows every step (so a client can leave mid-generation), gates the start
    of a batch on ``gate``, and records each batch's prompts and results."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s, self.gate, self.started = step_s, threading.Event(), threading.Event()
        self.prompts: list[list[list[int]]] = []
        self.results: list = []
        self.gate.set()

    def __call__(self, model, prompts, params, tok, **kw):
        self.prompts.append([list(p) for p in prompts])
        self.started.set()
        self.gate.wait(20)
        should_cancel = kw["should_cancel"]

        def slow(row: int) -> bool:
            time.sleep(self.step_s)
            return should_cancel(row)

        out = generate(model, prompts, params, tok, **{**kw, "should_cancel": slow})
        self.results.extend(out)
        return out


def test_non_streaming_work_stops_when_its_client_leaves(caplog) -> None:
    caplog.set_level(logging.INFO, logger="moelab.serve")
    rec = Recorder(step_s=0.03)  # 60 tokens take at least 1.8 s; the disconnect is seen in milliseconds
    with Loopback(ServerLimits(timeout_s=60), rec) as s:
        body = json.dumps({"prompt": "go", "max_tokens": 60, "ignore_eos": True}).encode()
        sock = s.raw(_post_head(len(body)), body)
        assert rec.started.wait(10)
        sock.close()
        assert wait_for(lambda: rec.results, 20)
        assert rec.results[0].finish_reason == "cancelled" and rec.results[0].completion_tokens < 60
        assert wait_for(lambda: s.engine.in_flight == 0, 5)
        assert len(_gone_lines(caplog)) == 1 and "while its answer was generated" in _gone_lines(caplog)[0].getMessage()
        assert s.http.post("/v1/completions", json={"prompt": "next", "max_tokens": 2}).status_code == 200
    assert not [r for r in caplog.records if r.exc_info]


def test_a_queued_request_whose_client_left_never_reaches_the_model() -> None:
    rec = Recorder()
    rec.gate.clear()
    with Loopback(ServerLimits(batch_wait_s=0.0, max_batch=8), rec) as s:
        first = threading.Thread(target=s.http.post, args=("/v1/completions",),
                                 kwargs={"json": {"prompt": "first", "max_tokens": 2}})
        first.start()
        assert rec.started.wait(10)  # the worker is inside generate, holding "first"
        body = json.dumps({"prompt": "never me", "max_tokens": 4}).encode()
        sock = s.raw(_post_head(len(body)), body)
        assert wait_for(lambda: s.engine.in_flight == 2, 10)
        sock.close()
        assert wait_for(lambda: s.engine.in_flight == 1, 10)
        rec.gate.set()
        first.join(20)
        assert s.http.post("/v1/completions", json={"prompt": "later", "max_tokens": 2}).status_code == 200
    never = StrictTokenizer().encode("never me")
    assert [never not in batch for batch in rec.prompts] == [True] * len(rec.prompts) and len(rec.prompts) == 2


def test_a_client_leaving_mid_stream_logs_one_line_and_frees_its_rows(caplog) -> None:
    caplog.set_level(logging.INFO, logger="moelab.serve")
    rec = Recorder(step_s=0.03)
    with Loopback(ServerLimits(timeout_s=60), rec) as s:
        body = {"prompt": "Leave", "max_tokens": 55, "stream": True, "ignore_eos": True}
        with s.http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        assert wait_for(lambda: rec.results, 20) and wait_for(lambda: s.engine.in_flight == 0, 5)
        assert rec.results[0].finish_reason == "cancelled" and rec.results[0].completion_tokens < 55
    assert len(_gone_lines(caplog)) == 1 and "during its stream" in _gone_lines(caplog)[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


# ----------------------------------------------------------------------------- limits, auth, error shapes


@pytest.fixture(scope="module")
def loop():
    with Loopback(ServerLimits(max_body_bytes=300_000, default_max_tokens=4, max_pending=16)) as s:
        yield s


@pytest.mark.parametrize("depth", [33, 1_000, 20_000])
def test_deep_json_is_400_before_parsing(loop, depth: int) -> None:
    for body in (b"[" * depth + b"]" * depth, b'{"prompt": ' + b'{"a": ' * depth + b"1" + b"}" * (depth + 1)):
        err = _assert_error_shape(loop.http.post("/v1/completions", content=body), 400)
        assert "deeper than the limit of 32" in err["message"]
    shallow = b'{"prompt": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "max_tokens": 1}'  # brackets in a string
    assert loop.http.post("/v1/completions", content=shallow).status_code == 200


def test_every_error_body_is_in_openai_shape(loop) -> None:
    err = _assert_error_shape(loop.http.get("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in err["message"]
    r = loop.http.get("/v1/chat/completions")
    assert _assert_error_shape(r, 405) and r.headers["allow"] == "POST"
    _assert_error_shape(loop.http.delete("/health"), 405)
    _assert_error_shape(loop.http.post("/v1/completions", content=b"\xff\xfe{"), 400)
    _assert_error_shape(loop.http.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
                        400)
    _assert_error_shape(loop.http.post("/v1/completions", content=b'{"prompt": "\\ud800"}'), 400)
    err = _assert_error_shape(loop.http.post("/v1/chat/completions", content=b'{"\\udfff": 1, "messages": []}'), 400)
    assert "surrogate" in err["message"]
    _assert_error_shape(loop.http.post("/v1/completions", content=b"x" * 300_001), 413)


def test_fastapi_validation_and_unexpected_errors_are_in_openai_shape() -> None:
    """Routes added to the app (typed parameters, a bug) answer 422 and 500 in OpenAI's shape too."""
    with Loopback(ServerLimits()) as s:
        async def typed(count: int):
            return {"count": count}

        async def broken():
            raise RuntimeError("a bug")

        s.app.add_api_route("/v1/typed", typed)
        s.app.add_api_route("/v1/broken", broken)
        err = _assert_error_shape(s.http.get("/v1/typed", params={"count": "many"}), 422)
        assert err["param"] == "query.count"
        _assert_error_shape(s.http.get("/v1/broken"), 500)


def test_api_key_guards_everything_but_health() -> None:
    with Loopback(ServerLimits(default_max_tokens=2), api_key="sekret-123") as s:
        body = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret-123"},
                        {"Authorization": "Basic sekret-123"}):
            err = _assert_error_shape(s.http.post("/v1/completions", json=body, headers=headers), 401)
            assert "sekret" not in err["message"]
        _assert_error_shape(s.http.get("/v1/models"), 401)
        _assert_error_shape(s.http.get("/v1/unknown"), 401)
        assert s.http.get("/health").status_code == 200
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret-123", max_retries=0, timeout=30)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(ConfigError):
        create_app(Engine(_model(), StrictTokenizer(), ServerLimits()), api_key="")


def test_serve_command_takes_the_key_from_the_flag_or_the_environment(monkeypatch) -> None:
    from starlette.testclient import TestClient

    import moelab.infer.server as server_module

    apps = []
    monkeypatch.setattr(cli, "load_checkpoint_for_inference", lambda path, device, dtype=None: (_model(), StrictTokenizer()))
    monkeypatch.setattr(server_module, "serve_forever", lambda app, host, port: apps.append(app))
    monkeypatch.setenv("MOELAB_API_KEY", "from-env")
    assert cli.main(["serve", "ckpt", "--body-timeout", "3", "--max-json-depth", "8"]) == 0
    assert cli.main(["serve", "ckpt", "--api-key", "from-flag"]) == 0
    monkeypatch.delenv("MOELAB_API_KEY")
    assert cli.main(["serve", "ckpt"]) == 0
    try:
        for app, key in zip(apps, ("from-env", "from-flag", None)):
            with TestClient(app) as client:
                assert client.get("/v1/models").status_code == (401 if key else 200)
                if key:
                    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        limits = apps[0].state.engine.limits
        assert (limits.body_timeout_s, limits.max_json_depth) == (3.0, 8)
    finally:
        for app in apps:
            app.state.engine.close()
    assert cli.main(["serve", "ckpt", "--max-json-depth", "5000"]) == 2
    assert cli.main(["serve", "ckpt", "--body-timeout", "0"]) == 2


def test_serve_help_states_the_new_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = ServerLimits()
    assert f"(default {d.max_json_depth})" in text and f"(default {d.body_timeout_s:g})" in text
    assert "--api-key" in text and "MOELAB_API_KEY" in text


# ----------------------------------------------------------------------------- fuzz

FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "seed",
          "stop", "stream", "stream_options", "model", "ignore_eos", "logprobs", "top_logprobs", "tools", "tool_choice",
          "functions", "response_format", "echo", "best_of", "logit_bias", "presence_penalty", "user", "suffix"]
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/tiny", "/v1/models/x/y", "/health",
         "/", "/v1", "/v1/", "/v1/completions/", "/v1/embeddings", "/docs", "/openapi.json", "/%00", "/v1/%ff%fe",
         "/v1/completions?x=1", "/..%2f..%2fetc/passwd", "/" + "a" * 2000]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
HUGE = ["1e999", "-1e999", "1" * 5000, "-" + "9" * 4400, "1e-999", "NaN", "Infinity", "-Infinity", "1.7976931348623157e309",
        str(2**64), str(-(2**63) - 1), "0.0000000000000000000000001"]


def _value(rng: random.Random, depth: int = 0):
    """A random JSON value, at most three containers deep."""
    makers = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**70), 2**70),
        lambda: rng.uniform(-1e6, 1e6),
        lambda: "".join(chr(rng.randrange(0x20, 0x2FF)) for _ in range(rng.randrange(12))),
        lambda: rng.choice(["", "tiny", "user", 0, 1, 2, 5, 64, -1]),
        lambda: [_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {rng.choice([*FIELDS, "type", "text", "role", "content", "x"]): _value(rng, depth + 1)
                 for _ in range(rng.randrange(4))},
    ]
    return rng.choice(makers if depth < 3 else makers[:6])()


def _plausible(rng: random.Random, chat: bool) -> dict:
    body: dict = {"messages": [{"role": rng.choice(["user", "system", "assistant", "bot"]),
                                "content": rng.choice(["Hi", "", "a" * rng.randrange(80),
                                                       [{"type": "text", "text": "x"}],
                                                       [{"type": rng.choice(["text", "image_url", "input_audio"])}]])}
                               for _ in range(rng.randrange(0, 3))]} if chat else \
        {"prompt": rng.choice(["Hi", "", ["a", "b"], [], "z" * rng.randrange(80), ["x"] * rng.randrange(12)])}
    for field in rng.sample(FIELDS[2:], rng.randrange(5)):
        body[field] = rng.choice([_value(rng), rng.randint(-2, 6), rng.random() * 2, True, None])
    return body


def _deep(rng: random.Random) -> bytes:
    n = rng.choice([31, 32, 33, 100, 999, 1000, 5000, 20_000])
    inner = b"[" * n + b"]" * n if rng.random() < 0.5 else b'{"a":' * n + b"1" + b"}" * n
    return rng.choice([inner, b'{"prompt": ' + inner + b"}", b'{"messages": [{"role": "user", "content": ' + inner + b"}]}"])


def _request(rng: random.Random) -> tuple[str, str, bytes]:
    """(method, path, body) of one generated request."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    kind = rng.choices(["plausible", "random", "deep", "huge", "bytes", "route"], [30, 25, 10, 10, 10, 15])[0]
    if kind == "plausible":
        return "POST", path, json.dumps(_plausible(rng, chat)).encode()
    if kind == "random":
        value = rng.choice([{f: _value(rng) for f in rng.sample(FIELDS, rng.randrange(6))}, _value(rng)])
        return "POST", path, json.dumps(value).encode()
    if kind == "deep":
        return "POST", path, _deep(rng)
    if kind == "huge":
        field = rng.choice(["max_tokens", "temperature", "seed", "top_k", "logprobs", "prompt", "n", "top_p"])
        base = '{"prompt": "hi", ' if not chat else '{"messages": [{"role": "user", "content": "hi"}], '
        return "POST", path, f'{base}"{field}": {rng.choice(HUGE)}}}'.encode()
    if kind == "bytes":
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        return "POST", path, rng.choice([raw, b'{"prompt": "' + raw + b'"}', json.dumps({"prompt": "hi"}).encode()[:-2]])
    return rng.choice(METHODS), rng.choice(PATHS), rng.choice([b"", b"{}", b'{"prompt": "x"}'])


def _rss_bytes() -> int | None:
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return None
    import os

    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_fuzzed_requests_never_get_a_5xx(loop) -> None:
    """600 requests from a fixed seed: random JSON shapes, deep nesting, wrong types, huge numbers,
    bad UTF-8, random paths and methods. No 5xx, every error in OpenAI's shape, the server alive
    and idle afterwards, and the process's memory bounded."""
    rng = random.Random(25)
    requests = [_request(rng) for _ in range(600)]
    for method, path, body in requests[:40]:  # warm-up: allocator pools, lazy imports
        loop.http.request(method, path, content=body)
    rss_before = _rss_bytes()
    statuses: dict[int, int] = {}
    for method, path, body in requests:
        headers = {"content-type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}
        r = loop.http.request(method, path, content=body, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, body[:200], r.text[:300])
        if r.status_code >= 400 and method != "HEAD":
            err = r.json()["error"]
            assert set(err) == ERROR_KEYS and err["code"] == r.status_code, (method, path, body[:200], r.text)
    print(statuses)
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 100 and len(statuses) >= 5, statuses
    assert loop.http.get("/health").json()["in_flight"] == 0
    assert loop.http.post("/v1/completions", json={"prompt": "alive", "max_tokens": 2}).status_code == 200
    if rss_before is not None:
        assert _rss_bytes() - rss_before < 200 * 2**20
