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

Context policy: a turn needs room for its prompt plus `max_new_tokens` (capped at half of max_length).
When the conversation does not fit, the oldest user/assistant turns are dropped, the system prompt kept,
and the shortened conversation is prefilled from the first changed token. If the newest message alone
does not fit, `ContextOverflowError`.
"""
import threading
from typing import Iterator

from toolkit.errors import ArgumentError, ContextOverflowError
from toolkit.kv_cache import PrefixCache
from toolkit.generation import Completion, Stats


class ChatSession:
    """One conversation with a Model. `send` takes one turn at a time (a second concurrent `send` on the
    same session raises ArgumentError); separate sessions on one Model may run in separate threads."""

    def __init__(self, model, system: str | None = None, **defaults):
        """system: the system prompt (None: the template's default); defaults: sampling options used by
        every `send` (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)."""
        self.model = model
        self.system = system
        self.defaults = defaults
        self.messages: list[dict] = []  # user and assistant turns, oldest first (the system prompt apart)
        self.dropped_turns = 0  # user/assistant pairs dropped to fit the context
        self.last: Stats | None = None  # timing of the last turn
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

    def send(self, text: str, stream: bool = False, **options):
        """Add a user message and answer it: the answer's text, or with stream=True an iterator of its
        pieces (the turn is recorded when the iterator ends or is closed; a stopped answer is kept as far
        as it got). Options override the session's defaults for this turn; literal_content=True keeps
        special-token text in the message plain text (see Model.encode). A message or option that is
        refused (ArgumentError, ContextOverflowError) leaves the conversation as it was."""
        if not isinstance(text, str) or not text:
            raise ArgumentError("message: expected a non-empty string")
        options = self.defaults | options
        literal = options.pop("literal_content", False)
        self.model.check_options(**options)  # bad options raise here, before the turn starts
        pieces = self._turn(text, options, literal)
        return pieces if stream else "".join(pieces)

    def _turn(self, text: str, options: dict, literal: bool) -> Iterator[str]:
        if not self._busy.acquire(blocking=False):
            raise ArgumentError("ChatSession.send: a turn is already in progress on this session")
        try:
            user = {"role": "user", "content": text}
            ids, kept = self._fit(user, options.get("max_new_tokens", 256), literal)
            draft = self.model._draft_for(options.get("draft"))
            self.dropped_turns += (len(self.messages) - len(kept)) // 2
            self.messages = kept
            draft_cache = None
            if draft is not None:
                if self._draft_model is not draft:
                    self._draft_prefix, self._draft_model = PrefixCache(draft.new_cache(1)), draft
                draft_cache = self._draft_prefix.reuse(ids)
            cache = self._prefix.reuse(ids)
            done, stats, answer = [Completion("", ids)], Stats(), ""
            try:
                for _, piece in self.model.run([ids], collect=done, cache=cache, stats=stats,
                                               **(options | {"draft": draft or False, "draft_cache": draft_cache})):
                    answer += piece
                    yield piece
            finally:  # also on Ctrl-C or a closed stream: remember what the model has seen and said
                self._prefix.record(ids, done[0].token_ids)
                if draft_cache is not None:
                    self._draft_prefix.record(ids, done[0].token_ids)
                self.messages += [user, {"role": "assistant", "content": answer}]
                self.last = stats
        finally:
            self._busy.release()

    def _fit(self, user: dict, max_new_tokens, literal: bool) -> tuple[list[int], list[dict]]:
        """Token ids of the conversation plus `user`, and the turns kept: the oldest are dropped until it fits
        (self.messages is left as it is)."""
        limit = self.model.max_length
        reserve = min(max_new_tokens, limit // 2) if isinstance(max_new_tokens, int) else 1
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        kept = self.messages
        while True:
            ids = self.model.encode(system + kept + [user], literal_content=literal)
            if len(ids) + reserve <= limit:
                return ids, kept
            if not kept:
                raise ContextOverflowError(f"message: {len(ids)} tokens with the system prompt, and {reserve} "
                                           f"new tokens, do not fit max_length {limit}")
            kept = kept[2:]  # the oldest user message and its answer
