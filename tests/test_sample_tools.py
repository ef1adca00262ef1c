"""The real model (the sample, conftest's one int4 export) with tools and schemas: a tool-call round
trip with the official openai client against `qwen-edge serve`, streamed and not, and 50 prompts under a JSON
schema whose every answer validates. Skipped, with the reason, when the sample cannot be fetched."""
import json

import pytest

import toolkit
from test_constrained import valid
from serving import cli_server

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
pytest.importorskip("uvicorn")

SYSTEM = "You are a weather assistant. Look the weather up with get_weather, then tell the user the result in words."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
RESULT = json.dumps({"city": "Paris", "temperature_c": 21, "condition": "sunny"})
ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer", "confidence", "year"],
          "properties": {"answer": {"type": "string", "maxLength": 60},
                         "confidence": {"enum": ["low", "medium", "high"]},
                         "year": {"type": ["integer", "null"], "minimum": 0, "maximum": 2100}}}
TOPICS = ["Python", "Linux", "the World Wide Web", "Git", "Java", "the C language", "Rust", "SQL", "JavaScript",
          "the iPhone", "Wikipedia", "Unicode", "TCP/IP", "the transistor", "the Moon landing", "Go (the language)",
          "Docker", "Kubernetes", "PostgreSQL", "the GPS system", "Bitcoin", "the first web browser", "Haskell",
          "the Eiffel Tower", "Lisp"]


@pytest.fixture(scope="module")
def client(sample_int4):
    with cli_server(sample_int4, "--threads", "2", "--max-length", "2048", "--max-tokens", "128", seconds=120) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def streamed_message(stream) -> tuple[dict, str]:
    """An assistant message put together from streamed chunks, as a client does; and the finish_reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": tc.id, "type": "function",
                                               "function": {"name": "", "arguments": ""}})
            call["function"]["name"] += tc.function.name or ""
            call["function"]["arguments"] += tc.function.arguments or ""
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[k] for k in sorted(calls)]
    return message, finish


@pytest.mark.sample
@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip_with_the_openai_client(client, stream):
    """The model calls get_weather by itself (tool_choice auto), the client runs it and sends the result back,
    the model answers with it. The answer turn says tool_choice "none": with the tools still offered, the
    0.5B model echoes the <tool_response> block instead of answering (int4 and float32 alike)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(model="sample", messages=messages, tools=[WEATHER], temperature=0,
                                           max_tokens=80, stream=stream)
    if stream:
        message, finish = streamed_message(first)
    else:
        message, finish = first.choices[0].message.model_dump(exclude_none=True), first.choices[0].finish_reason
    assert finish == "tool_calls", message
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    messages += [message, {"role": "tool", "tool_call_id": call["id"], "content": RESULT}]
    second = client.chat.completions.create(model="sample", messages=messages, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=60, stream=stream)
    if stream:
        answer, finish = streamed_message(second)
    else:
        answer, finish = second.choices[0].message.model_dump(exclude_none=True), second.choices[0].finish_reason
    print(answer["content"])
    assert finish == "stop" and "21" in answer["content"] and "sunny" in answer["content"].lower()


@pytest.mark.sample
def test_fifty_prompts_under_a_json_schema_all_validate(sample_int4):
    model = toolkit.load(sample_int4, threads=2, max_length=1024)
    prompts = [[{"role": "user", "content": q.format(t)}] for t in TOPICS
               for q in ("When did {} first appear? Answer in JSON.", "Describe {} in a few words, as JSON.")]
    assert len(prompts) == 50
    done = model.complete(prompts, json_schema=ANSWER, temperature=0.7, top_p=0.9, seed=0, max_new_tokens=120)
    for c in done:
        assert c.finish_reason == "stop" and valid(json.loads(c.text), ANSWER), c.text
    print(done[0].text, done[1].text, sep="\n")
