"""`qwen-edge serve`: an OpenAI-compatible HTTP API over one model folder (starlette on uvicorn).

    POST /v1/chat/completions   chat template applied; stream (server-sent events) or not
    POST /v1/completions        raw text (or token ids) in, no template
    GET  /v1/models             the one model served
    GET  /health                liveness plus the queue: active, queued, completed, cancelled, failed

Scheduling: one answer is generated at a time, by one worker thread; requests wait their turn in a FIFO
(at most `max_queue`, then 503), so answers never mix. The worker keeps the last request's KV cache: a
request that starts with the same tokens (a chat client re-sending its history) prefills only the rest
(`usage.prompt_tokens_details.cached_tokens` says how many were reused). With a draft model (`qwen-edge serve
--draft`), the draft keeps its own cache the same way; `usage.completion_tokens_details` counts the drafted
tokens kept (`accepted_prediction_tokens`) and thrown away (`rejected_prediction_tokens`), /health the
totals. A streamed answer whose client disconnects is stopped at its next token and the worker moves on.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 malformed JSON or a bad
value (naming the field), 400 `context_length_exceeded` for a prompt that does not fit, 401 a missing or
wrong API key, 404 / 405 an unknown route or method, 413 a body over `max_body` bytes, 503 a full queue.
Sampling fields a client omits fall back to the model's generation_config, as `qwen-edge generate` does.
"""
import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from toolkit.errors import ArgumentError, QwenEdgeError
from toolkit.generation import Completion
from toolkit.kv_cache import PrefixCache

MAX_BODY = 1 << 20  # bytes
ROLES = ("system", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- the worker: one generation at a time --------------------------------------------------------------

@dataclass
class Job:
    """One request's generation: token ids and options in; ("piece" | "done" | "error", value) events out."""

    ids: list[int]
    options: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    """Runs queued jobs one after the other in a daemon thread."""

    def __init__(self, model, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.active = 0
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        # The last request's KV cache and the token ids it holds: a chat client re-sends its whole history
        # each turn, so the next request usually starts with these ids and prefills only what is new.
        self.prefix = PrefixCache(model.new_cache(1))
        self.draft_prefix = PrefixCache(model.draft.new_cache(1)) if model.draft is not None else None
        self.drafted = {"drafted_tokens": 0, "accepted_tokens": 0}
        threading.Thread(target=self._loop, name="qwen-edge-worker", daemon=True).start()

    def submit(self, ids: list[int], options: dict) -> Job:
        if self.jobs.qsize() >= self.max_queue:
            raise APIError(503, f"the server is busy: {self.max_queue} requests are already waiting",
                           "server_error", code="queue_full")
        job = Job(ids, options, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancel.is_set():  # its client left while it waited
                self.counts["cancelled"] += 1
                continue
            self.active = 1
            try:
                self._generate(job)
            finally:
                self.active = 0

    def _generate(self, job: Job) -> None:
        done = [Completion("", job.ids)]
        draft_cache = self.draft_prefix.reuse(job.ids) if self.draft_prefix is not None else None
        pieces = self.model._run([job.ids], _collect=done, cache=self.prefix.reuse(job.ids), draft_cache=draft_cache,
                                 **job.options)
        try:
            for _, piece in pieces:
                if job.cancel.is_set():
                    self.counts["cancelled"] += 1
                    return
                job.emit("piece", piece)
        except QwenEdgeError as e:
            self.counts["failed"] += 1
            job.emit("error", APIError(400, str(e)))
            return
        except Exception as e:  # a bug or an onnxruntime failure: the request fails, the server stays up
            self.counts["failed"] += 1
            job.emit("error", APIError(500, f"generation failed: {e.__class__.__name__}: {e}", "server_error"))
            return
        finally:
            pieces.close()
            self.prefix.record(job.ids, done[0].token_ids)
            if draft_cache is not None:
                self.draft_prefix.record(job.ids, done[0].token_ids)
            self.drafted["drafted_tokens"] += done[0].stats.drafted_tokens
            self.drafted["accepted_tokens"] += done[0].stats.accepted_tokens
        self.counts["completed"] += 1
        job.emit("done", done[0])


async def events(job: Job):
    """The job's events until it ends; leaving early (a client disconnect) cancels the job."""
    try:
        while True:
            kind, value = await job.events.get()
            yield kind, value
            if kind != "piece":
                return
    finally:
        job.cancel.set()


# -- request parsing ----------------------------------------------------------------------------------

async def read_json(request: Request, max_body: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {max_body}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise APIError(413, f"request body is over the limit of {max_body} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body: expected a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body: expected a JSON object")
    return data


def number(data: dict, name: str, low: float, high: float, integer: bool = False, low_open: bool = False):
    value = data.get(name)
    if value is None:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value > high or value < low or (low_open and value == low):
        kind = "an integer" if integer else "a number"
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{name}: expected {kind} in {span}, got {json.dumps(value)}", param=name)
    return value


def sampling(data: dict, context_left: int) -> dict:
    """The runtime options of a request's OpenAI sampling fields."""
    n = number(data, "n", 1, 1, integer=True)
    if n not in (None, 1):
        raise APIError(400, "n: only 1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if data.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name}: not supported (use repetition_penalty)", param=name)
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    max_tokens = number({"max_tokens": max_tokens}, "max_tokens", 1, 1 << 31, integer=True)
    stop = data.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise APIError(400, "stop: expected a string or a list of at most 4 strings", param="stop")
    if not isinstance(data.get("stream", False), bool):
        raise APIError(400, "stream: expected true or false", param="stream")
    return {
        "max_new_tokens": min(max_tokens or context_left, context_left),
        "temperature": number(data, "temperature", 0, 2),
        "top_p": number(data, "top_p", 0, 1, low_open=True),
        "top_k": number(data, "top_k", 0, 1 << 31, integer=True),
        "repetition_penalty": number(data, "repetition_penalty", 0, 10, low_open=True),
        "seed": number(data, "seed", 0, (1 << 63) - 1, integer=True),
        "stop": tuple(stop or ()),
    }


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
        out.append({"role": m["role"], "content": content})
    return out


# -- the app ------------------------------------------------------------------------------------------

def create_app(model, model_id: str, api_key: str | None = None, max_queue: int = 32,
               max_body: int = MAX_BODY) -> Starlette:
    """The ASGI app serving `model` under the name `model_id`."""
    worker = Worker(model, max_queue)
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def encode(prompt, param: str) -> list[int]:
        try:
            ids = model.encode(prompt)
        except QwenEdgeError as e:
            raise APIError(400, str(e), param=param) from None
        if not ids:
            raise APIError(400, f"{param}: expected at least one token", param=param)
        if len(ids) >= model.max_length:
            raise APIError(400, f"{param}: {len(ids)} tokens do not fit the context of {model.max_length} "
                                "(leave room for at least one new token)", param=param,
                           code="context_length_exceeded")
        return ids

    async def health(request: Request):
        draft = {} if model.draft is None else {"draft": {"model": model.draft.manifest.folder.resolve().name,
                                                          **worker.drafted}}
        return JSONResponse({"status": "ok", "model": model_id, "active": worker.active,
                             "queued": worker.jobs.qsize(), **worker.counts, **draft})

    async def models(request: Request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "qwen-edge"}]})

    async def chat_completions(request: Request):
        check_key(request)
        data = await read_json(request, max_body)
        ids = encode(chat_messages(data), "messages")
        return await respond(data, ids, chat=True)

    async def completions(request: Request):
        check_key(request)
        data = await read_json(request, max_body)
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        token_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                                  and 0 <= t < model.tokenizer.vocab_size
                                                                  for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not token_ids:
            raise APIError(400, "prompt: expected a non-empty string, a list of one string, or a list of token ids",
                           param="prompt")
        if data.get("echo") or data.get("logprobs") or data.get("suffix"):
            raise APIError(400, "echo, logprobs and suffix are not supported")
        return await respond(data, encode(prompt, "prompt"), chat=False)

    async def respond(data: dict, ids: list[int], chat: bool):
        try:
            options = sampling(data, model.max_length - len(ids))
            # checked here too (the worker checks again) so a bad value is a 400 before a stream starts
            model.sampling_params(options["temperature"], options["top_k"], options["top_p"],
                                  options["repetition_penalty"], options["seed"])
        except ArgumentError as e:
            raise APIError(400, str(e)) from None
        job = worker.submit(ids, options)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = Shape(rid, model_id, chat)
        if data.get("stream"):
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse(job, shape, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text = ""
        async for kind, value in events(job):
            if kind == "piece":
                text += value
            elif kind == "error":
                raise value
            else:
                return JSONResponse(shape.final(text, value))

    async def api_error(request: Request, exc: APIError):
        return exc.response()

    async def http_error(request: Request, exc: HTTPException):
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error})
    app.state.worker = worker
    return app


class Shape:
    """OpenAI's response objects for one request (chat.completion or text_completion, and their chunks)."""

    def __init__(self, rid: str, model_id: str, chat: bool):
        self.rid, self.model_id, self.chat, self.created = rid, model_id, chat, int(time.time())

    def _object(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.rid, "object": kind, "created": self.created, "model": self.model_id, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    @staticmethod
    def usage(c: Completion) -> dict:
        return {"prompt_tokens": len(c.prompt_ids), "completion_tokens": len(c.token_ids),
                "total_tokens": len(c.prompt_ids) + len(c.token_ids),
                "prompt_tokens_details": {"cached_tokens": c.stats.reused_tokens},
                "completion_tokens_details": {
                    "accepted_prediction_tokens": c.stats.accepted_tokens,
                    "rejected_prediction_tokens": c.stats.drafted_tokens - c.stats.accepted_tokens}}

    def final(self, text: str, c: Completion) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": c.finish_reason}
            return self._object("chat.completion", [choice], self.usage(c))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
        return self._object("text_completion", [choice], self.usage(c))

    def chunk(self, piece: str | None, finish_reason: str | None = None, role: bool = False,
              usage: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
            return self._object("chat.completion.chunk",
                                [{"index": 0, "delta": delta, "finish_reason": finish_reason}], usage)
        return self._object("text_completion",
                            [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}],
                            usage)

    def usage_chunk(self, c: Completion) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [], self.usage(c))


def data_line(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse(job: Job, shape: Shape, include_usage: bool):
    """Server-sent events of one streamed answer, ending with `data: [DONE]`; usage rides on the last chunk
    (and, with stream_options.include_usage, also on a chunk of its own, as OpenAI sends it)."""
    if shape.chat:
        yield data_line(shape.chunk(None, role=True))
    async for kind, value in events(job):
        if kind == "piece":
            yield data_line(shape.chunk(value))
        elif kind == "error":
            yield data_line(value.body())
        else:
            yield data_line(shape.chunk(None, value.finish_reason, usage=Shape.usage(value)))
            if include_usage:
                yield data_line(shape.usage_chunk(value))
    yield "data: [DONE]\n\n"


def serve(model, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 32, log=print) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(model, model_id, api_key=api_key, max_queue=max_queue)
    log(f"qwen-edge serve: {model_id} at http://{host}:{port}/v1 (one answer at a time, up to {max_queue} queued"
        f"{'; API key required' if api_key else ''})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
