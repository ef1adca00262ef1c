"""A chat turn with tools, for the Python API (Model.chat; ChatSession uses the same pieces): the tools rendered
by the chat template, the output constrained when a call is forced, the answer parsed into tool calls."""
from toolkit.generation import Completion
from toolkit.tool_spec import ToolRequest, tool_request
from toolkit.tools import ParsedAnswer, ToolAnswer, parse_tool_calls, stream_items


def chat_with_tools(model, messages, stream, tools, tool_choice, parallel_tool_calls, literal_content=False,
                    grammar=None, json_schema=None, **options):
    """Model.chat with tools: a ToolAnswer, or with stream=True an iterator of content pieces and ToolCalls."""
    request = tool_request(tools, tool_choice, parallel_tool_calls)
    options |= request.constrain(grammar, json_schema)
    ids = model.encode(messages, chat=True, literal_content=literal_content, tools=request.rendered)
    done = [Completion("", ids)]
    pieces = (piece for _, piece in model.run([ids], collect=done, **options))
    if stream:
        return stream_items(pieces, request.names) if request.parse else pieces
    return tool_answer(request, "".join(pieces), done[0].finish_reason)


def tool_answer(request: ToolRequest, text: str, finish_reason: str, parsed: ParsedAnswer | None = None) -> ToolAnswer:
    """The answer `text` parsed for `request`'s tools (not parsed with tool_choice "none"), or already `parsed`."""
    if parsed is None:
        parsed = parse_tool_calls(text, request.names) if request.parse else ParsedAnswer(text)
    if parsed.tool_calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return ToolAnswer(parsed.content, parsed.tool_calls, parsed.errors, text, finish_reason)
