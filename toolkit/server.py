"""`qwen-edge serve`: an OpenAI-compatible HTTP API over one model folder (starlette on uvicorn).

    POST /v1/chat/completions   chat template applied; stream (server-sent events) or not
    POST /v1/completions        raw text (or token ids) in, no template
    GET  /v1/models             the one model served
    GET  /health                liveness plus the queue: active, queued, completed, cancelled, failed, timed_out

Scheduling (toolkit/server_worker.py): one answer is generated at a time, by one worker thread; requests wait
their turn in a FIFO (at most `max_queue`, then 503), so answers never mix. The worker keeps the last request's
KV cache: a request that starts with the same tokens (a chat client re-sending its history) prefills only the
rest (`usage.prompt_tokens_details.cached_tokens` says how many were reused). With a draft model (`qwen-edge
serve --draft`), the draft keeps its own cache the same way; `usage.completion_tokens_details` counts the
drafted tokens kept (`accepted_prediction_tokens`) and thrown away (`rejected_prediction_tokens`), /health the
totals. A client that hangs up, streaming or not, is stopped at its next token (or dropped from the queue) and
the worker moves on. A request asks for at most `max_tokens` new tokens (the default when it names none; more
is a 400) and generates for at most `request_timeout` seconds (then the answer so far, finish_reason "length").

Tools and structured output (toolkit/server_tools.py): `tools` are rendered by the chat template and the
answer's <tool_call> blocks come back as `message.tool_calls` (finish_reason "tool_calls"), streamed as
`delta.tool_calls`; `tool_choice` "required" or a named function, and `response_format` json_object or
json_schema, constrain the output with llguidance (`pip install 'qwen-edge[constrained]'`; without it, a 400
naming the field). A constrained request decodes without the --draft model. `min_p` is sampled as in the API.

Requests (toolkit/server_schema.py) are parsed, rendered through the chat template and tokenized in a thread,
off the event loop. Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 malformed
JSON or a bad value (naming the field), 400 `context_length_exceeded` for a prompt that does not fit, 401 a
missing or wrong API key, 404 / 405 an unknown route or method, 413 a body over `max_body` bytes, 503 a full
queue, 500 a generation that failed (the server goes on). Sampling fields a client omits fall back to the
model's generation_config, as `qwen-edge generate` does.
"""
import asyncio
import contextlib
import hmac
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from toolkit.generation import Completion
from toolkit.server_schema import (MAX_BODY, MAX_TOKENS, APIError, chat_messages, completion_prompt, parse_json,
                                   prompt_ids, read_body, request_options)
from toolkit.server_tools import Deltas, constraint_options, message, response_schema, tool_fields
from toolkit.server_worker import REQUEST_TIMEOUT, Job, Worker, cancel_on_disconnect, events
from toolkit.tool_spec import ToolRequest


def create_app(model, model_id: str, api_key: str | None = None, max_queue: int = 32, max_body: int = MAX_BODY,
               max_tokens: int = MAX_TOKENS, request_timeout: float = REQUEST_TIMEOUT) -> Starlette:
    """The ASGI app serving `model` under the name `model_id`."""
    worker = Worker(model, max_queue, request_timeout)
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def prepare(body: bytes, chat: bool) -> tuple[dict, list[int], dict, ToolRequest | None]:
        """The request's JSON, prompt token ids, generation options and tools (in a thread: it may take a
        while)."""
        data = parse_json(body)
        tools = tool_fields(data) if chat else None
        if chat:
            ids = prompt_ids(model, chat_messages(data), "messages", tools.rendered if tools is not None else None)
        else:
            ids = prompt_ids(model, completion_prompt(data, model.tokenizer.vocab_size), "prompt")
        options = request_options(model, data, ids, max_tokens)
        return data, ids, options | constraint_options(model, tools, response_schema(data)), tools

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
        return await respond(request, chat=True)

    async def completions(request: Request):
        return await respond(request, chat=False)

    async def respond(request: Request, chat: bool):
        check_key(request)
        body = await read_body(request, max_body)
        data, ids, options, tools = await run_in_threadpool(prepare, body, chat)
        job = worker.submit(ids, options)
        shape = Shape(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", model_id, chat, tools)
        if data.get("stream"):
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse(job, shape, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watch = asyncio.create_task(cancel_on_disconnect(request.receive, job))
        try:
            return await answer(job, shape)
        finally:
            watch.cancel()

    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException):
        return await api_error(request, APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def server_error(request: Request, exc: Exception):  # a bug: still OpenAI's shape (and logged)
        return await api_error(request, APIError(500, f"internal error: {exc.__class__.__name__}", "server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.worker = worker
    return app


async def answer(job: Job, shape: "Shape") -> Response:
    """A plain (not streamed) answer: the pieces joined once the job is done."""
    text = ""
    async for kind, value in events(job):
        if kind == "piece":
            text += value
        elif kind == "error":
            raise value
        elif kind == "cancelled":  # nobody reads this: the client has gone
            return Response(status_code=499)
        else:
            return JSONResponse(shape.final(text, value))


class Shape:
    """OpenAI's response objects for one request (chat.completion or text_completion, and their chunks); with
    tools, the answer's calls as message.tool_calls, or streamed as delta.tool_calls (toolkit/server_tools.py)."""

    def __init__(self, rid: str, model_id: str, chat: bool, tools: ToolRequest | None = None):
        self.rid, self.model_id, self.chat, self.created = rid, model_id, chat, int(time.time())
        self.tools = tools if tools is not None and tools.parse else None
        self.deltas = Deltas(self.tools) if self.tools is not None else None

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
            msg, finish_reason = message(text, c.finish_reason, self.tools)
            choice = {"index": 0, "message": msg, "finish_reason": finish_reason}
            return self._object("chat.completion", [choice], self.usage(c))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
        return self._object("text_completion", [choice], self.usage(c))

    def chunk(self, piece: str | None, finish_reason: str | None = None, role: bool = False,
              usage: dict | None = None, delta: dict | None = None) -> dict:
        if self.chat:
            if delta is None:
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
        if kind == "piece" and shape.deltas is not None:
            for delta in shape.deltas.push(value):
                yield data_line(shape.chunk(None, delta=delta))
        elif kind == "piece":
            yield data_line(shape.chunk(value))
        elif kind == "error":
            yield data_line(value.body())
        else:
            finish_reason = value.finish_reason
            if shape.deltas is not None:  # the rest of an unfinished call, and "tool_calls" when there were calls
                for delta in shape.deltas.finish():
                    yield data_line(shape.chunk(None, delta=delta))
                finish_reason = shape.deltas.finish_reason(finish_reason)
            yield data_line(shape.chunk(None, finish_reason, usage=Shape.usage(value)))
            if include_usage:
                yield data_line(shape.usage_chunk(value))
    yield "data: [DONE]\n\n"


def serve(model, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 32, max_body: int = MAX_BODY, max_tokens: int = MAX_TOKENS,
          request_timeout: float = REQUEST_TIMEOUT, log=print) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(model, model_id, api_key=api_key, max_queue=max_queue, max_body=max_body,
                     max_tokens=max_tokens, request_timeout=request_timeout)
    log(f"qwen-edge serve: {model_id} at http://{host}:{port}/v1 (one answer at a time, up to {max_queue} queued, "
        f"at most {max_tokens} new tokens and {request_timeout:g} s each{'; API key required' if api_key else ''})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
