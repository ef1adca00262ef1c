"""A multi-turn chat that keeps its KV cache between turns and prefills only what is new.

    chat = model.chat_session(system="You are terse.")
    print(chat.send("Name a prime."))
    for piece in chat.send("And the next one?", stream=True):
        print(piece, end="")

Each turn renders the whole conversation with the chat template, tokenizes it, and compares the ids with
those whose keys and values the cache already holds: the longest common prefix is kept, the rest of the
cache is dropped, and only the new tokens go through the prefill graph. Matching ids rather than trusting
the history keeps this correct when a template re-renders earlier turns differently (e.g. Qwen's default
system prompt, or an answer that re-tokenizes differently from how it was generated).

With a draft model (`draft=` in the options, or the model's own from `load(..., draft=FOLDER)`), the draft
keeps its own KV cache between turns the same way (a second PrefixCache), so it too prefills only what is new.

Tools: `ChatSession(model, tools=[...])` renders them in every turn; `send` then returns a ToolAnswer (stream=True:
content pieces and ToolCalls, toolkit/tool_chat.py), the assistant's calls are kept in the history, and the
results go back as tool messages: `chat.send({"role": "tool", "content": "..."})` (or a list of them).

Context policy: an answer runs to its end token or to the end of the context, unless `max_new_tokens` caps it;
a turn needs room for its prompt plus max_new_tokens (capped at half of max_length; without a cap, room for
256 new tokens). When the conversation does not fit, the oldest turns (a user message and all that follows it
up to the next one) are dropped, the system prompt kept, and the shortened conversation is prefilled from the
first changed token. If the newest messages alone do not fit, `ContextOverflowError`.
"""
import threading
from typing import Iterator

from toolkit.errors import ArgumentError, ContextOverflowError
from toolkit.kv_cache import PrefixCache
from toolkit.generation import Completion, Stats
from toolkit.tool_chat import tool_answer
from toolkit.tool_spec import tool_request
from toolkit.tools import ToolCallStream, items

ROOM = 256  # new tokens a turn without a cap keeps room for (older turns are dropped to make it)


class ChatSession:
    """One conversation with a Model. `send` takes one turn at a time (a second concurrent `send` on the
    same session raises ArgumentError); separate sessions on one Model may run in separate threads."""

    def __init__(self, model, system: str | None = None, tools=None, tool_choice="auto",
                 parallel_tool_calls: bool = True, **defaults):
        """system: the system prompt (None: the template's default); tools, tool_choice, parallel_tool_calls: as
        in Model.chat, for every turn; defaults: options used by every `send` (max_new_tokens (default None:
        no cap), temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, grammar, json_schema)."""
        self.model = model
        self.system = system
        self.tools = None if tools is None else tool_request(tools, tool_choice, parallel_tool_calls)
        self.defaults = defaults
        self.messages: list[dict] = []  # the turns, oldest first (the system prompt apart)
        self.dropped_turns = 0  # turns (a user message and what follows it) dropped to fit the context
        self.last: Stats | None = None  # timing of the last turn
        self.finish_reason: str | None = None  # how the last answer ended: "stop" or "length"
        self._text = ""  # the last answer's text as the model wrote it
        self._prefix = PrefixCache(model.new_cache(1))
        self._draft_prefix: PrefixCache | None = None  # the draft model's cache, made on the first turn using it
        self._draft_model = None
        self._busy = threading.Lock()

    @property
    def history(self) -> list[dict]:
        """The conversation as the model sees it: the system prompt (if set), then the turns."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + [dict(m) for m in self.messages]

    @property
    def context_used(self) -> int:
        """Tokens whose keys and values the cache holds."""
        return len(self._prefix.ids)

    def reset(self, system: str | None = None) -> None:
        """Forget the turns (and the cache); a new system prompt if given, else keep the current one."""
        if system is not None:
            self.system = system
        self.messages, self.dropped_turns, self.last = [], 0, None
        self._prefix = PrefixCache(self.model.new_cache(1))
        self._draft_prefix = self._draft_model = None

    def set_system(self, system: str | None) -> None:
        """Change the system prompt; the turns stay, the next turn re-prefills from the first changed token."""
        self.system = system

    def send(self, message, stream: bool = False, **options):
        """Add a user message (a str) and answer it: the answer's text, or with stream=True an iterator of its
        pieces (the turn is recorded when the iterator ends or is closed; a stopped answer is kept as far
        as it got). `message` may also be a {"role": "user" or "tool", "content": str} dict or a list of them
        (tool results). With tools, a ToolAnswer or an iterator of content pieces and ToolCalls instead.
        Options override the session's defaults for this turn; literal_content=True keeps special-token text
        in user and tool content plain text (see Model.encode). A message or option that is refused
        (ArgumentError, ContextOverflowError) leaves the conversation as it was."""
        new = new_messages(message)
        options = {"max_new_tokens": None} | self.defaults | options
        literal = options.pop("literal_content", False)
        if self.tools is not None:
            options |= self.tools.constrain(options.pop("grammar", None), options.pop("json_schema", None))
        draft = self.model.check_options(**options)["draft"]  # bad options raise here, before the turn starts
        parser = ToolCallStream(self.tools.names) if self.tools is not None and self.tools.parse else None
        pieces = self._turn(new, options, literal, draft, parser)
        if stream:
            return pieces
        if self.tools is None:
            return "".join(pieces)
        for _ in pieces:
            pass
        return tool_answer(self.tools, self._text, self.finish_reason, parser and parser.result())

    def _turn(self, new: list[dict], options: dict, literal: bool, draft, parser: ToolCallStream | None) -> Iterator:
        """Run one turn, yielding the answer's pieces (with a `parser`: content pieces and ToolCalls)."""
        if not self._busy.acquire(blocking=False):
            raise ArgumentError("ChatSession.send: a turn is already in progress on this session")
        try:
            ids, kept = self._fit(new, options.get("max_new_tokens"), literal)
            self.dropped_turns += turns(self.messages) - turns(kept)
            self.messages = kept
            draft_cache = None
            if draft is not None:
                if self._draft_model is not draft:
                    self._draft_prefix, self._draft_model = PrefixCache(draft.new_cache(1)), draft
                draft_cache = self._draft_prefix.reuse(ids)
            cache = self._prefix.reuse(ids)
            done, stats, answer, parsed = [Completion("", ids)], Stats(), "", False
            try:
                for _, piece in self.model.run([ids], collect=done, cache=cache, stats=stats,
                                               **(options | {"draft": draft or False, "draft_cache": draft_cache})):
                    answer += piece
                    if parser is None:
                        yield piece
                    else:
                        yield from items(parser.push(piece))
                if parser is not None:
                    events, parsed = parser.finish(), True
                    yield from items(events)
            finally:  # also on Ctrl-C or a closed stream: remember what the model has seen and said
                self._prefix.record(ids, done[0].token_ids)
                if draft_cache is not None:
                    self._draft_prefix.record(ids, done[0].token_ids)
                if parser is not None and not parsed:
                    parser.finish()
                message = {"role": "assistant", "content": answer} if parser is None else parser.result().message()
                self.messages += new + [message]
                self.last, self.finish_reason, self._text = stats, done[0].finish_reason, answer
        finally:
            self._busy.release()

    def _fit(self, new: list[dict], max_new_tokens, literal: bool) -> tuple[list[int], list[dict]]:
        """Token ids of the conversation plus the `new` messages, and the turns kept: the oldest are dropped
        until it fits (self.messages is left as it is)."""
        limit = self.model.max_length
        reserve = min(max_new_tokens if isinstance(max_new_tokens, int) else ROOM, limit // 2)
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        tools = self.tools.rendered if self.tools is not None else None
        kept = self.messages
        while True:
            ids = self.model.encode(system + kept + new, chat=True, literal_content=literal,
                                    tools=tools)
            if len(ids) + reserve <= limit:
                return ids, kept
            if not kept:
                raise ContextOverflowError(f"message: {len(ids)} tokens with the system prompt, and {reserve} "
                                           f"new tokens, do not fit max_length {limit}")
            kept = drop_oldest_turn(kept)


def new_messages(message) -> list[dict]:
    """What `send` adds: a str is a user message; a dict or a list of dicts are user or tool messages."""
    if isinstance(message, str):
        if not message:
            raise ArgumentError("message: expected a non-empty string")
        return [{"role": "user", "content": message}]
    messages = [message] if isinstance(message, dict) else message
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("user", "tool") and isinstance(m.get("content"), str)
            for m in messages):
        raise ArgumentError("message: expected a non-empty string, or {'role': 'user' or 'tool', 'content': str} "
                            "messages")
    return [dict(m) for m in messages]


def turns(messages: list[dict]) -> int:
    """How many turns: user messages, and a first message of another role."""
    return sum(1 for i, m in enumerate(messages) if m["role"] == "user" or i == 0)


def drop_oldest_turn(messages: list[dict]) -> list[dict]:
    """The messages without the first turn: its first message and all up to the next user message."""
    for i in range(1, len(messages)):
        if messages[i]["role"] == "user":
            return messages[i:]
    return []
