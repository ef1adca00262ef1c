"""The server's request schema: OpenAI's error shape, the body, and every field a request may carry, checked
before anything is queued. Plain functions, no event loop: the app runs the CPU-heavy ones (JSON, the chat
template, tokenization) in a thread so that one large request does not stall the others."""
import json

from starlette.requests import Request

from toolkit.errors import ArgumentError, QwenEdgeError

MAX_BODY = 1 << 20  # bytes
MAX_TOKENS = 1024  # new tokens when a request names none, and the most it may ask for
ROLES = ("system", "user", "assistant", "tool")
MAX_STOP, MAX_STOP_CHARS = 4, 256  # as OpenAI: up to 4 stop strings; each checked after every token


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


async def read_body(request: Request, max_body: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over `max_body` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {max_body}")
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > max_body:
            raise APIError(413, f"request body is over the limit of {max_body} bytes")
    return b"".join(chunks)


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, an integer of over 4,300 digits
        raise APIError(400, f"request body: expected a JSON object ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body: expected a JSON object")
    return data


def number(data: dict, name: str, low: float, high: float, integer: bool = False, low_open: bool = False):
    """data[name] if it is a number in range (None if absent), else a 400 naming the field."""
    value = data.get(name)
    if value is None:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not low <= value <= high or (low_open and value == low):
        kind = "an integer" if integer else "a number"
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        shown = json.dumps(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else "a larger value"
        raise APIError(400, f"{name}: expected {kind} in {span}, got {shown[:100]}", param=name)
    return value


def sampling(data: dict, context_left: int, max_tokens: int = MAX_TOKENS) -> dict:
    """The runtime options of a request's OpenAI sampling fields. An omitted max_tokens is `max_tokens` (the
    server's --max-tokens), one above it a 400; either way no more than the context has room for."""
    n = number(data, "n", 1, 1, integer=True)
    if n not in (None, 1):
        raise APIError(400, "n: only 1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if data.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name}: not supported (use repetition_penalty)", param=name)
    asked = data.get("max_completion_tokens", data.get("max_tokens"))
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > max_tokens:
        raise APIError(400, f"max_tokens: {asked if asked < 10 ** 30 else 'a larger value'} is over this server's "
                            f"limit of {max_tokens} new tokens", param="max_tokens")
    asked = number({"max_tokens": asked}, "max_tokens", 1, max_tokens, integer=True)
    if not isinstance(data.get("stream", False), bool):
        raise APIError(400, "stream: expected true or false", param="stream")
    if not isinstance(data.get("stream_options", {}), (dict, type(None))):
        raise APIError(400, "stream_options: expected an object", param="stream_options")
    return {
        "max_new_tokens": min(asked or max_tokens, context_left),
        "temperature": number(data, "temperature", 0, 2),
        "top_p": number(data, "top_p", 0, 1, low_open=True),
        "min_p": number(data, "min_p", 0, 1),
        "top_k": number(data, "top_k", 0, 1 << 31, integer=True),
        "repetition_penalty": number(data, "repetition_penalty", 0, 10, low_open=True),
        "seed": number(data, "seed", 0, (1 << 63) - 1, integer=True),
        "stop": stop_strings(data.get("stop")),
    }


def stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"stop: expected a string or a list of at most {MAX_STOP} strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"stop: each string may have at most {MAX_STOP_CHARS} characters", param="stop")
    return tuple(stop)


def chat_messages(data: dict) -> list[dict]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: expected a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"{where}: expected an object with role one of {', '.join(ROLES)}", param=where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content: expected a string", param=f"{where}.content")
        unicode(content, f"{where}.content")
        out.append({"role": m["role"], "content": content})
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            out[-1]["tool_calls"] = tool_calls(m["tool_calls"], f"{where}.tool_calls")
    return out


def tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool_calls, as OpenAI sends them back: [{"id", "type": "function", "function":
    {"name": str, "arguments": str}}] (the arguments' JSON is read when the chat template renders them)."""
    if not isinstance(calls, list):
        raise APIError(400, f"{where}: expected a list of {{id, type, function: {{name, arguments}}}} objects",
                       param=where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments", ""), str) or call.get("type", "function") != "function":
            raise APIError(400, f"{where}[{j}]: expected {{id, type: 'function', function: {{name: str, arguments: "
                                "a JSON string}}}}", param=f"{where}[{j}]")
        unicode(function["name"] + function.get("arguments", ""), f"{where}[{j}].function")
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": function.get("arguments", "{}")}})
    return out


def completion_prompt(data: dict, vocab_size: int):
    """/v1/completions' prompt: a non-empty string (or a list of one), or a list of token ids."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    token_ids = isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not token_ids:
        raise APIError(400, "prompt: expected a non-empty string, a list of one string, or a list of token ids",
                       param="prompt")
    if data.get("echo") or data.get("logprobs") or data.get("suffix"):
        raise APIError(400, "echo, logprobs and suffix are not supported")
    return unicode(prompt, "prompt") if isinstance(prompt, str) else prompt


def unicode(text: str, param: str) -> str:
    """`text` if it is valid Unicode: JSON may escape a lone surrogate ("\\ud800"), which the tokenizer refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param}: not valid Unicode ({e.reason} at character {e.start})", param=param) from None
    return text


def prompt_ids(model, prompt, param: str, tools=None) -> list[int]:
    """The prompt's token ids (a chat through the template, with `tools` if given), refused with 400 if they
    leave no room. In a chat, special-token text inside user and tool content stays plain text
    (literal_content): what a user types cannot open or close turns; a client that wants raw control tokens
    uses /v1/completions."""
    try:
        ids = model.encode(prompt, literal_content=True, tools=tools)
    except QwenEdgeError as e:
        raise APIError(400, str(e), param=param) from None
    if not ids:
        raise APIError(400, f"{param}: expected at least one token", param=param)
    if len(ids) >= model.max_length:
        raise APIError(400, f"{param}: {len(ids)} tokens do not fit the context of {model.max_length} "
                            "(leave room for at least one new token)", param=param, code="context_length_exceeded")
    return ids


def request_options(model, data: dict, ids: list[int], max_tokens: int) -> dict:
    """The generation options of a request, checked as the worker will check them (so that a bad value is a
    400 before a stream starts)."""
    options = sampling(data, model.max_length - len(ids), max_tokens)
    try:
        model.sampling_params(options["temperature"], options["top_k"], options["top_p"],
                              options["repetition_penalty"], options["seed"], options["min_p"])
    except ArgumentError as e:
        raise APIError(400, str(e)) from None
    return options
