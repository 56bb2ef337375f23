"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1, the official openai client,
every limit's status code, a bounded fuzz of random bodies, 16 concurrent clients; OpenAI's
fields: the model name (404), refused fields (400 naming them), content parts,
``stream_options.include_usage`` and logprobs checked against the model's own forward pass.
(Transport-level hardening, auth and the big fuzz: ``test_server_hardening.py``.)"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moelab.infer.chat import ChatTemplate  # noqa: E402
from moelab.infer.generate import SamplingParams, generate  # noqa: E402
from moelab.infer.server import Engine, ServerLimits  # noqa: E402
from moelab.model.transformer import Transformer  # noqa: E402

from helpers import CharTestTokenizer, LoopbackServer, tiny_config, tiny_mla, tiny_moe  # noqa: E402

TOK = CharTestTokenizer()


def _model(mla=None) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(moe=tiny_moe(num_experts=8), mla=mla)).eval()


class Server(LoopbackServer):
    """uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, limits: ServerLimits, generate_fn=generate, model: Transformer | None = None) -> None:
        super().__init__(Engine(model if model is not None else _model(), TOK, limits, generate_fn))


LIMITS = ServerLimits(max_body_bytes=4096, max_pending=32, max_batch=8, default_max_tokens=8, timeout_s=30)


@pytest.fixture(scope="module")
def server():
    with Server(LIMITS) as s:
        yield s


def _direct(prompt: str, **kw) -> str:
    return generate(_model(), [TOK.encode(prompt)], SamplingParams(**kw), TOK)[0].text


def test_completion_chat_and_models_with_the_openai_client(server) -> None:
    out = server.client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0)
    assert out.choices[0].text == _direct("Hello", max_new_tokens=10)
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens <= 10
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    prompt = ChatTemplate().render(messages)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert chat.choices[0].message.content == _direct(prompt, max_new_tokens=12, stop=("\n<|",))
    assert chat.choices[0].message.role == "assistant"
    assert [m.id for m in server.client.models.list()] == ["tiny"]
    assert server.http.get("/health").json()["status"] == "ok"


def test_streaming_equals_the_whole_answer(server) -> None:
    kw = dict(model="tiny", max_tokens=16, temperature=0.9, seed=11)
    whole = server.client.completions.create(prompt="Stream me", **kw).choices[0].text
    chunks = list(server.client.completions.create(prompt="Stream me", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(chunks) > 2
    messages = [{"role": "user", "content": "Hi"}]
    whole = server.client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    chunks = list(server.client.chat.completions.create(messages=messages, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason is not None


def test_limits_answer_their_status_codes(server) -> None:
    post = server.http.post
    r = post("/v1/completions", content=json.dumps({"prompt": "x" * 5000}), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert post("/v1/completions", json={"prompt": 5}).status_code == 422
    assert post("/v1/chat/completions", json={"messages": [{"role": "user"}]}).status_code == 422
    assert post("/v1/completions", json={"prompt": "hi", "temperature": "hot"}).status_code == 422
    r = post("/v1/completions", json={"prompt": "hello", "max_tokens": 60})
    assert r.status_code == 400 and "maximum context length is 64" in r.json()["error"]["message"]
    assert post("/v1/completions", json={"prompt": "hi", "stop": ""}).status_code == 400
    assert post("/v1/completions", json={"prompt": "hi", "n": 2}).status_code == 400
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="tiny", prompt="y" * 70, max_tokens=1)


def test_timeout_answers_504() -> None:
    with Server(ServerLimits(timeout_s=0.0)) as s:
        r = s.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 20})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert s.http.get("/health").json()["in_flight"] == 0


def test_queue_overflow_answers_429_and_queued_requests_are_batched() -> None:
    gate = threading.Event()
    batch_sizes: list[int] = []

    def gated_generate(model, prompts, *args, **kw):
        gate.wait(10)
        batch_sizes.append(len(prompts))
        return generate(model, prompts, *args, **kw)

    with Server(ServerLimits(max_pending=4, max_batch=8, batch_wait_s=0.0), gated_generate) as s:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(s.http.post, "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4}) for i in range(4)]
            for _ in range(500):
                if s.engine.in_flight == 4:
                    break
                time.sleep(0.01)
            over = s.http.post("/v1/completions", json={"prompt": "late", "max_tokens": 4})
            assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"
            gate.set()
            assert all(f.result().status_code == 200 for f in futures)
        assert sum(batch_sizes) == 4 and len(batch_sizes) < 4  # the three queued behind the first share a batch
        assert s.http.post("/v1/completions", json={"prompt": "again", "max_tokens": 2}).status_code == 200


def test_mla_model_answers_batched_requests_as_alone() -> None:
    """An MLA+MoE model behind the server (latent KV cache, batched rows): every concurrent
    request gets the tokens direct generation gives its prompt alone."""
    model = _model(mla=tiny_mla(q_lora_rank=10))
    prompts = [f"Latent {i}, please" for i in range(6)]
    gate = threading.Event()
    batch_sizes: list[int] = []

    def gated_generate(m, batch_prompts, *args, **kw):
        gate.wait(10)
        batch_sizes.append(len(batch_prompts))
        return generate(m, batch_prompts, *args, **kw)

    server = Server(ServerLimits(max_batch=8, batch_wait_s=0.0), gated_generate, model=model)
    with server as s, ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(s.http.post, "/v1/completions", json={"prompt": p, "max_tokens": 6, "temperature": 1.0, "seed": i})
            for i, p in enumerate(prompts)
        ]
        for _ in range(500):
            if s.engine.in_flight == 6:
                break
            time.sleep(0.01)
        gate.set()
        texts = [f.result().json()["choices"][0]["text"] for f in futures]
    assert max(batch_sizes) > 1
    alone = [
        generate(model, [TOK.encode(p)], SamplingParams(6, temperature=1.0, seed=i), TOK)[0].text
        for i, p in enumerate(prompts)
    ]
    assert texts == alone and len(set(texts)) > 1


def test_sixteen_concurrent_clients_all_get_answers(server) -> None:
    def ask(i: int) -> tuple[str, str]:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
        prompt = f"Client {i} says"
        return prompt, client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(answers) == 16
    for prompt, text in answers:  # batching does not change greedy answers
        assert text == _direct(prompt, max_new_tokens=6)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
          "model", "ignore_eos", "max_completion_tokens"]
PLAUSIBLE = {
    "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                                "content": st.text(max_size=20)}), max_size=3),
    "max_tokens": st.integers(-3, 80),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-2, 200),
    "seed": st.integers(-5, 2**64),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6),
    "stream": st.booleans(),
    "n": st.integers(0, 3),
}
BODIES = (
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6)
    | st.fixed_dictionaries({}, optional=PLAUSIBLE)
    | JSON
).map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)


@settings(max_examples=140, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, chat=st.booleans())
def test_fuzzed_bodies_never_get_a_5xx(server, body: bytes, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = server.http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404, 413, 422), (r.status_code, body, r.text)
    if r.status_code != 200:
        assert "message" in r.json()["error"]


def test_server_still_answers_after_the_fuzz(server) -> None:
    assert server.http.get("/health").json() == {"status": "ok", "in_flight": 0, "batches": server.engine.batches}
    assert server.client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].finish_reason


def test_a_client_leaving_mid_stream_frees_its_slot(server) -> None:
    body = {"prompt": "Leave early", "max_tokens": 50, "stream": True, "ignore_eos": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    for _ in range(300):
        if server.engine.in_flight == 0:
            break
        time.sleep(0.01)
    assert server.engine.in_flight == 0


# ----------------------------------------------------------------------------- OpenAI's fields


def test_an_unknown_model_is_404_in_openai_shape(server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        server.client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
    err = info.value.response.json()["error"]
    assert err["param"] == "model" and err["code"] == 404 and "gpt-4o" in err["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert server.client.models.retrieve("tiny").id == "tiny"
    assert server.http.get("/v1/models/gpt-4o").status_code == 404
    assert server.http.post("/v1/completions", json={"prompt": "no model named", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize(
    ("chat", "field", "value"),
    [
        (True, "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        (True, "tool_choice", "auto"),
        (True, "functions", [{"name": "f"}]),
        (True, "function_call", "auto"),
        (True, "response_format", {"type": "json_object"}),
        (True, "presence_penalty", 0.5),
        (True, "logit_bias", {"5": 10}),
        (False, "echo", True),
        (False, "best_of", 3),
        (False, "suffix", "end"),
        (False, "frequency_penalty", -1.0),
        (False, "tools", []),  # not a field of /v1/completions at all
        (True, "brand_new_option", 1),
        (True, "stream_options", {"include_usage": True, "extra": 1}),
    ],
)
def test_unsupported_fields_are_refused_naming_the_field(server, chat: bool, field: str, value) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"}
    body |= {"max_tokens": 2, field: value}
    if field == "stream_options":
        body["stream"] = True
    r = server.http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].split(".")[0] == field and field in err["message"] and err["type"] == "invalid_request_error"


def test_neutral_values_of_unsupported_fields_and_echoed_messages_are_accepted(server) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": None, "function_call": None,
         "audio": None, "annotations": []},
        {"role": "user", "content": "Again"},
    ]
    neutral = {"tools": None, "tool_choice": None, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
               "response_format": {"type": "text"}, "user": "someone", "stream_options": None}
    r = server.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **neutral})
    assert r.status_code == 200, r.text
    r = server.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x", "name": "bob"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.name"
    r = server.http.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_content_parts_are_joined_and_other_parts_refused(server) -> None:
    parts = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Hi"}]
    as_parts = server.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0)
    as_text = server.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Be brief.\nHi"}], max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as info:
        server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": [parts[0], image]}], max_tokens=2)
    err = info.value.response.json()["error"]
    assert err["param"] == "messages.0.content.1.type" and "image_url" in err["message"]
    r = server.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages.0.content.0.text"


def test_include_usage_ends_the_stream_with_a_usage_chunk(server) -> None:
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    whole = server.client.completions.create(prompt="Count", **kw)
    chunks = list(server.client.completions.create(prompt="Count", stream=True,
                                                   stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1]) and len(chunks) > 2
    messages = [{"role": "user", "content": "Hi"}]
    whole = server.client.chat.completions.create(messages=messages, **kw)
    chunks = list(server.client.chat.completions.create(messages=messages, stream=True,
                                                        stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    plain = list(server.client.chat.completions.create(messages=messages, stream=True, **kw))
    assert all(c.usage is None and c.choices for c in plain)


def _reference_logprobs(prompt: str, completion_ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each completion position, from one uncached forward pass."""
    ids = TOK.encode(prompt) + completion_ids
    with torch.no_grad():
        logits = _model()(torch.tensor([ids])).logits[0]
    start = len(ids) - len(completion_ids) - 1
    return torch.log_softmax(logits[start : start + len(completion_ids)].float(), dim=-1)


def test_completion_logprobs_are_the_models_own(server) -> None:
    out = server.client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    ids = generate(_model(), [TOK.encode("Hello")], SamplingParams(6), TOK)[0].token_ids
    assert lp.tokens == [TOK.decode([t]) for t in ids] and len(ids) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text
    ref = _reference_logprobs("Hello", ids)
    assert lp.token_logprobs == pytest.approx([ref[i, t].item() for i, t in enumerate(ids)], abs=1e-4)
    assert lp.text_offset == [5 + len("".join(lp.tokens[:i])) for i in range(len(ids))]  # from the prompt's start
    for i, top in enumerate(lp.top_logprobs):
        values, best = torch.topk(ref[i], 3)
        assert list(top) == [TOK.decode([t]) for t in best.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
        assert lp.tokens[i] == next(iter(top))  # greedy took the most likely token
    # logprobs do not change what is sampled
    kw = dict(model="tiny", prompt="Seeded", max_tokens=8, temperature=1.0, seed=3)
    assert server.client.completions.create(logprobs=1, **kw).choices[0].text == \
        server.client.completions.create(**kw).choices[0].text


def test_chat_logprobs_in_openai_shape(server) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    out = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0.8,
                                                seed=2, logprobs=True, top_logprobs=4)
    content = out.choices[0].logprobs.content
    prompt = ChatTemplate().render(messages)
    params = SamplingParams(5, temperature=0.8, seed=2, stop=ChatTemplate().stop)
    ids = generate(_model(), [TOK.encode(prompt)], params, TOK)[0].token_ids
    assert [c.token for c in content] == [TOK.decode([t]) for t in ids] and len(ids) == out.usage.completion_tokens
    ref = _reference_logprobs(prompt, ids)
    for i, c in enumerate(content):
        assert c.logprob == pytest.approx(ref[i, ids[i]].item(), abs=1e-4) and c.bytes == list(c.token.encode())
        values, best = torch.topk(ref[i], 4)
        assert [t.token for t in c.top_logprobs] == [TOK.decode([t]) for t in best.tolist()]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    bare = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, logprobs=True)
    assert all(c.top_logprobs == [] for c in bare.choices[0].logprobs.content)
    assert server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].logprobs is None
    r = server.http.post("/v1/chat/completions", json={"messages": messages, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_streamed_logprobs_equal_the_whole_answers(server) -> None:
    kw = dict(model="tiny", prompt="Stream", max_tokens=7, temperature=0.7, seed=9, logprobs=2)
    whole = server.client.completions.create(**kw).choices[0].logprobs
    chunks = list(server.client.completions.create(stream=True, **kw))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [x for p in parts for x in p.token_logprobs] == whole.token_logprobs
    assert [x for p in parts for x in p.text_offset] == whole.text_offset
    messages = [{"role": "user", "content": "Hey"}]
    ckw = dict(model="tiny", messages=messages, max_tokens=6, temperature=0.7, seed=4, logprobs=True, top_logprobs=2)
    whole = server.client.chat.completions.create(**ckw).choices[0].logprobs.content
    chunks = list(server.client.chat.completions.create(stream=True, **ckw))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in whole]


def test_the_fast_backend_serves_the_same_answers() -> None:
    """`moelab serve --fast`: the engine's one generate loop over FastDecoder; greedy answers, streamed or not,
    equal the fast path's own and (fp32 weights) the module path's."""
    from functools import partial

    from moelab.infer.fast_decode import FastDecoder, cast_for_decode

    fast_model = cast_for_decode(_model(), torch.float32)
    with Server(LIMITS, partial(generate, decoder=FastDecoder), model=fast_model) as s:
        out = s.client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0)
        parts = s.client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0, stream=True)
        streamed = "".join(c.choices[0].text for c in parts)
    assert out.choices[0].text == streamed == _direct("Hello", max_new_tokens=10)
