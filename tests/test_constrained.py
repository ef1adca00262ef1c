"""Constrained decoding (toolkit/constrained.py, llguidance): a random tiny model under a JSON schema or a Lark
grammar always writes what they allow; forced tool calls; the masks; the errors, llguidance missing included."""
import json
import re
import sys

import numpy as np
import pytest

import toolkit
from toolkit.constrained import compile_constraint
from toolkit.errors import ArgumentError

pytest.importorskip("llguidance")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
                         "kind": {"enum": ["cat", "dog", None]},
                         "score": {"type": "number"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {
    "type": "object", "additionalProperties": False, "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def valid(value, schema: dict) -> bool:
    """The few JSON-schema keywords these tests use (jsonschema is not a dependency)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if isinstance(kind, list):
        return any(valid(value, schema | {"type": k}) for k in kind)
    if kind == "null":
        return value is None
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and all(k in value for k in schema.get("required", []))
                and (schema.get("additionalProperties", True) is not False or set(value) <= set(props))
                and all(valid(v, props[k]) for k, v in value.items() if k in props))
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
                and all(valid(v, schema["items"]) for v in value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return (type(value) is int and schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


@pytest.fixture(scope="module")
def model(exported):
    return toolkit.load(exported("tied_fp32", bits=32), max_length=512)


@pytest.fixture(scope="module")
def tools_model(tools_folder):
    return toolkit.load(tools_folder)


def test_every_json_output_parses_and_validates(model):
    outputs = model.complete(["Describe a pet as JSON."] * 4, json_schema=PERSON, temperature=1.2, seed=7,
                             max_new_tokens=200)
    for seed in range(12):
        outputs += model.complete([f"pet {seed}"], json_schema=json.dumps(PERSON), temperature=1.0, top_p=0.95,
                                  seed=seed, max_new_tokens=200)
    for c in outputs:
        assert c.finish_reason == "stop", c.text
        assert valid(json.loads(c.text), PERSON), c.text
        assert c.token_ids[-1] not in model.eos_ids  # the grammar ended the row, no end token was needed
    assert len({c.text for c in outputs}) > 10  # sampling still samples


def test_greedy_and_streamed_output_follow_the_schema_too(model):
    text = model.generate("pet", json_schema=PERSON, temperature=0, max_new_tokens=200)
    assert valid(json.loads(text), PERSON)
    assert "".join(model.stream("pet", json_schema=PERSON, temperature=0, max_new_tokens=200)) == text


def test_a_lark_grammar(model):
    grammar = r'''
start: "answer: " word (", " word)* "."
word: /[a-z]{1,6}/
'''
    for seed in range(6):
        c = model.complete(["Say words."], grammar=grammar, temperature=1.0, seed=seed, max_new_tokens=120)[0]
        assert c.finish_reason == "stop" and re.fullmatch(r"answer: [a-z]{1,6}(, [a-z]{1,6})*\.", c.text), c.text
    assert model.generate("?", grammar='start: "yes" | "no"', temperature=1, seed=3) in ("yes", "no")


def test_max_new_tokens_can_cut_constrained_output(model):
    c = model.complete(["pet"], json_schema=PERSON, temperature=0, max_new_tokens=3)[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3 and c.text.startswith("{")


def test_the_mask_blocks_padding_and_all_the_grammar_forbids(model):
    constraint = compile_constraint(model, grammar='start: "yes" | "no"')
    matcher = constraint.matcher()
    logits = np.zeros(model.vocab_size, dtype=np.float32)
    masked = matcher.mask(logits)
    allowed = np.flatnonzero(np.isfinite(masked))
    assert masked is logits and 0 < allowed.size < 20
    assert allowed.max() < model.tokenizer.vocab_size  # the logits' padding past the tokenizer's tokens
    assert {model.tokenizer.decode([int(t)])[:1] for t in allowed} <= {"y", "n"}
    for t in model.tokenizer.encode("yes"):
        matcher.consume(t)
    assert matcher.done
    assert set(np.flatnonzero(np.isfinite(matcher.mask(np.zeros(model.vocab_size, np.float32))))) <= model.eos_ids


def test_forced_tool_calls(tools_model):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for seed in range(4):
        answer = tools_model.chat(messages, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False,
                                  temperature=1.0, seed=seed, max_new_tokens=120)
        assert answer.finish_reason == "tool_calls" and answer.errors == [] and answer.content == ""
        [call] = answer.tool_calls
        tool = {"get_weather": WEATHER, "now": CLOCK}[call.name]
        assert valid(call.arguments, tool["function"]["parameters"]), call
        assert answer.text == ('<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
                               % (call.name, call.arguments_json))
    named = {"type": "function", "function": {"name": "now"}}
    items = list(tools_model.chat(messages, tools=[WEATHER, CLOCK], tool_choice=named, stream=True, temperature=1.0,
                                  seed=1, max_new_tokens=120))
    assert len(items) == 1 and items[0].name == "now" and valid(items[0].arguments, CLOCK["function"]["parameters"])


def test_a_chat_session_with_tools_calls_then_answers_with_the_result(tools_model):
    chat = tools_model.chat_session(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                    temperature=0.8, seed=5, max_new_tokens=120)
    answer = chat.send("Weather in Oslo?")
    [call] = answer.tool_calls
    assert chat.history[-1] == {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]}
    chat.tools = toolkit.tool_spec.tool_request([WEATHER], "none")  # the result in, a plain answer out
    reply = chat.send({"role": "tool", "tool_call_id": call.id, "content": "4 C"}, max_new_tokens=5)
    assert reply.tool_calls == [] and chat.history[-2]["role"] == "tool"
    assert chat.last.reused_tokens > 0  # the turn with the call stayed in the cache


def test_json_schema_with_tools_auto_is_that_json_or_calls(tools_model):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for seed in range(4):
        answer = tools_model.chat([{"role": "user", "content": "hi"}], tools=[CLOCK], json_schema=schema,
                                  temperature=1.0, seed=seed, max_new_tokens=150)
        assert answer.finish_reason in ("stop", "tool_calls") and answer.errors == []
        assert answer.tool_calls or valid(json.loads(answer.content), schema)


def test_bad_grammars_and_combinations(model):
    for kwargs, message in [
        (dict(grammar="start: foo"), "grammar: does not compile"),
        (dict(grammar=""), "grammar: expected a Lark grammar"),
        (dict(json_schema="{not json"), "json_schema: not valid JSON"),
        (dict(json_schema=[1]), "json_schema: expected a JSON schema object"),
        (dict(json_schema={"type": "object"}, grammar='start: "a"'), "grammar and json_schema: give one"),
        (dict(json_schema={"type": "object"}, lookup=4, temperature=0), "json_schema: constrained output decodes "
                                                                        "without lookup"),
    ]:
        with pytest.raises(ArgumentError, match=message):
            model.generate("x", **kwargs)
    with pytest.raises(ArgumentError, match="grammar: cannot be combined with tool_choice"):
        model.chat([{"role": "user", "content": "x"}], tools=[CLOCK], tool_choice="required", grammar='start: "a"')


def test_without_llguidance_the_error_says_how_to_install_it(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(ArgumentError, match=r"json_schema: constrained output needs llguidance, which is not "
                                            r"installed \(pip install 'qwen-edge\[constrained\]'\)"):
        model.generate("x", json_schema={"type": "object"})
    with pytest.raises(ArgumentError, match=r"^grammar: constrained output needs llguidance"):
        model.chat_session().send("x", grammar='start: "a"')
    assert model.generate("x", max_new_tokens=2, temperature=0)  # unconstrained output does not need it


@pytest.mark.parametrize("nonzero_words", [0, 3, 256, 257, 2000])
def test_apply_mask_sparse_and_dense_paths_agree(nonzero_words):
    from toolkit.constrained import apply_mask

    rng = np.random.default_rng(nonzero_words)
    vocab = 32 * 2000 - 7  # the last word's top bits are past the vocabulary
    words = np.zeros(2000, dtype=np.int32)
    picked = rng.choice(2000, nonzero_words, replace=False)
    words[picked] = rng.integers(-2 ** 31, 2 ** 31 - 1, nonzero_words, dtype=np.int64).astype(np.int32)
    words[picked[:1]] = -1
    logits = rng.standard_normal(vocab).astype(np.float32)
    want = np.where(np.unpackbits(words.view(np.uint8), count=vocab, bitorder="little") == 1, logits, -np.inf)
    apply_mask(words, logits)
    assert np.array_equal(logits, want)


def test_constrained_generation_imports_neither_torch_nor_transformers(exported):
    import subprocess

    code = ("import sys, toolkit; m = toolkit.load(sys.argv[1]); "
            "m.generate('hi', json_schema={'type': 'object'}, max_new_tokens=3); "
            "bad = [n for n in ('torch', 'transformers', 'export') if n in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(exported("tied_fp32", bits=32))], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
