"""The server's tools and structured output: OpenAI's `tools`, `tool_choice`, `parallel_tool_calls` and
`response_format` checked into the runtime's options (grammar / json_schema, toolkit/tool_spec.py and
toolkit/constrained.py), and an answer's calls in OpenAI's shape: `message.tool_calls` with
finish_reason "tool_calls", or streamed as `delta.tool_calls` (a call's first chunk carries its index, id, type,
name and arguments ""; the next ones fragments of its arguments, the model's JSON text as it is decoded).
"""
import re

from toolkit.constrained import compile_constraint
from toolkit.errors import ArgumentError
from toolkit.server_schema import APIError
from toolkit.tool_spec import ToolRequest, tool_request
from toolkit.tools import ToolCallStream, parse_tool_calls

FIELD = re.compile(r"[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*")


def bad_request(e: ArgumentError, default: str) -> APIError:
    """A 400 for an ArgumentError whose message starts with the field's path (else `default`)."""
    head = str(e).split(":", 1)[0].split(" ", 1)[0]
    return APIError(400, str(e), param=head if FIELD.fullmatch(head) else default)


def tool_fields(data: dict) -> ToolRequest | None:
    """The request's tools and tool_choice (None when it has no tools: then tool_choice may only be "auto" or
    "none", and means nothing)."""
    if data.get("tools") is None:
        if data.get("tool_choice") not in (None, "auto", "none"):
            raise APIError(400, "tool_choice: needs tools", param="tool_choice")
        return None
    try:
        return tool_request(data["tools"], data.get("tool_choice"), data.get("parallel_tool_calls", True))
    except ArgumentError as e:
        raise bad_request(e, "tools") from None


def response_schema(data: dict) -> dict | None:
    """response_format's JSON schema: {"type": "object"} for json_object, json_schema.schema for json_schema
    (any JSON when it has none), None for text or no response_format."""
    fmt = data.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise APIError(400, "response_format: expected {type: text}, {type: json_object} or {type: json_schema, "
                            "json_schema: {name, schema}}", param="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not 0 < len(spec["name"]) <= 64:
        raise APIError(400, "response_format.json_schema: expected {name: a string of 1 to 64 characters, schema: "
                            "{...}, strict: bool}", param="response_format.json_schema")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise APIError(400, "response_format.json_schema.strict: expected true or false",
                       param="response_format.json_schema.strict")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema: expected a JSON schema object",
                       param="response_format.json_schema.schema")
    return schema


def constraint_options(model, tools: ToolRequest | None, schema: dict | None) -> dict:
    """The runtime's grammar / json_schema options, compiled once here so that a schema llguidance cannot
    follow (or a missing llguidance) is a 400 naming the field before anything is queued. Every output is
    constrained (`strict` or not): it always parses and validates, unless max_tokens cuts it."""
    forced = tools is not None and tools.choice in ("required", "function")
    param = "tool_choice" if forced else "response_format"
    try:
        options = tools.constrain(None, schema) if tools is not None else {"grammar": None, "json_schema": schema}
        compile_constraint(model, options["grammar"], options["json_schema"], option=param)
    except ArgumentError as e:
        raise APIError(400, str(e), param=param) from None
    return options


def message(text: str, finish_reason: str, tools: ToolRequest | None) -> tuple[dict, str]:
    """A whole answer's message and finish_reason ("tool_calls" when it calls and stopped by itself)."""
    if tools is None or not tools.parse:
        return {"role": "assistant", "content": text}, finish_reason
    parsed = parse_tool_calls(text, tools.names)
    if not parsed.tool_calls:
        return {"role": "assistant", "content": parsed.content}, finish_reason
    out = {"role": "assistant", "content": parsed.content or None,
           "tool_calls": [c.to_openai() for c in parsed.tool_calls]}
    return out, "tool_calls" if finish_reason == "stop" else finish_reason


class Deltas:
    """The `delta` objects of a streamed answer with tools: `push(piece)` and `finish()` give the deltas that
    became final; `finish_reason(reason)` at the end."""

    def __init__(self, tools: ToolRequest):
        self.stream = ToolCallStream(tools.names)

    def push(self, piece: str) -> list[dict]:
        return self._deltas(self.stream.push(piece))

    def finish(self) -> list[dict]:
        return self._deltas(self.stream.finish())

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.stream.calls and reason == "stop" else reason

    @staticmethod
    def _deltas(events) -> list[dict]:
        out = []
        for e in events:
            if e.kind == "content":
                out.append({"content": e.text})
            elif e.kind == "call":
                out.append({"tool_calls": [{"index": e.index, "id": e.call.id, "type": "function",
                                            "function": {"name": e.call.name, "arguments": ""}}]})
            elif e.kind == "arguments":
                out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
        return out
