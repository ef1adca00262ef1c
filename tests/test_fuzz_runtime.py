"""Fuzzing the runtime's inputs with hypothesis: mutated manifests, chat templates from a small grammar of
Jinja snippets, and the Python API's arguments. Each case either succeeds or raises a QwenEdgeError with a
one-line message: never another exception, a hang or a large allocation. Inputs are bounded (small values,
few mutations); each target counts its cases, prints the counts, and fails if fewer than MIN_CASES ran."""
import json
import resource
import shutil
import signal
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import toolkit
from toolkit.chat_template import ChatTemplate
from toolkit.errors import QwenEdgeError
from tiny import CHATML  # tests/ is on sys.path (conftest.py)

MIN_CASES = 50
COUNTS = {"manifest": 0, "template": 0, "api": 0, "session": 0}  # cases run
PASSED = dict.fromkeys(COUNTS, 0)  # ... of which the last call succeeded (the rest raised a QwenEdgeError)
FUZZ = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@contextmanager
def bounded(seconds: int = 20):
    """Fail a case that runs longer than `seconds` (a hang) or grows the process's peak memory by 1 GiB."""
    def timeout(*_):
        raise TimeoutError(f"a case ran over {seconds} s")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 1 << 20, f"peak memory grew by {grown} KiB"


def expect_success_or_one_line(call):
    """Run `call`; a QwenEdgeError is fine if its message is one line. Returns the result or None."""
    try:
        return call()
    except QwenEdgeError as e:
        text = str(e)
        assert text and "\n" not in text and len(text) < 1000, repr(text)
        return None


def report(target: str) -> None:
    print(f"\nfuzz {target}: {COUNTS[target]} cases, {PASSED[target]} succeeded")
    assert COUNTS[target] >= MIN_CASES, f"only {COUNTS[target]} {target} cases ran"


# -- manifests -------------------------------------------------------------------------------------------

def json_paths(node, prefix=()):
    """Every path (a tuple of keys / indices) into a JSON value, the root's children first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from json_paths(v, prefix + (k,))


SPECIAL_VALUES = [0, -1, 1, 2, 3, 15, 16, 320, 1024, 1025, 2 ** 24, 2 ** 31, 2 ** 63, 10 ** 30, 0.5, -0.0, 1e308,
                  float("inf"), float("-inf"), float("nan"), True, False, None, "", "x", "{layer}", "{layer.__class__}",
                  "{0}", "../prefill.onnx", "/etc/passwd", "prefill.onnx", "model.weights", "tokenizer.json",
                  "a\u0000b", "float16", "int8", "cuda", "portable", "0" * 64, [], {}, [0], {"file": "prefill.onnx"}]
json_values = st.recursive(
    st.one_of(st.sampled_from(SPECIAL_VALUES), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@st.composite
def mutations(draw, manifest: dict):
    """A few edits of the manifest: set a value at an existing path, delete a key or item, add a key."""
    paths = list(json_paths(manifest))
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "add", "nudge"]))
        edits.append((kind, path, draw(json_values), draw(st.text(max_size=8)), draw(st.integers(-3, 3))))
    return edits


def apply(manifest: dict, edits) -> dict:
    data = json.loads(json.dumps(manifest))
    for kind, path, value, key, delta in edits:
        parent = data
        try:
            for k in path[:-1]:
                parent = parent[k]
            last = path[-1]
            if kind == "set":
                parent[last] = value
            elif kind == "delete":
                del parent[last]
            elif kind == "add" and isinstance(parent[last], dict):
                parent[last][key] = value
            elif kind == "nudge" and type(parent[last]) is int:
                parent[last] += delta
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced the path
            pass
    return data


@pytest.fixture(scope="module")
def scratch(exported, tmp_path_factory):
    """A copy of a tiny export whose manifest each case rewrites (the other files are never changed)."""
    folder = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(exported("tied_fp32", bits=32), folder)
    return folder


def test_mutated_manifests_load_or_raise_one_line(scratch):
    original = json.loads((scratch / "qwen-edge.json").read_text())

    @settings(max_examples=150, **FUZZ)
    @given(mutations(original))
    def case(edits):
        COUNTS["manifest"] += 1
        (scratch / "qwen-edge.json").write_text(json.dumps(apply(original, edits)), encoding="utf-8")
        with bounded():
            model = expect_success_or_one_line(lambda: toolkit.load(scratch, max_length=32))
            if model is not None:  # what loads must also run, or refuse with one line
                expect_success_or_one_line(lambda: model.generate("hi", max_new_tokens=2, temperature=0))
                done = expect_success_or_one_line(lambda: model.generate([{"role": "user", "content": "hi"}],
                                                                         max_new_tokens=2))
                PASSED["manifest"] += done is not None

    case()
    (scratch / "qwen-edge.json").write_text(json.dumps(original), encoding="utf-8")
    report("manifest")


# -- chat templates ----------------------------------------------------------------------------------------

def template_grammar():
    """Jinja snippets built from literals, operators, filters, methods, loops, namespaces and macros: enough to
    try every bound (repetition, concatenation, powers, formats, ranges, recursion, output size)."""
    numbers = st.sampled_from(["0", "1", "3", "10", "1000", "100000", "10**6", "10**8", "-1", "2**40"])
    strings = st.sampled_from(["'a'", "'ab'", "''", "'%s'", "'%099999999d'", "'{}'", "'{:>99999999}'",
                               "messages[0]['content']", "'<|im_end|>'"])
    lists = st.sampled_from(["[1, 2]", "[]", "messages", "['x'] * 3", "range(5)"])
    atoms = st.one_of(numbers, strings, lists)

    def grow(inner):
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "*", "**", "%", "~", "//", "-"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(inner, st.sampled_from(["upper", "list", "length", "join", "join('--')", "tojson", "string",
                                              "replace('a', 'bbbb')", "center(10**7)", "indent(4)", "reverse",
                                              "format(1, 2)", "sum", "first", "trim", "unique", "batch(2)",
                                              "wordwrap(3)", "int", "float", "abs"])).map(
                lambda t: f"({t[0]} | {t[1]})"),
            st.tuples(inner, st.sampled_from(["format(1)", "center(99999999)", "replace('', 'xyz')", "split()",
                                              "join(['a', 'b'])", "upper()", "zfill(10**8)", "__class__",
                                              "items()", "keys()"])).map(lambda t: f"{t[0]}.{t[1]}"),
            st.tuples(inner).map(lambda t: f"range({t[0]})"),
            st.tuples(inner, inner).map(lambda t: f"{t[0]}[{t[1]}]"),
        )

    expressions = st.recursive(atoms, grow, max_leaves=4)

    def blocks(inner):
        return st.one_of(
            st.tuples(expressions, inner).map(lambda t: f"{{% for x in {t[0]} %}}{t[1]}{{% endfor %}}"),
            st.tuples(expressions, inner).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% else %}}x{{% endif %}}"),
            st.tuples(expressions, expressions, inner).map(
                lambda t: f"{{% set ns = namespace(v={t[0]}) %}}{{% for i in range(40) %}}"
                          f"{{% set ns.v = ns.v ~ {t[1]} %}}{t[2]}{{% endfor %}}{{{{ ns.v | length }}}}"),
            st.tuples(inner).map(lambda t: f"{{% macro f(n) %}}{t[0]}{{% if n %}}{{{{ f(n - 1) }}}}{{{{ f(n - 1) }}}}"
                                           f"{{% endif %}}{{% endmacro %}}{{{{ f(30) }}}}"),
            st.tuples(inner, inner).map(lambda t: t[0] + t[1]),
        )

    leaves = st.one_of(expressions.map(lambda e: f"{{{{ {e} }}}}"), st.just("text"),
                       st.just("{{ raise_exception('no') }}"),
                       st.just("{% for m in messages %}{{ m.role }}{{ m.content }}{% endfor %}"))
    return st.recursive(leaves, blocks, max_leaves=5)


def test_generated_templates_render_or_raise_one_line():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi <|im_end|>"}]

    @settings(max_examples=250, **FUZZ)
    @given(template_grammar())
    def case(source):
        COUNTS["template"] += 1
        with bounded():
            template = expect_success_or_one_line(lambda: ChatTemplate(source, {"eos_token": "<|im_end|>"}))
            if template is not None:
                out = expect_success_or_one_line(lambda: template.render(messages))
                assert out is None or len(out) <= (1 << 20) + 100
                PASSED["template"] += out is not None
                expect_success_or_one_line(lambda: template.render_pieces(messages))

    case()
    report("template")


# -- the Python API's arguments ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(exported):
    return toolkit.load(exported("tied_fp32", bits=32), max_length=256)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 66, 2 ** 66), st.sampled_from([0, 1, 2, 5, 319, 320]),
                    st.floats(), st.text(max_size=8), st.sampled_from([np.int64(3), np.float32(0.5), np.int8(-1)]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(["role", "content", "x"]),
                                                                       inner, max_size=3)), max_leaves=8)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                           "content": st.text(max_size=20)}), min_size=1, max_size=3)
good_prompts = st.one_of(st.text(min_size=1, max_size=30), messages,
                         st.lists(st.integers(0, 319), min_size=1, max_size=6))
prompts = st.one_of(good_prompts, good_prompts, values, st.lists(st.integers(-5, 400), max_size=6),
                    st.lists(st.one_of(st.text(max_size=10), messages), min_size=1, max_size=3))
GOOD_OPTIONS = {"max_new_tokens": st.integers(1, 4), "temperature": st.sampled_from([0, 0.7, 1.0]),
                "top_k": st.integers(0, 50), "top_p": st.floats(0.05, 1.0), "repetition_penalty": st.floats(0.5, 2.0),
                "seed": st.integers(0, 2 ** 64), "stop": st.sampled_from([(), "x", ["a", "b"], "\n"]),
                "lookup": st.sampled_from([0, 2]), "draft": st.just(False), "draft_tokens": st.integers(1, 16),
                "literal_content": st.booleans()}
random_values = st.one_of(values, st.sampled_from([0, 1, 3, 0.0, 0.7, 1e-300, 1e300, 2, -1, "x", ["x"], True]))
good_options = st.lists(st.sampled_from(sorted(GOOD_OPTIONS)), unique=True, max_size=4).flatmap(
    lambda names: st.fixed_dictionaries({n: GOOD_OPTIONS[n] for n in names}))
options = st.lists(st.sampled_from(sorted(GOOD_OPTIONS)), unique=True, max_size=4).flatmap(
    lambda names: st.fixed_dictionaries({n: st.one_of(GOOD_OPTIONS[n], GOOD_OPTIONS[n], random_values)
                                         for n in names}))


def bounded_options(opts: dict) -> dict:
    """Cap the one option that sets how much work a valid call does (the context caps it anyway)."""
    n = opts.get("max_new_tokens")
    if type(n) is int and n > 4:
        opts = opts | {"max_new_tokens": 4}
    return opts


def test_api_arguments_succeed_or_raise_one_line(model):
    @settings(max_examples=200, **FUZZ)
    @given(prompts, options, st.sampled_from(["generate", "stream", "complete", "chat", "run", "encode"]))
    def case(prompt, opts, entry):
        COUNTS["api"] += 1
        opts = bounded_options(opts)
        calls = {
            "generate": lambda: model.generate(prompt, **opts),
            "stream": lambda: list(model.stream(prompt, **opts)),
            "complete": lambda: model.complete(prompt, **opts),
            "chat": lambda: model.chat(prompt, **opts),
            "run": lambda: list(model.run(prompt, **{k: v for k, v in opts.items() if k != "literal_content"})),
            "encode": lambda: model.encode(prompt, literal_content=opts.get("literal_content", False)),
        }
        with bounded():
            PASSED["api"] += expect_success_or_one_line(calls[entry]) is not None

    case()
    report("api")


def test_chat_session_arguments_succeed_or_raise_one_line(model):
    @settings(max_examples=100, **FUZZ)
    @given(st.one_of(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20), values), good_options,
           options, st.booleans())
    def case(text, defaults, opts, stream):
        COUNTS["session"] += 1
        with bounded():
            chat = expect_success_or_one_line(lambda: model.chat_session(system="S", **bounded_options(defaults)))
            if chat is None:
                return
            before = chat.history
            answer = expect_success_or_one_line(lambda: chat.send(text, stream=stream, **bounded_options(opts)))
            if stream and answer is not None:
                answer = expect_success_or_one_line(lambda: "".join(answer))
            PASSED["session"] += answer is not None
            if answer is None:
                assert chat.history == before  # a refused turn leaves the conversation as it was
            else:
                assert chat.history[-2:] == [{"role": "user", "content": text}, {"role": "assistant",
                                                                                 "content": answer}]

    case()
    report("session")


def test_the_chatml_template_survives_random_content():
    template = ChatTemplate(CHATML, {})

    @settings(max_examples=60, **FUZZ)
    @given(messages)
    def case(chat):
        pieces = template.render_pieces(chat)
        assert "".join(p for p, _ in pieces) == template.render(chat)
        assert [p for p, literal in pieces if literal] == [m["content"] for m in chat
                                                           if m["role"] in ("user", "tool") and m["content"]]

    case()
