"""Render a checkpoint's chat template (Jinja) the way transformers does, inside a bounded jinja2 sandbox.

jinja2's ImmutableSandboxedEnvironment keeps a template away from Python internals; `BoundedSandbox` also
bounds what it may allocate and compute, per render (`Budget`): every string or sequence the template builds
(`+`, `*`, `~`, `%`, `**`, calls, filters) has at most `limit` items, and all of them together at most
16 × limit; an int argument over `limit` (a padding width, a range end) is refused before it is used; each
call, filter and loop iteration is one of at most STEPS (plus 64 per message) steps; the output has at most
`limit` characters.
`limit` is 1 Mi plus twice the size of the messages (their content and tool calls) and tools, so a long chat
is never refused. Whatever goes wrong while rendering (also jinja2's own range limit, a recursion too deep, a
TypeError) is one ArgumentError naming the chat template.
"""
import json
import re
import secrets
from contextvars import ContextVar
from datetime import datetime
from functools import wraps

from jinja2 import TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from toolkit.errors import ArgumentError, ModelFolderError

BASE_LIMIT = 1 << 20  # characters or items of one value, and of the output, before the input's share
STEPS = 1 << 18  # calls, filters and loop iterations per render, plus 64 per message (Qwen2.5's template: ~6)
WIDE_PERCENT = re.compile(r"%[^a-zA-Z%]*?(\*|\d{7})")  # "%9999999d": a width or precision of a million or more
WIDE_FORMAT = re.compile(r"\{[^{}]*:[^{}]*\d{7}")  # "{:>9999999}"
_budget: ContextVar["Budget"] = ContextVar("chat_template_budget")


class Budget:
    """What one render may still build and do."""

    def __init__(self, input_size: int, messages: int = 0):
        self.limit = BASE_LIMIT + 2 * input_size
        self.total, self.steps = 16 * self.limit, STEPS + 64 * messages

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TemplateError("too many calls and loop iterations")

    def check(self, n: int, what: str = "a value") -> None:
        """Refuse to build `what` of n items (checked before building it, where the size is known)."""
        if n > self.limit:
            raise TemplateError(f"{what} of {n} items (at most {self.limit})")

    def built(self, value):
        """Account for a value the template built: its weight (characters and items, nested ones included: a
        list holding one long string a million times weighs a million such strings) is at most `limit`, and
        all weights together at most `total`, which also bounds the time spent weighing."""
        n = weight(value, min(self.limit, self.total) + 1)
        self.check(n)
        self.total -= n
        if self.total < 0:
            raise TemplateError(f"builds more than {16 * self.limit} items in all")
        return value


def size(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict, set)) else 0


def weight(value, cap: int) -> int:
    """Characters of strings plus items of containers in `value`, nested ones included; stops past `cap`."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, dict, set)):
        return 0
    n = len(value)
    for item in (x for kv in value.items() for x in kv) if isinstance(value, dict) else value:
        if n > cap:
            break
        n += weight(item, cap - n)
    return n


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the operators, calls and filters that build values bounded (see the module)."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context, operator, left, right):
        budget = _budget.get()
        budget.step()
        if operator == "*":
            times = right if size(left) else left if size(right) else 0
            if type(times) is int:
                budget.check(times * max(size(left), size(right)), "a repetition")
        elif operator == "+":
            budget.check(size(left) + size(right), "a concatenation")
        elif operator == "**" and type(left) is int and type(right) is int and abs(left) > 1:
            budget.check(right * abs(left).bit_length() // 8, "a power's bytes")
        elif operator == "%" and isinstance(left, str) and WIDE_PERCENT.search(left):
            raise TemplateError("a %-format width or precision of a million or more")
        return budget.built(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        budget = _budget.get()
        budget.step()
        check_arguments(budget, args, kwargs)
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name == "replace" and len(args) >= 2 and all(isinstance(a, str)
                                                                                 for a in args[:2]):
            hits = owner.count(args[0]) if args[0] else len(owner) + 1
            budget.check(len(owner) + hits * max(0, len(args[1]) - len(args[0])), "a replacement")
        elif isinstance(owner, str) and name == "join" and args:
            check_join(budget, owner, args[0])
        return budget.built(super().call(__context, __obj, *args, **kwargs))

    def getitem(self, obj, argument):
        value = super().getitem(obj, argument)
        return _budget.get().built(value) if isinstance(argument, slice) else value  # a slice is a copy

    def wrap_str_format(self, value):
        owner = getattr(value, "__self__", None)
        if getattr(value, "__name__", "") in ("format", "format_map") and isinstance(owner, str) \
                and WIDE_FORMAT.search(owner):
            raise TemplateError("a format width of a million or more")
        return super().wrap_str_format(value)


def check_arguments(budget: Budget, args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if type(a) is int and abs(a) > budget.limit:
            raise TemplateError(f"an argument of {a} (at most {budget.limit})")


def check_join(budget: Budget, separator, items) -> None:
    if isinstance(items, (list, tuple)) and isinstance(separator, str):
        budget.check(len(separator) * len(items) + sum(size(x) for x in items), "a join")


def bounded_filter(name: str, f):
    @wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
    def run(*args, **kwargs):
        budget = _budget.get()
        budget.step()
        values = [a for a in args if not hasattr(a, "environment")]  # skip a passed context / eval context
        check_arguments(budget, values[1:], kwargs)  # the arguments after the value filtered
        if name == "join" and values:
            check_join(budget, kwargs.get("d", values[1] if len(values) > 1 else ""), values[0])
        elif name == "sum" and values and isinstance(values[0], (list, tuple)):
            budget.check(sum(size(x) for x in values[0]), "a sum")
        elif name == "format" and values and isinstance(values[0], str) and WIDE_PERCENT.search(values[0]):
            raise TemplateError("a %-format width or precision of a million or more")
        return budget.built(f(*args, **kwargs))
    return run


def _loop(items):
    """A for loop's items, one step each (the compiled template iterates over this)."""
    budget = _budget.get()
    for item in items:
        budget.step()
        yield item


def _value(value):
    """A `~` concatenation's result, checked by BoundedSandbox.call like any call's."""
    return value


class Bounded(NodeTransformer):
    """Route every for loop's items and every `~` through BoundedSandbox.call (`_loop`, `_value`)."""

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name("__qe_loop", "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return nodes.Call(nodes.Name("__qe_value", "load"), [node], [], None, None, lineno=node.lineno)


def _raise(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template; `render(messages)` gives the prompt text for the model."""

    def __init__(self, source: str, special_tokens: dict):
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.filters = {name: bounded_filter(name, f) for name, f in env.filters.items()}
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                           __qe_loop=_loop, __qe_value=_value)
        try:
            tree = env.parse(source)
            self.template = env.from_string(Bounded().visit(tree))
        except Exception as e:  # TemplateSyntaxError, or a RecursionError on absurd nesting
            raise ModelFolderError(f"chat template: does not compile ({one_line(e)})") from None
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: list, add_generation_prompt: bool = True, tools=None) -> str:
        check_messages(messages)
        size = sum(len(m["content"]) + (len(str(m["tool_calls"])) if m.get("tool_calls") else 0) for m in messages)
        budget = Budget(size + (len(str(tools)) if tools else 0), len(messages))
        token = _budget.set(budget)
        try:
            out, length = [], 0
            for chunk in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=tools, **self.special_tokens):
                out.append(chunk)
                length += len(chunk)
                if length > budget.limit:
                    raise TemplateError(f"output over {budget.limit} characters")
            return "".join(out)
        except Exception as e:  # TemplateError (the sandbox's SecurityError too), the limits, any other failure
            raise ArgumentError(f"chat template: {type(e).__name__}: {one_line(e)}") from None
        finally:
            _budget.reset(token)

    def render_pieces(self, messages: list, literal_roles=("user", "tool"), add_generation_prompt: bool = True,
                      tools=None) -> list[tuple[str, bool]]:
        """The prompt as (text, literal) pieces: the content of the messages whose role is in `literal_roles`
        is literal (to be tokenized as plain text, special-token strings included), the rest is the template's.
        Each such content is rendered as a unique stand-in that is then split out; a template that changes or
        rewrites that content (so the stand-ins do not give back the real rendering) raises ArgumentError."""
        check_messages(messages)
        nonce, contents = secrets.token_hex(8), {}
        stand_ins = []
        for i, m in enumerate(messages):
            if m["role"] in literal_roles and m["content"]:
                mark = f"\ue000{nonce}.{i}\ue001"
                contents[mark] = m["content"]
                m = m | {"content": mark}
            stand_ins.append(m)
        rendered = self.render(stand_ins, add_generation_prompt, tools)
        parts = re.split(f"(\ue000{nonce}\\.\\d+\ue001)", rendered)
        pieces = [(contents[p], True) if k % 2 else (p, False) for k, p in enumerate(parts) if p]
        if "".join(p for p, _ in pieces) != self.render(messages, add_generation_prompt, tools):
            raise ArgumentError("chat template: it rewrites message content, so content cannot be kept literal "
                                "(literal_content needs a template that inserts content as is)")
        return pieces


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def check_messages(messages) -> None:
    """Messages are a non-empty list of {"role": str, "content": str} objects."""
    if not isinstance(messages, list) or not messages:
        raise ArgumentError("messages: expected a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ArgumentError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r:.80}")
