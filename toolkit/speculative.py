"""Speculative decoding with a draft model: a smaller export with the same tokenizer proposes a few tokens,
the target model checks them all in one call.

    target = toolkit.load("models/qwen-7b-int4", draft="models/qwen-0.5b-int4")
    target.generate("Explain list comprehensions.", temperature=0)    # the target's answer, sooner

One round, after the target has chosen its next token x (from the prefill, or the previous round):
1. the draft, with its own KV cache, is fed what it has not seen yet (x, and whatever else the round before
   accepted) and then proposes k tokens d1..dk, one call each (it stops early at an end token);
2. the target runs ONE prefill call on [x, d1..dk] with num_logits = k+1: the distributions p0..pk of the
   token after x, after d1, ..., after dk (as `Model._lookup_loop` verifies prompt-lookup drafts);
3. the longest acceptable prefix d1..dj is kept, plus one token chosen by the target (a correction at the
   first rejected position, or a bonus token after dk when everything was accepted); both KV caches are cut
   back (KVCache.truncate) to the tokens kept.
A round costs k draft steps and one target call, and yields j+1 tokens.

Acceptance. Greedy (temperature 0): d(i+1) is accepted when it is the target's argmax after d1..di (with the
repetition penalty over the sequence so far, as plain decoding applies it), so the output is token for token
that of the target alone — exactly so where the graph computes the same logits for a position in a
multi-token call as in a single-token step (float32 weights, tested). Quantized matrices at accuracy level 4
round differently at M = 1 and M > 1 (MatMulNBits' two kernels): a near-tie can then resolve the other way,
as between a ChatSession and a full re-prefill (measured once in 128 tokens on the int8 sample, prose: a
logit gap of 0.055; the same holds for prompt lookup). Both answers are greedy answers of that model.
Sampling: standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023):
p and q are the target's and the draft's probability vectors after the SAME processing (repetition penalty,
temperature, top-k, top-p; `toolkit.sampling.distribution`); d is accepted with probability min(1, p(d)/q(d)),
on a rejection the token is drawn from norm(max(0, p - q)), and when all k are accepted a bonus token is drawn
from pk. Each kept token is then distributed exactly as the target's sampler would draw it. One seeded
generator (the row's sampler's) serves the draft's draws and the acceptance tests, so a seed reproduces.

Adaptive k: it starts at min(4, draft_tokens); after a round in which every drafted token was accepted
k grows by 2, after a round with a rejection it shrinks by 1, always within 1..draft_tokens (1 to 16,
default 8). This is the schedule of transformers' assisted generation ("heuristic"); it settles where about
a third of the rounds are accepted in full. (A timing-based rule could pick k from measured step costs, but
would make a seeded sampling run depend on the machine's speed.)

Measured (tests/bench/draft.py, 2 shared cores, the int4 sample as the draft, greedy, 128 tokens, two runs):
the fp32 sample decodes 1.45-2.26x faster (acceptance 66-91 %); the int8 sample 0.67-1.32x (its step costs
little more than the draft's). A verify call of k+1 tokens costs 1.1x (k=1) to 1.9x (k=16) a step on the
fp32 0.5B, but 1.2x (k=1), 1.9x (k=4) and 4.0x (k=16) on a 7B-shaped int4 export, whose MatMulNBits kernels
are compute-bound at M > 1 on 2 cores: a big quantized target wants a small k (draft_tokens 1-4), hence a
default cap of 8, not 16. A draft turns onnxruntime's thread spinning off in both models (Model._stop_spinning).

Compatibility: the draft must map every token to the same id as the target (`check_draft`): the whole
token -> id map, added and special tokens included, is compared. Comparing files or hashes would refuse
equivalent exports (a GGUF export rebuilds tokenizer.json, a Hugging Face export copies it); the graphs'
vocabulary widths may differ (Qwen2.5-7B's lm_head has 152064 rows, 0.5B's 151936, for the same 151665
tokens), so logits are compared over the wider of the two, zero-padded.
"""
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.errors import ArgumentError
from toolkit.generation import Row, Stats
from toolkit.kv_cache import KVCache
from toolkit.sampling import candidates, distribution, draw

K_START, K_LIMIT = 4, 16  # first k; the largest k (and draft_tokens) allowed
K_DEFAULT = 8  # draft_tokens when not given: the largest k the schedule may reach (see "Measured")


def check_draft_tokens(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= K_LIMIT:
        raise ArgumentError(f"draft_tokens {value}: expected an integer from 1 to {K_LIMIT}")
    return value


def check_draft(target, draft) -> None:
    """Raise ArgumentError (one line) unless `draft` can draft for `target`: both tokenizers map every token,
    added and special ones included, to the same id."""
    a, b = vocabulary(target.tokenizer), vocabulary(draft.tokenizer)
    if a == b:
        return
    where = f"draft {draft.manifest.folder}: its tokenizer differs from {target.manifest.folder}'s"
    if len(a) != len(b):
        raise ArgumentError(f"{where} ({len(b)} tokens against {len(a)}); a draft needs the same tokenizer")
    token = next(t for t in sorted(a, key=a.get) if b.get(t) != a[t])
    raise ArgumentError(f"{where} (token {token!r} is id {b.get(token)} there, {a[token]} here); "
                        "a draft needs the same tokenizer")


def vocabulary(tokenizer) -> dict[str, int]:
    """The token -> id map of a toolkit Tokenizer, added tokens included."""
    return tokenizer._tok.get_vocab(with_added_tokens=True)


class AdaptiveK:
    """How many tokens to draft next: see the module docstring."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.k = min(K_START, maximum)

    def update(self, drafted: int, accepted: int) -> None:
        self.k = min(self.k + 2, self.maximum) if accepted == drafted else max(1, self.k - 1)


def feed(model, cache: KVCache, ids: list[int]) -> np.ndarray:
    """Run `ids` through `model` on top of `cache` (one row, no padding); the logits [V] after the last one."""
    fed = np.array([ids], dtype=np.int64)
    mask = np.ones((1, cache.length + len(ids)), dtype=np.int64)
    if len(ids) == 1:
        return model.forward("decode", fed, mask, cache)[0]
    return model.forward("prefill", fed, mask, cache)[0, -1]


def speculative_loop(target, draft, row: Row, logits: np.ndarray, cache: KVCache, draft_cache: KVCache,
                     max_new_tokens: int, draft_tokens: int, stats: Stats, started: float) -> Iterator[str]:
    """Decode one row of `target` with `draft` proposing tokens; yields text pieces. `logits`: the target's
    logits after the prompt, whose keys and values `cache` holds; `draft_cache` holds the KV of some prefix of
    the prompt (empty, or a chat's earlier turns) and is extended and cut back alongside. When it returns,
    each cache holds the right keys and values for at least the first len(prompt + generated) - 1 tokens
    (so PrefixCache.record works for both)."""
    sampler = row.sampler
    params, rng = sampler.params, sampler.rng
    greedy = params.temperature == 0
    schedule = AdaptiveK(draft_tokens)
    generated = 0
    x = row.sample(logits)
    try:
        while True:
            _, piece = row.take(x)
            generated += 1
            if piece:
                yield piece
            if not row.alive or generated >= max_new_tokens:
                return
            seq = row.seen  # the prompt and every token taken, x last
            # tokens beyond the next one that could still be kept; the draft must hold seq and k - 1 drafts
            n = min(schedule.k, max_new_tokens - generated - 1, draft.max_length - len(seq) + 1)
            if n < 1:  # the last token, or no room left in the draft's context: a plain step
                x = row.sample(feed(target, cache, [x]))
                continue
            drafts, qs = propose(draft, draft_cache, row, seq, n, greedy, rng)
            fed = np.array([[x] + drafts], dtype=np.int64)
            mask = np.ones((1, cache.length + fed.shape[1]), dtype=np.int64)
            verified = target.forward("prefill", fed, mask, cache, num_logits=fed.shape[1])[0]
            if greedy:
                accepted, x = verify_greedy(row, verified, drafts)
            else:
                accepted, x = verify_sampled(row, verified, drafts, qs, rng)
            cache.truncate(cache.length - len(drafts) + accepted)  # keeps x(old), d1..d_accepted
            draft_cache.truncate(min(draft_cache.length, cache.length))
            stats.drafted_tokens += len(drafts)
            stats.accepted_tokens += accepted
            schedule.update(len(drafts), accepted)
            generated += yield from row.take_accepted(drafts[:accepted])
            if not row.alive:
                return
    finally:
        stats.generated_tokens = generated
        stats.decode_seconds = time.perf_counter() - started


def propose(draft, draft_cache: KVCache, row: Row, seq: list[int], n: int, greedy: bool,
            rng: np.random.Generator) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
    """Up to `n` draft tokens after `seq`, and for sampling the draft's distribution q (candidate ids and
    probabilities) each was drawn from. The draft is first fed what it has not seen of `seq`; the last
    draft token is not fed (the next round feeds it if it is accepted). Stops after an end token."""
    pending = seq[draft_cache.length:]
    drafts, qs = [], []
    while True:
        logits = feed(draft, draft_cache, pending)
        if greedy:  # the target's greedy rule (the same repetition penalty) on the draft's logits
            token = row.sample(logits, drafts)
        else:
            ids, probs = candidates(logits, np.asarray(seq + drafts, dtype=np.int64), row.sampler.params)
            token = draw(ids, probs, rng)
            qs.append((ids, probs))
        drafts.append(token)
        if len(drafts) == n or token in row.eos_ids:
            return drafts, qs
        pending = [token]


def verify_greedy(row: Row, verified: np.ndarray, drafts: list[int]) -> tuple[int, int]:
    """(drafts accepted, the target's next token after them): greedy's choice at each position."""
    accepted = 0
    while True:
        choice = row.sample(verified[accepted], drafts[:accepted])
        if accepted == len(drafts) or choice != drafts[accepted]:
            return accepted, choice
        accepted += 1


def verify_sampled(row: Row, verified: np.ndarray, drafts: list[int], qs: list, rng: np.random.Generator
                   ) -> tuple[int, int]:
    """Speculative sampling: (drafts accepted, the next token: a draw from norm(max(0, p - q)) at the first
    rejection, or from p after the last draft when all were accepted)."""
    params = row.sampler.params
    seen = list(row.seen)
    width = max(verified.shape[-1], max(int(ids.max()) + 1 for ids, _ in qs))
    for i, d in enumerate(drafts):
        p = distribution(verified[i], np.asarray(seen + drafts[:i], dtype=np.int64), params, width)
        ids, probs = qs[i]
        q = np.zeros(width)
        q[ids] = probs
        if rng.random() * q[d] < p[d]:  # accept with probability min(1, p(d) / q(d)); q(d) > 0: d was drawn from q
            continue
        residual = np.maximum(p - q, 0.0)
        keep = np.flatnonzero(residual)
        if keep.size == 0:  # p == q up to rounding: a rejection cannot happen in exact arithmetic
            keep, residual = np.flatnonzero(p), p
        return i, draw(keep, residual[keep], rng)
    return len(drafts), row.sample(verified[len(drafts)], drafts)


def resolve(target, draft, load_draft) -> "object | None":
    """The draft Model for `draft`: None, a folder (loaded with `load_draft`) or a Model; checked."""
    if draft is None:
        return None
    if isinstance(draft, (str, Path)):
        draft = load_draft(Path(draft))
    if not hasattr(draft, "tokenizer") or not hasattr(draft, "forward"):
        raise ArgumentError(f"draft {draft!r}: expected a model folder or a toolkit Model")
    check_draft(target, draft)
    return draft
