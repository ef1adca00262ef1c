"""Tool calls: parsing <tool_call> blocks whole and as they stream (toolkit/tools.py), the server's delta and
message shapes (toolkit/server_tools.py), checking tools and tool_choice (toolkit/tool_spec.py), and rendering
tools, calls and results with Qwen2.5's real chat template on a tiny model."""
import json
import random
from pathlib import Path

import pytest

import toolkit
from toolkit.chat_template import ChatTemplate
from toolkit.errors import ArgumentError
from toolkit.tool_spec import tool_messages, tool_request
from toolkit.tools import ToolCall, ToolCallStream, parse_tool_calls

TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5_chat_template.jinja").read_text(encoding="utf-8")
SPECIALS = {"bos_token": None, "eos_token": "<|im_end|>"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def streamed(text: str, seed: int):
    """`text` through a ToolCallStream in random pieces: (result, events)."""
    rng, stream, events, i = random.Random(seed), ToolCallStream(), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        events += stream.push(text[i:i + n])
        i += n
    events += stream.finish()
    return stream.result(), events


def arguments_by_index(events) -> dict:
    out = {}
    for e in events:
        if e.kind == "arguments":
            out[e.index] = out.get(e.index, "") + e.text
    return out


# -- parsing -------------------------------------------------------------------------------------------

def test_one_call_with_text_before_it():
    parsed = parse_tool_calls("Let me check.\n" + CALL)
    assert parsed.content == "Let me check." and parsed.errors == []
    [call] = parsed.tool_calls
    assert (call.name, call.arguments, call.arguments_json) == ("get_weather", {"city": "Paris"}, '{"city": "Paris"}')
    assert call.id.startswith("call_") and len(call.id) == 29 and call.error is None
    assert call.to_openai() == {"id": call.id, "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_several_calls_nested_arguments_and_text_after():
    text = (CALL + '\n<tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, {"c": "}"}]}, "d": "</tool"}}\n'
            "</tool_call>\nDone.")
    parsed = parse_tool_calls(text)
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "f"]
    assert parsed.tool_calls[1].arguments == {"a": {"b": [1, {"c": "}"}]}, "d": "</tool"}
    assert parsed.content == "Done." and parsed.errors == []
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_arguments_as_a_json_string_and_keys_in_another_order():
    for body in ('{"name": "f", "arguments": "{\\"x\\": 1}"}', '{"arguments": {"x": 1}, "name": "f"}'):
        [call] = parse_tool_calls(f"<tool_call>\n{body}\n</tool_call>").tool_calls
        assert (call.name, call.arguments, json.loads(call.arguments_json)) == ("f", {"x": 1}, {"x": 1})


def test_invalid_json_is_reported_not_raised():
    parsed = parse_tool_calls('Hi <tool_call>\n{"name": "f", "arguments": {"x": 1,}}\n</tool_call> there')
    [call] = parsed.tool_calls
    assert call.arguments is None and call.arguments_json == '{"x": 1,}' and "not valid JSON" in call.error
    assert parsed.content == "Hi there" and parsed.errors == [f"tool call 0 (f): {call.error}"]
    # not a call at all: the block stays in the content as written
    text = "Hi <tool_call>\n{nonsense}\n</tool_call> there"
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == [] and parsed.content == text
    assert parsed.errors == ["tool call 0: not a JSON object with a name and arguments; kept as text"]


def test_unclosed_blocks():
    parsed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}')  # complete but unclosed
    assert parsed.tool_calls[0].arguments == {"x": 1} and parsed.tool_calls[0].error is None
    assert parsed.errors == ["tool call 0 (f): the answer ended before </tool_call>"]
    parsed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": ')  # cut inside the arguments
    assert parsed.tool_calls[0].error == "its JSON object is not closed"
    parsed = parse_tool_calls("So: <tool_call>\n{oops")
    assert parsed.tool_calls == [] and parsed.content == "So: <tool_call>\n{oops" and len(parsed.errors) == 1


def test_unknown_function_and_plain_text():
    parsed = parse_tool_calls(CALL, names=["other"])
    assert parsed.tool_calls[0].error == "no function named 'get_weather' was offered"
    text = "a < b and <tool_ and </tool_call> are just text  "
    assert parse_tool_calls(text).content == text and parse_tool_calls(text).errors == []


@pytest.mark.parametrize("text", [
    "Let me check.\n" + CALL,
    CALL + "\n" + CALL.replace("Paris", "Oslo") + "\n",
    '<tool_call>\n{"name": "f", "arguments": {"a": {"b": "}}"}} }\n</tool_call>',
    '<tool_call>\n{"arguments": {"x": 1}, "name": "b"}\n</tool_call>',
    'x <tool_call>\n{"name": "b", "arguments": {"x": 1,}}\n</tool_call> y',
    "x <tool_call>\n{nonsense}\n</tool_call> y",
    '<tool_call>\n{"name": "b", "arguments": {"x": ',
    "plain text with a < and a <tool and spaces  ",
])
def test_streaming_in_any_pieces_gives_the_whole_parse(text):
    whole = parse_tool_calls(text)
    for seed in range(25):
        result, events = streamed(text, seed)
        assert result.content == whole.content
        assert [(c.name, c.arguments_json, c.error) for c in result.tool_calls] == \
               [(c.name, c.arguments_json, c.error) for c in whole.tool_calls]
        assert "".join(e.text for e in events if e.kind == "content") == whole.content
        args = arguments_by_index(events)
        assert [args.get(i, "") for i in range(len(result.tool_calls))] == [c.arguments_json for c in result.tool_calls]
        assert [e.index for e in events if e.kind == "call"] == list(range(len(result.tool_calls)))


def test_arguments_stream_before_the_block_closes():
    stream = ToolCallStream()
    events = stream.push('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert [e.kind for e in events] == ["call", "arguments"] and events[0].call.name == "get_weather"
    assert events[1].text == '{"city": "Par'
    assert stream.push('is"}')[0].text == 'is"'  # the closing brace may still be the object's own: held
    assert [e.kind for e in stream.push("}\n</tool_call>")] == ["arguments", "done"]


# -- the server's shapes ---------------------------------------------------------------------------------

def test_streamed_deltas_are_openais():
    from toolkit.server_tools import Deltas, message

    request = tool_request([WEATHER])
    text = "Checking.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo")
    for seed in range(10):
        deltas, rng, i, out = Deltas(request), random.Random(seed), 0, []
        while i < len(text):
            n = rng.randint(1, 7)
            out += deltas.push(text[i:i + n])
            i += n
        out += deltas.finish()
        assert "".join(d.get("content", "") for d in out) == "Checking."
        calls = [d["tool_calls"][0] for d in out if "tool_calls" in d]
        firsts = [c for c in calls if "id" in c]
        assert [c["index"] for c in firsts] == [0, 1]
        for c in firsts:
            assert c["type"] == "function" and c["function"] == {"name": "get_weather", "arguments": ""}
            assert c["id"].startswith("call_")
        args = ["".join(c["function"]["arguments"] for c in calls if c["index"] == k) for k in (0, 1)]
        assert [json.loads(a) for a in args] == [{"city": "Paris"}, {"city": "Oslo"}]
        assert all("<tool_call>" not in d.get("content", "") for d in out)
        assert deltas.finish_reason("stop") == "tool_calls" and deltas.finish_reason("length") == "length"
    msg, reason = message(text, "stop", request)
    assert reason == "tool_calls" and msg["content"] == "Checking." and len(msg["tool_calls"]) == 2
    assert message(CALL, "stop", tool_request([WEATHER], "none")) == ({"role": "assistant", "content": CALL}, "stop")
    msg, reason = message(CALL, "stop", request)
    assert msg["content"] is None and reason == "tool_calls"


# -- tools, tool_choice, messages ---------------------------------------------------------------------

def test_tools_and_tool_choice_are_checked():
    bare = tool_request([{"name": "f"}])  # Qwen's own form, no parameters
    assert bare.tools == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                           "properties": {}}}}]
    for tools, choice, message in [
        ([], "auto", "tools: expected a list of 1 to 128"),
        ("x", "auto", "tools: expected a list"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "auto", "tools[0].type: expected 'function'"),
        ([{"type": "function", "function": {"name": "a b"}}], "auto", "tools[0].function.name: expected 1 to 64"),
        ([{"name": "f"}, {"name": "f"}], "auto", "tools[1].name: 'f' is given twice"),
        ([{"name": "f", "parameters": []}], "auto", "tools[0].parameters: expected a JSON schema object"),
        ([{"name": "f", "description": 3}], "auto", "tools[0].description: expected a string"),
        ([{"name": "f"}], "sometimes", "tool_choice 'sometimes': expected one of auto, none, required"),
        ([{"name": "f"}], {"type": "function", "function": {"name": "g"}}, "'g' is not one of the tools"),
        ([{"name": "f"}], {"type": "function"}, "tool_choice.function.name: expected the name"),
        ([{"name": "f"}], 3, "tool_choice: expected one of"),
    ]:
        with pytest.raises(ArgumentError, match=message.replace("[", r"\[").replace("(", r"\(")):
            tool_request(tools, choice)
    with pytest.raises(ArgumentError, match="parallel_tool_calls: expected true or false"):
        tool_request([{"name": "f"}], "auto", "yes")


def test_the_forced_call_grammar_is_llguidance_lark():
    grammar = tool_request([WEATHER, {"name": "now"}], "required", parallel_tool_calls=False).grammar()
    assert grammar.startswith('start: call\ncall: "<tool_call>\\n" (f0 | f1) "\\n</tool_call>"')
    assert '"name": {"const": "get_weather"}' in grammar and '"required": ["city"]' in grammar
    assert tool_request([WEATHER], "required").grammar().startswith('start: call ("\\n" call)*')
    named = tool_request([WEATHER, {"name": "now"}], {"type": "function", "function": {"name": "now"}}).grammar()
    assert '"const": "now"' in named and "get_weather" not in named
    assert tool_request([WEATHER]).grammar() is None
    assert tool_request([WEATHER]).grammar({"type": "object"}).startswith("start: answer | calls")


# -- rendering with Qwen2.5's template ----------------------------------------------------------------

def test_the_template_renders_tools_calls_and_results():
    template = ChatTemplate(TEMPLATE, SPECIALS)
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    text = template.render(tool_messages(messages), tools=tool_request([WEATHER]).rendered)
    assert "# Tools" in text and json.dumps(WEATHER, ensure_ascii=False) in text
    assert "<|im_start|>assistant\n" + CALL + "<|im_end|>" in text  # the call as the model writes it
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "# Tools" not in template.render([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def model(tools_folder):
    return toolkit.load(tools_folder)


def test_chat_with_tools_renders_them_and_answers_with_a_tool_answer(model):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = model.encode(tool_messages(messages), tools=[WEATHER])
    assert len(with_tools) > len(model.encode(messages)) + 50
    answer = model.chat(messages, tools=[WEATHER], temperature=0, max_new_tokens=8)
    assert isinstance(answer, toolkit.ToolAnswer) and answer.finish_reason in ("stop", "length")
    # tool_choice "none": the tools are not rendered, nothing is parsed
    none = model.chat(messages, tools=[WEATHER], tool_choice="none", temperature=0, max_new_tokens=8)
    assert none.text == model.chat(messages, temperature=0, max_new_tokens=8) and none.tool_calls == []
    items = list(model.chat(messages, tools=[WEATHER], stream=True, temperature=0, max_new_tokens=8))
    assert all(isinstance(i, (str, ToolCall)) for i in items)
    with pytest.raises(ArgumentError, match="tool_choice, parallel_tool_calls: need tools"):
        model.chat(messages, tool_choice="required")


def test_a_tool_result_continues_the_chat(model):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None,
                                                                   "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"}]
    answer = model.chat(messages, tools=[WEATHER], temperature=0, max_new_tokens=6)
    rendered = model.tokenizer.decode(model.encode(tool_messages(messages), tools=[WEATHER]))
    assert "4 C, rain" in rendered and '"arguments": {"city": "Oslo"}' in rendered
    assert answer.finish_reason in ("stop", "length", "tool_calls")


def test_calls_in_openais_form_render_as_the_model_wrote_them_without_tools_too(model):
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Oslo?"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    text = model.tokenizer.decode(model.encode(messages))
    assert CALL.replace("Paris", "Oslo") in text and '"{\\"city' not in text
    with pytest.raises(ArgumentError, match=r"messages\[1\].tool_calls: expected a list of calls"):
        model.encode([messages[0], {"role": "assistant", "content": "", "tool_calls": "x"}])
