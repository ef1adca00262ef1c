"""Tool calls in a Qwen2.5 answer: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, parsed
into ToolCall objects, whole (`parse_tool_calls`) or as the answer streams (`ToolCallStream`).

    parsed = parse_tool_calls('Let me look.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    parsed.content, parsed.tool_calls[0].name, parsed.tool_calls[0].arguments   # 'Let me look.', 'f', {'x': 1}

Both give the same result: `parse_tool_calls` runs the stream over the whole text. The stream emits Events:
("content", text) for text outside the blocks (never the markup; whitespace just before a call, at the end of an
answer with calls, and before the first text that follows its calls is dropped); for each call ("call", index,
its id and name) once `{"name": "...", "arguments": ` has been read, ("arguments", index, fragment) as its
arguments arrive (the model's own text of the arguments object, so the fragments joined are the call's
`arguments_json`), and ("done", index, the finished ToolCall).

A block written differently (keys in another order, arguments given as a JSON string) is held until its
`</tool_call>` and then parsed whole. Malformed output never raises: a block that is not a call (invalid JSON,
no name) stays in the content as written, with an error in `errors`; a call whose arguments are not valid JSON
keeps the model's text in `arguments_json`, `arguments` None and an `error`; a block the answer ends inside is
parsed as far as it got (a complete call is kept, with a note in `errors`).
"""
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterator

OPEN, CLOSE = "<tool_call>", "</tool_call>"
HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    """An id for a call, as OpenAI's: call_ and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One call of a function: its name, its arguments (parsed JSON, usually a dict; None when `arguments_json`
    is not valid JSON) and their text as the model wrote it; `error` says what is wrong with it, if anything."""

    name: str
    arguments: Any
    arguments_json: str
    id: str = field(default_factory=new_call_id)
    error: str | None = None

    def to_openai(self) -> dict:
        """OpenAI's form: {"id", "type": "function", "function": {"name", "arguments": a JSON string}}."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}


@dataclass
class ParsedAnswer:
    """An answer split into its text (outside the calls) and its tool calls, with what could not be parsed."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def message(self) -> dict:
        """The assistant message to append to a chat's history (the chat template renders its tool_calls)."""
        out = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return out


@dataclass
class ToolAnswer(ParsedAnswer):
    """A chat answer given tools (Model.chat, ChatSession.send): the parsed answer, the model's raw text and
    why it ended ("tool_calls" when it called a tool and stopped, else "stop" or "length")."""

    text: str = ""
    finish_reason: str = "stop"


@dataclass
class Event:
    """One step of a streamed answer: kind "content" (text), "call" (index, call: its id and name), "arguments"
    (index, text: a fragment of the call's arguments) or "done" (index, call: the finished ToolCall)."""

    kind: str
    text: str = ""
    index: int = -1
    call: ToolCall | None = None


class ToolCallStream:
    """Feed an answer's text pieces to `push` as they are decoded, then call `finish`; each returns the Events
    that became final. `result()` is the ParsedAnswer so far. `names`: the functions that exist (a call of
    another gets an error), or None to accept any."""

    def __init__(self, names=None):
        self.names = None if names is None else set(names)
        self.content, self.calls, self.errors = [], [], []
        self.text = ""  # outside a block: text not emitted yet; inside: the block's body so far
        self.inside = False
        self.blocks = 0  # blocks opened so far (errors name them by number)
        self.space = ""  # whitespace held back: emitted before more content, dropped before a call and at the end
        self.block_space = ""  # the whitespace before the open block (given back if it is not a call)
        self.call: ToolCall | None = None  # the call being streamed (its header has been read)
        self.args_start = self.sent = 0  # where its arguments start in the body; characters of them emitted

    def push(self, piece: str) -> list[Event]:
        self.text += piece
        events = []
        while True:
            if not self.inside:
                at = self.text.find(OPEN)
                if at < 0:
                    keep = partial_suffix(self.text, OPEN)
                    events += self._content(self.text[:len(self.text) - keep])
                    self.text = self.text[len(self.text) - keep:]
                    return events
                events += self._content(self.text[:at])
                self.text, self.inside, self.block_space, self.space = self.text[at + len(OPEN):], True, self.space, ""
                self.blocks += 1
            else:
                at = self.text.find(CLOSE)
                if at < 0:
                    return events + self._stream_arguments(self.text)
                body, self.text = self.text[:at], self.text[at + len(CLOSE):]
                events += self._stream_arguments(body) + self._end_block(body, closed=True)

    def finish(self) -> list[Event]:
        """The rest, at the end of the answer: held-back text, a block left open."""
        events = []
        if self.inside:
            body, self.text = self.text, ""
            events += self._stream_arguments(body) + self._end_block(body, closed=False)
        else:
            events += self._content(self.text)
            self.text = ""
        if self.space and not self.calls:
            events.append(self._emit_content(self.space))
        self.space = ""
        return events

    def result(self) -> ParsedAnswer:
        return ParsedAnswer("".join(self.content), list(self.calls), list(self.errors))

    # -- content -------------------------------------------------------------------------------------

    def _content(self, text: str) -> list[Event]:
        if self.calls and not self.content:  # the first text after calls: from its first non-space character
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self.space += text
            return []
        out = [self._emit_content(self.space + body)]
        self.space = text[len(body):]
        return out

    def _emit_content(self, text: str) -> Event:
        self.content.append(text)
        return Event("content", text)

    # -- calls ---------------------------------------------------------------------------------------

    def _stream_arguments(self, body: str) -> list[Event]:
        """Inside a block whose body so far is `body`: once the header is read and the arguments are an object,
        emit what is final of them."""
        events = []
        if self.call is None:
            m = HEADER.match(body)
            if m is None or m.end() >= len(body) or body[m.end()] != "{":
                return []  # not (yet) the usual layout: held until the block ends
            name = unescape(m.group(1))
            if name is None:
                return []
            self.call, self.args_start, self.sent = ToolCall(name, None, ""), m.end(), 0
            events.append(Event("call", index=len(self.calls), call=self.call))
        args = body[self.args_start:]
        upto = len(final_part(args))
        if upto > self.sent:
            events.append(Event("arguments", args[self.sent:upto], len(self.calls)))
            self.sent = upto
        return events

    def _end_block(self, body: str, closed: bool) -> list[Event]:
        number = self.blocks - 1
        if self.call is not None:
            call, self.call = self.call, None
            events, args = self._close_streamed(call, body)
        else:
            call = whole_call(body)
            if call is None:
                self.inside, self.space = False, self.block_space
                self.errors.append(f"tool call {number}: not a JSON object with a name and arguments; kept as text")
                return self._content(OPEN + body + (CLOSE if closed else ""))
            events = [Event("call", index=len(self.calls), call=call),
                      Event("arguments", call.arguments_json, len(self.calls))]
        if self.names is not None and call.name not in self.names and call.error is None:
            call.error = f"no function named {call.name!r} was offered"
        if call.error is not None:
            self.errors.append(f"tool call {number} ({call.name}): {call.error}")
        elif not closed:
            self.errors.append(f"tool call {number} ({call.name}): the answer ended before </tool_call>")
        events.append(Event("done", index=len(self.calls), call=call))
        self.calls.append(call)
        self.inside, self.space = False, ""
        return events

    def _close_streamed(self, call: ToolCall, body: str) -> tuple[list[Event], str]:
        """Finish a call whose arguments were streamed: the rest of their text, then parse it."""
        tail = body[self.args_start:].rstrip()
        if tail.endswith("}"):
            args = tail[:-1].rstrip()
        else:
            args, call.error = tail, "its JSON object is not closed"
        events = []
        if len(args) > self.sent:  # what was sent is a beginning of `args` (final_part only holds back an end)
            events.append(Event("arguments", args[self.sent:], len(self.calls)))
        call.arguments_json = args
        if call.error is None:
            try:
                call.arguments = json.loads(args)
            except ValueError as e:
                call.error = f"arguments are not valid JSON ({e})"
        return events, args


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (it may still become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def final_part(args: str) -> str:
    """The part of a call's arguments text that no later text can change: all but an end that may still be
    the object's closing brace, whitespace, or the start of </tool_call>."""
    args = args[:len(args) - partial_suffix(args, CLOSE)].rstrip()
    return args[:-1].rstrip() if args.endswith("}") else args


def unescape(name: str) -> str | None:
    try:
        return json.loads(f'"{name}"')
    except ValueError:
        return None


def whole_call(body: str) -> ToolCall | None:
    """A block's body parsed whole: {"name": str, "arguments": JSON (an object, or a string holding JSON)}."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "arguments" not in data:
        return None
    arguments = data["arguments"]
    if isinstance(arguments, str):
        try:
            return ToolCall(data["name"], json.loads(arguments), arguments)
        except ValueError as e:
            return ToolCall(data["name"], None, arguments, error=f"arguments are not valid JSON ({e})")
    return ToolCall(data["name"], arguments, json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, names=None) -> ParsedAnswer:
    """Split a whole answer into content and tool calls (see the module; `names` as in ToolCallStream)."""
    stream = ToolCallStream(names)
    stream.push(text)
    stream.finish()
    return stream.result()


def stream_items(pieces: Iterator[str], names=None) -> Iterator:
    """The pieces of a streamed answer as content strings and finished ToolCalls (for the Python API)."""
    stream = ToolCallStream(names)
    try:
        for piece in pieces:
            yield from items(stream.push(piece))
        yield from items(stream.finish())
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


def items(events: list[Event]) -> Iterator:
    for e in events:
        if e.kind == "content":
            yield e.text
        elif e.kind == "done":
            yield e.call
