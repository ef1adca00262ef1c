"""`qwen-edge serve` with tools, tool_choice, response_format and min_p, driven by the official openai client
against a served tiny model that carries Qwen2.5's chat template. A random model seldom writes <tool_call> by
itself, so calls come from forced tool_choice (constrained decoding); test_tools.py feeds the parser
synthetic text."""
import json
import sys

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
from starlette.testclient import TestClient  # noqa: E402

import toolkit  # noqa: E402
from serving import cli_server  # noqa: E402
from toolkit.server import create_app  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}}}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {
    "type": "object", "additionalProperties": False, "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "sure"],
          "properties": {"answer": {"type": "string", "maxLength": 10}, "sure": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def base(tools_folder):
    with cli_server(tools_folder, "--model-id", "tiny", "--threads", "1", "--max-tokens", "200") as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)


def test_required_tool_call_round_trip(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "now")
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    # the client returns a result; the model answers (tools still offered, tool_choice auto)
    messages = ASK + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})}]
    r2 = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, CLOCK], temperature=0,
                                        max_tokens=8)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_named_function_streamed_as_openai_does(client):
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, CLOCK], stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=1.0, seed=4)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    first = calls[0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                         "get_weather", "")
    assert first.id.startswith("call_") and all(tc.id is None and tc.index == 0 for tc in calls[1:])
    arguments = json.loads("".join(tc.function.arguments or "" for tc in calls))
    assert arguments["city"] in ("Paris", "Oslo", "Lima")
    assert not any(d.content for d in deltas)  # no markup streamed as content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_response_format_json_schema_and_json_object(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=ASK, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA,
                                                                    "strict": True}})
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"answer", "sure"} and isinstance(value["sure"], bool) and len(value["answer"]) <= 10
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}})
    value = json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert set(value) == {"answer", "sure"}
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=200,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_min_p_and_tool_choice_none(client, tools_folder):
    local = toolkit.load(tools_folder)
    want = local.complete([ASK], temperature=0.9, min_p=0.3, seed=11, max_new_tokens=10)[0].text
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0.9, seed=11, max_tokens=10,
                                       extra_body={"min_p": 0.3})
    assert r.choices[0].message.content == want
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=10)
    plain = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=10)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools were not rendered


@pytest.mark.parametrize("fields, needle, param", [
    ({"min_p": 1.5}, "min_p: expected a number in [0, 1]", "min_p"),
    ({"tools": "x"}, "tools: expected a list", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name: expected",
     "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice 'always': expected one of", "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'nope' is not one of the tools", "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice: needs tools", "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls: expected true or false",
     "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format: expected {type: text}", "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema: expected {name", "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema: expected a JSON schema object", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format: does not compile", "response_format"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}]},
     "messages[1].tool_calls[0]: expected", "messages[1].tool_calls[0]"),
])
def test_bad_tool_fields_get_400_naming_the_field(base, fields, needle, param):
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": ASK, **fields}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_without_llguidance_constrained_requests_get_400(tools_folder, monkeypatch):
    model = toolkit.load(tools_folder)
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with TestClient(create_app(model, "tiny")) as c:
        for fields, param in [({"response_format": {"type": "json_object"}}, "response_format"),
                              ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice")]:
            r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **fields})
            assert r.status_code == 400 and r.json()["error"]["param"] == param
            assert "pip install 'qwen-edge[constrained]'" in r.json()["error"]["message"]
        # tools without a forced call need no llguidance
        r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, "tools": [WEATHER]})
        assert r.status_code == 200
