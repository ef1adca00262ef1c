"""What one generated sequence carries: its result (Completion, Stats), its per-row state while it decodes
(Row: sampler, seen ids, text stream, stop), and prompt-lookup drafting. toolkit/model.py runs the graphs;
toolkit/speculative.py drafts with a second, smaller model."""
from dataclasses import dataclass, field

import numpy as np

from toolkit.tokenizer import TextStream


@dataclass
class Stats:
    """Timing of one generation call (for a batch, of the whole batch)."""

    prompt_tokens: int = 0  # prompt length (the longest row of a batch)
    reused_tokens: int = 0  # prompt tokens whose KV came from a cache (ChatSession), not prefilled
    prefill_seconds: float = 0.0  # prefill call: the time to the first token's logits
    generated_tokens: int = 0  # tokens sampled (per row, the longest)
    decode_seconds: float = 0.0  # every decode call after the prefill
    drafted_tokens: int = 0  # speculative decoding (a draft model or prompt lookup): tokens proposed
    accepted_tokens: int = 0  # ... and how many of them the model kept

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return (self.prompt_tokens - self.reused_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the decode calls (the first token comes from the prefill)."""
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Completion:
    """One generated sequence: its text, the token ids in and out, and why it ended."""

    text: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (end token or stop string) or "length"
    stats: Stats = field(default_factory=Stats)


class Row:
    """One sequence of a generation: its sampler, the ids seen (for the repetition penalty and prompt
    lookup), its text stream and stop state, and its grammar matcher if its output is constrained
    (toolkit/constrained.py: the logits are masked before sampling); `take(token)` records a chosen token."""

    def __init__(self, prompt: list[int], eos_ids: frozenset, tokenizer, stop: tuple, collect: Completion | None,
                 sampler, matcher=None):
        self.eos_ids, self.collect, self.sampler, self.matcher = eos_ids, collect, sampler, matcher
        self.stream = TextStream(tokenizer, stop)
        self.seen = list(prompt)
        self.alive = True

    def sample(self, logits: np.ndarray, then: list[int] = ()) -> int:
        """The next token given `logits`, after the tokens seen (and `then`, tokens assumed to follow)."""
        if self.matcher is not None:
            logits = self.matcher.mask(logits)
        return self.sampler(logits, np.asarray(self.seen + list(then), dtype=np.int64))

    def take(self, token: int) -> tuple[int, str]:
        """Record `token`; returns it and the text that became final. An end token, a stop string or a
        grammar that is complete ends the row (finish_reason "stop")."""
        if self.collect is not None:
            self.collect.token_ids.append(token)
        if token in self.eos_ids:
            self.alive = False
            self._finish("stop")
            return token, self.stream.flush()
        self.seen.append(token)
        piece = self.stream.push(token)
        if self.matcher is not None:
            self.matcher.consume(token)
            if self.matcher.done and not self.stream.stopped:
                self.alive = False
                self._finish("stop")
                return token, piece + self.stream.flush()
        if self.stream.stopped:
            self.alive = False
            self._finish("stop")
        return token, piece

    def take_accepted(self, tokens: list[int]):
        """Record accepted draft tokens in order, yielding the text that becomes final; stops at the one that
        ends the row. Returns (as the generator's value) how many were taken."""
        for n, token in enumerate(tokens, 1):
            _, piece = self.take(token)
            if piece:
                yield piece
            if not self.alive:
                return n
        return len(tokens)

    def flush(self) -> str:
        return self.stream.flush() if self.alive else ""

    def _finish(self, reason: str) -> None:
        if self.collect is not None:
            self.collect.finish_reason = reason


def prompt_lookup(tokens: list[int], max_draft: int, max_ngram: int = 3) -> list[int]:
    """Draft tokens for the sequence `tokens`: find its last n-gram (n = max_ngram down to 1) at its most
    recent earlier place in the sequence, and return up to `max_draft` tokens that followed it there."""
    if max_draft <= 0:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every earlier n-gram's start
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = hits[-1] + n
            return seq[start:start + max_draft].tolist()
    return []
