"""What a request with tools asks for: the tools (OpenAI's form), tool_choice, the messages that carry calls and
their results, and the grammar that forces a call. Shared by the Python API (Model.chat, ChatSession) and the
server; every bad value is an ArgumentError whose message starts with the field's path ("tools[0].function.name:
...").

    request = tool_request(tools, tool_choice="required")
    ids = model.encode(messages, tools=request.rendered)   # messages with calls and results in OpenAI's form
    model.run([ids], grammar=request.grammar())            # the answer is <tool_call> blocks (tools.py parses them)

tool_choice: "auto" (the model decides; its answer is parsed), "none" (the tools are not rendered and nothing is
parsed), "required" (the output is constrained to one or more calls, `parallel_tool_calls=False`: exactly one),
or {"type": "function", "function": {"name": N}} (exactly one call of N). The forced forms need llguidance
(toolkit/constrained.py). A call is written as Qwen2.5's chat template asks, `<tool_call>\\n{"name": N,
"arguments": {...}}\\n</tool_call>`, with the arguments constrained to the function's `parameters` schema.
"""
import json
import re
from dataclasses import dataclass

from toolkit.constrained import JSON_STYLE, schema_object
from toolkit.errors import ArgumentError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128
CHOICES = ("auto", "none", "required")


def check_tools(tools) -> list[dict]:
    """The tools in OpenAI's form, [{"type": "function", "function": {"name", "description"?, "parameters"}}];
    a bare {"name", "description"?, "parameters"?} (Qwen's own form) is accepted too."""
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise ArgumentError(f"tools: expected a list of 1 to {MAX_TOOLS} {{'type': 'function', 'function': {{...}}}} "
                            "objects")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if isinstance(tool, dict) and "function" in tool:
            if tool.get("type", "function") != "function":
                raise ArgumentError(f"{where}.type: expected 'function'")
            tool, where = tool["function"], f"{where}.function"
        if not isinstance(tool, dict):
            raise ArgumentError(f"{where}: expected an object with a name and parameters")
        name = tool.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ArgumentError(f"{where}.name: expected 1 to 64 letters, digits, _ or -")
        if name in names:
            raise ArgumentError(f"{where}.name: {name!r} is given twice")
        names.add(name)
        if not isinstance(tool.get("description", ""), str):
            raise ArgumentError(f"{where}.description: expected a string")
        parameters = tool.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or not json_like(parameters):
            raise ArgumentError(f"{where}.parameters: expected a JSON schema object")
        function = {"name": name, **({"description": tool["description"]} if "description" in tool else {}),
                    "parameters": parameters}
        out.append({"type": "function", "function": function})
    return out


def json_like(value) -> bool:
    """`value` can be written as JSON (the grammar and the chat template write it)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


@dataclass(frozen=True)
class ToolRequest:
    """Checked tools and tool_choice ("auto", "none", "required" or "function" with `name`)."""

    tools: list
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def rendered(self) -> list | None:
        """What the chat template gets as `tools` (None: tool_choice "none" renders none)."""
        return None if self.choice == "none" else self.tools

    @property
    def parse(self) -> bool:
        """Whether the answer's <tool_call> blocks are parsed into calls."""
        return self.choice != "none"

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def grammar(self, answer_schema=None) -> str | None:
        """The Lark grammar (llguidance's dialect) of what the model may write, or None when it is free: forced
        calls for "required" or a named function; with `answer_schema` (a response_format's JSON schema) and
        "auto", that JSON or calls."""
        if self.choice in ("required", "function"):
            return call_grammar(self.tools if self.choice == "required" else
                                [t for t in self.tools if t["function"]["name"] == self.name],
                                self.parallel and self.choice == "required")
        if answer_schema is not None and self.choice == "auto":
            answer_schema = {"x-guidance": JSON_STYLE} | answer_schema
            return (f"start: answer | calls\nanswer: %json {json.dumps(answer_schema)}\n"
                    + call_grammar(self.tools, self.parallel).replace("start:", "calls:", 1))
        return None


    def constrain(self, grammar=None, json_schema=None) -> dict:
        """A call's grammar= and json_schema= options given these tools: a forced call replaces them (it has no
        content for them to shape); with "auto", a json_schema becomes "that JSON or calls"."""
        forced = self.choice in ("required", "function")
        if grammar is not None and json_schema is not None:
            raise ArgumentError("grammar and json_schema: give one or the other")
        if grammar is not None and forced:
            raise ArgumentError("grammar: cannot be combined with tool_choice 'required' or a named function")
        if forced or (json_schema is not None and self.choice == "auto"):
            schema = None if json_schema is None else schema_object(json_schema, "json_schema")
            return {"grammar": self.grammar(schema), "json_schema": None}
        return {"grammar": grammar, "json_schema": json_schema}


def call_grammar(tools: list[dict], parallel: bool) -> str:
    """Lark: one <tool_call> block (or several, one per line, when `parallel`) calling one of `tools` with
    arguments valid for its parameters schema."""
    more = ' ("\\n" call)*' if parallel else ""
    rules = ["start: call" + more,
             'call: "<tool_call>\\n" (' + " | ".join(f"f{i}" for i in range(len(tools))) + ') "\\n</tool_call>"']
    for i, tool in enumerate(tools):
        f = tool["function"]
        schema = {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_STYLE}
        rules.append(f"f{i}: %json {json.dumps(schema)}")
    return "\n".join(rules) + "\n"


def tool_request(tools, tool_choice="auto", parallel_tool_calls=True) -> ToolRequest:
    """Check tools, tool_choice and parallel_tool_calls (see the module)."""
    tools = check_tools(tools)
    if not isinstance(parallel_tool_calls, bool):
        raise ArgumentError("parallel_tool_calls: expected true or false")
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ArgumentError(f"tool_choice {tool_choice!r:.40}: expected one of {', '.join(CHOICES)} or "
                                "{'type': 'function', 'function': {'name': ...}}")
        return ToolRequest(tools, tool_choice, parallel=parallel_tool_calls)
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function":
        raise ArgumentError(f"tool_choice: expected one of {', '.join(CHOICES)} or "
                            "{'type': 'function', 'function': {'name': ...}}")
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ArgumentError("tool_choice.function.name: expected the name of one of the tools")
    if name not in [t["function"]["name"] for t in tools]:
        raise ArgumentError(f"tool_choice.function.name: {name!r:.70} is not one of the tools")
    return ToolRequest(tools, "function", name, parallel_tool_calls)


def tool_messages(messages) -> list[dict]:
    """Messages as the chat template takes them: an assistant message's tool_calls in OpenAI's form (arguments
    a JSON string) or Qwen's (arguments an object) become {"type": "function", "function": {"name", "arguments":
    object}} (the template writes them with tojson; arguments that are not JSON stay the string they are); its
    content may be None (then ""). Other messages are
    {"role", "content"} as before (a tool message may carry tool_call_id and name). Model.encode applies it to
    every chat."""
    if not isinstance(messages, list):
        return messages  # the chat template's check_messages says what is wrong
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls") is not None:
            m = m | {"content": "" if m.get("content") is None else m["content"],
                     "tool_calls": [call_for_template(c, f"messages[{i}].tool_calls[{j}]")
                                    for j, c in enumerate(listed(m["tool_calls"], f"messages[{i}].tool_calls"))]}
        out.append(m)
    return out


def listed(value, where: str) -> list:
    if not isinstance(value, list):
        raise ArgumentError(f"{where}: expected a list of calls")
    return value


def call_for_template(call, where: str) -> dict:
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ArgumentError(f"{where}: expected {{'type': 'function', 'function': {{'name': str, 'arguments': "
                            "a JSON string}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            pass  # a call the model wrote badly, sent back as it was: rendered as the string it is
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
