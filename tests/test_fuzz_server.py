"""Fuzzing the server's request handling (hypothesis): random bodies for /v1/chat/completions and /v1/completions
(random JSON of every type, missing, mistyped and extra fields, huge and non-finite numbers, deep nesting, lone
surrogates, invalid UTF-8, not JSON at all) go through httpx's ASGI transport to the app on a tiny model.

Property: every answer is OpenAI's error shape with a 4xx status, or a valid 200 (a completion, or a stream
ending with `data: [DONE]`); never a 500, never a hang (each request has a time limit); /health answers after.
Bounded: about 1,100 requests, about 30 s on 2 cores; the last test fails if fewer than MIN_CASES ran.
"""
import asyncio
import json
import time

import pytest

pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import toolkit  # noqa: E402
from toolkit.server import create_app  # noqa: E402

MIN_CASES = 50
CASES = {"chat": 0, "completions": 0, "200": 0, "4xx": 0}
SECONDS = {"total": 0.0}
FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@pytest.fixture(scope="module")
def server(exported):
    """(event loop, client) for the app on the tiny model: max_tokens 8 keeps valid requests short."""
    model = toolkit.load(exported("tied_fp32", bits=32), max_length=256, threads=1)
    app = create_app(model, "tiny", max_tokens=8, max_body=256 << 10, request_timeout=10)
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                               base_url="http://fuzz")
    yield loop, client
    loop.run_until_complete(client.aclose())
    app.state.worker.stop()
    loop.close()


def send(server, endpoint: str, body: bytes) -> None:
    """POST `body` and check the property; a request that takes over 30 s counts as a hang."""
    loop, client = server
    t = time.perf_counter()
    r = loop.run_until_complete(asyncio.wait_for(
        client.post(PATHS[endpoint], content=body, headers={"Content-Type": "application/json"}), 30))
    SECONDS["total"] += time.perf_counter() - t
    CASES[endpoint] += 1
    if r.status_code == 200:
        CASES["200"] += 1
        check_success(r, endpoint)
    else:
        CASES["4xx"] += 1
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:500], body[:300])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


def check_success(r, endpoint: str) -> None:
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", r.text[-300:]
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert all("error" not in c for c in chunks), r.text[-300:]
        assert len({c["id"] for c in chunks}) == 1
    else:
        answer = r.json()
        assert answer["object"] == ("chat.completion" if endpoint == "chat" else "text_completion")
        assert answer["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


# -- strategies ----------------------------------------------------------------------------------------

surrogate = st.characters(categories=["Cs"])  # a lone one: not valid Unicode, but JSON escapes it ("\\ud800")


def texts(max_size: int, min_size: int = 0):
    """Text, sometimes with lone surrogates (st.text leaves them out)."""
    return st.text(min_size=min_size, max_size=max_size) | st.lists(
        st.characters() | surrogate, min_size=min_size, max_size=max_size).map("".join)


scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 40), max_value=10 ** 40)
           | st.floats(allow_nan=True, allow_infinity=True) | texts(20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts(8), inner, max_size=4), max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", "wizard", ""]) | json_values
contents = (texts(60) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts(20)}),
                                             max_size=3) | json_values)
calls = st.lists(st.fixed_dictionaries({"id": texts(5), "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": texts(5), "arguments": texts(20) | json_values})}), max_size=2) | json_values
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": contents},
                                          optional={"name": json_values, "tool_calls": calls}),
                    max_size=4) | json_values
tools = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "bad name"])},
    optional={"parameters": st.just({"type": "object", "properties": {"x": {"enum": [1, 2]}}}) | json_values,
              "description": texts(10)})}), max_size=2) | json_values
response_formats = (st.sampled_from([{"type": "json_object"}, {"type": "text"}])
                    | st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
                        {"name": st.just("x"), "schema": st.just({"type": "boolean"}) | json_values})})
                    | json_values)
# per field: plausible values mostly, anything sometimes
FIELDS = {
    "max_tokens": st.integers(-2, 12) | st.integers(min_value=-(10 ** 30), max_value=10 ** 30) | json_values,
    "max_completion_tokens": st.integers(0, 10) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-0.5, 1.5) | json_values,
    "top_k": st.integers(-5, 400) | json_values,
    "repetition_penalty": st.floats(-1, 12) | json_values,
    "seed": st.integers(-5, 2 ** 64) | json_values,
    "stop": texts(300) | st.lists(texts(5), max_size=6) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": json_values}) | json_values,
    "n": st.integers(0, 3) | json_values,
    "presence_penalty": st.floats(-1, 1) | json_values,
    "frequency_penalty": st.floats(-1, 1) | json_values,
    "model": json_values,
    "echo": json_values,
    "logprobs": json_values,
    "suffix": json_values,
    "min_p": st.floats(-0.5, 1.5) | json_values,
    "tools": tools,
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "f"}}])
    | json_values,
    "parallel_tool_calls": st.booleans() | json_values,
    "response_format": response_formats,
}
prompts = (texts(60) | st.lists(st.integers(-5, 400), max_size=8) | st.lists(texts(10), max_size=2)
           | json_values)


def body_of(main: str, value_strategy):
    """A JSON object with (usually) the main field, some known fields and some junk ones."""
    return st.fixed_dictionaries({}, optional={main: value_strategy, **FIELDS}).flatmap(
        lambda known: st.dictionaries(texts(6), json_values, max_size=2).map(lambda junk: {**junk, **known}))


def dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


raw_bodies = (st.binary(max_size=200)
              | st.text(max_size=100).map(str.encode)
              | st.integers(1, 20000).map(lambda n: b"[" * n)
              | st.integers(1, 20000).map(lambda n: b'{"messages": ' + b"[" * n)
              | st.integers(4000, 6000).map(lambda n: b'{"max_tokens": ' + b"9" * n + b"}")
              | json_values.map(dumps)
              | body_of("messages", messages).map(lambda b: dumps(b)[:-1] + b', "x": "\xff\xfe"}'))


@FUZZ
@given(body=body_of("messages", messages))
def test_chat_bodies(server, body):
    send(server, "chat", dumps(body))


@FUZZ
@given(body=body_of("prompt", prompts))
def test_completion_bodies(server, body):
    send(server, "completions", dumps(body))


@FUZZ
@given(endpoint=st.sampled_from(sorted(PATHS)), body=raw_bodies)
def test_raw_bodies(server, endpoint, body):
    send(server, endpoint, body)


@settings(FUZZ, max_examples=100)
@given(text=st.text(min_size=1, max_size=40), stream=st.booleans(), fields=st.fixed_dictionaries(
    {}, optional={"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2 ** 32),
                  "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4), "max_tokens": st.integers(1, 8)}))
def test_valid_requests_answer(server, text, stream, fields):
    """Mostly valid requests, so that the 200 side is fuzzed too (text may hold special-token strings)."""
    send(server, "chat", dumps({"messages": [{"role": "user", "content": text}], "stream": stream, **fields}))
    send(server, "completions", dumps({"prompt": text, "stream": stream, **fields}))


def test_the_server_still_answers_and_enough_cases_ran(server, capsys):
    loop, client = server
    health = loop.run_until_complete(asyncio.wait_for(client.get("/health"), 10))
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["failed"] == 0 and health.json()["active"] == 0
    total = CASES["chat"] + CASES["completions"]
    with capsys.disabled():
        print(f"\nfuzzed requests: {total} ({CASES}), {SECONDS['total']:.1f} s in requests; /health {health.json()}")
    assert total >= MIN_CASES, CASES
