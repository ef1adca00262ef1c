"""Choosing the next token from logits: small pure functions chained by `make_sampler` (as mlx-lm does).

Temperature 0 means greedy (argmax). Sampling narrows the vocabulary in this order: repetition penalty, top-k
(argpartition, no full sort), temperature, min-p (keep the tokens at least min_p times as likely as the most
likely one, on the tempered probabilities as transformers does; llama.cpp applies it before the temperature),
top-p (on the renormalised min-p set: min-p first leaves top-p fewer tokens to sort); then it draws from a
seeded numpy Generator, so the same seed gives the same tokens.
`distribution` returns the processed probability vector itself, which speculative sampling with a draft
model compares between the two models (toolkit/speculative.py).
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from toolkit.errors import ArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; `check` raises ArgumentError naming the bad one."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> "SamplingParams":
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ArgumentError(f"temperature {self.temperature}: expected a number >= 0 (0 = greedy) and <= 100")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ArgumentError(f"top_k {self.top_k}: expected an integer >= 0 (0 = no limit)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ArgumentError(f"top_p {self.top_p}: expected a number in (0, 1]")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ArgumentError(f"min_p {self.min_p}: expected a number in [0, 1] (0 = off)")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0.01 <= self.repetition_penalty <= 100:
            raise ArgumentError(f"repetition_penalty {self.repetition_penalty}: expected a number from 0.01 to 100 "
                                "(1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ArgumentError(f"seed {self.seed}: expected an integer >= 0")
        return self


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty (as transformers): divide positive, multiply negative logits of seen tokens."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits (all indices when k is 0 or covers the vocabulary)."""
    if k <= 0 or k >= logits.size:
        return np.arange(logits.size)
    return np.argpartition(logits, -k)[-k:]


def apply_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Zero all but the smallest set of highest probabilities whose sum reaches top_p; renormalise."""
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p * cumulative[-1])) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def apply_min_p(ids: np.ndarray, probs: np.ndarray, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the tokens whose probability is at least min_p times the largest; renormalise."""
    if min_p <= 0:
        return ids, probs
    keep = probs >= min_p * probs.max()
    kept = probs[keep]
    return ids[keep], kept / kept.sum()


def candidates(logits: np.ndarray, seen: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """What a sampling draw chooses from, after the repetition penalty, top-k, temperature, min-p and top-p:
    (token ids, their probabilities, float64, summing to 1). Temperature 0 (greedy): the argmax with
    probability 1."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return np.array([int(np.argmax(logits))]), np.ones(1)
    ids = top_k_candidates(logits, params.top_k)
    picked = logits[ids].astype(np.float64)
    with np.errstate(over="ignore"):  # a tiny temperature overflows the gaps to -inf: their tokens get 0, as meant
        probs = np.exp((picked - picked.max()) / params.temperature)  # shift first: 0s, not NaN
    ids, probs = apply_min_p(ids, probs / probs.sum(), params.min_p)
    return ids, apply_top_p(probs, params.top_p)


def distribution(logits: np.ndarray, seen: np.ndarray, params: SamplingParams, size: int | None = None) -> np.ndarray:
    """The full probability vector (float64, length `size`, default the logits' width) that `make_sampler`
    draws the next token from: zero outside the top-k / top-p candidates, one-hot at the argmax when greedy.
    Speculative sampling compares the target's and the draft's vectors (toolkit/speculative.py)."""
    ids, probs = candidates(logits, seen, params)
    out = np.zeros(size or logits.shape[-1], dtype=np.float64)
    keep = ids < out.size
    out[ids[keep]] = probs[keep]
    return out


def draw(ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    """One id from `ids` with probabilities `probs` (need not be normalised), using one number of `rng`."""
    pick = np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right")
    return int(ids[min(pick, ids.size - 1)])


class Sampler:
    """`sampler(logits [V], seen token ids) -> next token id`; `params` and its seeded generator `rng` are
    exposed so that speculative sampling draws from the same random stream."""

    def __init__(self, params: SamplingParams):
        self.params = params.check()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(apply_repetition_penalty(logits, seen, self.params.repetition_penalty)))
        return draw(*candidates(logits, seen, self.params), self.rng)


def make_sampler(params: SamplingParams) -> Callable[[np.ndarray, np.ndarray], int]:
    """A function (logits [V], seen token ids) -> next token id (a `Sampler`)."""
    return Sampler(params)
