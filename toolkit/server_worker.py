"""The server's worker: one generation at a time, in one thread, fed by a FIFO of jobs.

A job carries a request's token ids and options in, and its events out to the request's event loop:
("piece", text) as tokens are decoded, then ("done", Completion) or ("error", APIError); the app adds
("cancelled", None) when the client hangs up. The worker checks the job's `cancel` flag between tokens (a
cancelled job stops at its next token, or is skipped if it has not started) and its time limit
(`request_timeout`: the answer so far is sent, finish_reason "length"). Whatever a generation raises fails that
request only (400 for a QwenEdgeError, else 500) and the worker goes on with the next job.
"""
import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from toolkit.errors import QwenEdgeError
from toolkit.generation import Completion, Stats
from toolkit.kv_cache import PrefixCache
from toolkit.server_schema import APIError

REQUEST_TIMEOUT = 300.0  # seconds of generation per request


@dataclass
class Job:
    """One request's generation: token ids and options in; ("piece" | "done" | "error", value) events out."""

    ids: list[int]
    options: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            self.cancel.set()


class Worker:
    """Runs queued jobs one after the other in a daemon thread."""

    def __init__(self, model, max_queue: int, request_timeout: float = REQUEST_TIMEOUT):
        self.model, self.max_queue, self.request_timeout = model, max_queue, request_timeout
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.active = 0
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "timed_out": 0}
        self.drafted = {"drafted_tokens": 0, "accepted_tokens": 0}
        self._fresh_caches()
        self.thread = threading.Thread(target=self._loop, name="qwen-edge-worker", daemon=True)
        self.thread.start()

    def _fresh_caches(self) -> None:
        # The last request's KV cache and the token ids it holds: a chat client re-sends its whole history
        # each turn, so the next request usually starts with these ids and prefills only what is new.
        self.prefix = PrefixCache(self.model.new_cache(1))
        draft = self.model.draft
        self.draft_prefix = PrefixCache(draft.new_cache(1)) if draft is not None else None

    def submit(self, ids: list[int], options: dict) -> Job:
        """Queue a generation (call it on the request's event loop); 503 when `max_queue` jobs are waiting."""
        if self.jobs.qsize() >= self.max_queue:
            raise APIError(503, f"the server is busy: {self.max_queue} requests are already waiting",
                           "server_error", code="queue_full")
        job = Job(ids, options, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        """End the thread after the jobs queued so far."""
        self.jobs.put(None)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set():  # its client left while it waited
                self.counts["cancelled"] += 1
                continue
            self.active = 1
            try:
                outcome, last = self._generate(job)
            except Exception as e:  # a bug or an onnxruntime failure: this request fails, the worker goes on
                self._fresh_caches()  # what the caches hold after a failure is not known
                outcome, last = "failed", APIError(500, f"generation failed: {e.__class__.__name__}: {e}",
                                                   "server_error")
            self.counts[outcome] += 1  # before the answer goes out: /health agrees with what the client saw
            self.active = 0
            if last is not None:
                job.emit("error" if isinstance(last, APIError) else "done", last)

    def _generate(self, job: Job) -> tuple[str, Completion | APIError | None]:
        """Run one job, emitting its pieces; returns how it ended (completed, cancelled, failed: a 400, or
        timed_out) and its last event's value (the Completion, an APIError, or None when cancelled)."""
        stats = Stats()
        done = Completion("", job.ids, stats=stats)
        draft_cache = self.draft_prefix.reuse(job.ids) if self.draft_prefix is not None else None
        deadline = time.monotonic() + self.request_timeout
        outcome = "completed"
        pieces = self.model.run([job.ids], collect=[done], stats=stats, cache=self.prefix.reuse(job.ids),
                                draft_cache=draft_cache, **job.options)
        try:
            for _, piece in pieces:
                if job.cancel.is_set():
                    return "cancelled", None
                job.emit("piece", piece)
                if time.monotonic() > deadline:  # the answer so far; finish_reason stays "length"
                    outcome = "timed_out"
                    break
        except QwenEdgeError as e:
            return "failed", APIError(400, str(e))
        finally:
            pieces.close()
            self.prefix.record(job.ids, done.token_ids)
            if draft_cache is not None:
                self.draft_prefix.record(job.ids, done.token_ids)
            self.drafted["drafted_tokens"] += stats.drafted_tokens
            self.drafted["accepted_tokens"] += stats.accepted_tokens
        return outcome, done


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


async def cancel_on_disconnect(receive, job: Job) -> None:
    """Wait for the client to hang up (after the body, the next ASGI message is http.disconnect), then cancel
    `job` and wake whoever waits for its events. Run it as a task while a plain (not streamed) answer is made;
    a streamed one is watched by starlette's StreamingResponse."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()
    job.events.put_nowait(("cancelled", None))
