"""Perplexity of a model folder on a text and, against a reference folder, the figures llama.cpp's
`llama-perplexity --kl-divergence` reports: mean KL(reference ‖ model), its 99th percentile, top-1
agreement and the PPL ratio.

The text is scored in sliding windows through the folder's score graph (logits for every position):
window k covers tokens [start, start + window) with start = k * stride, and scores only the targets the
previous window did not, so every scored token (but those of the first window) sees at least
window − stride tokens of context.
"""
import time
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ArgumentError


@dataclass
class Scores:
    """Per-target figures of one model on one text (and against a reference, when given)."""

    nll: np.ndarray  # -log p(token), float64 [n]
    kl: np.ndarray | None = None  # KL(reference ‖ model) per target
    top1: np.ndarray | None = None  # argmax(model) == argmax(reference) per target
    ref_nll: np.ndarray | None = None

    def summary(self) -> dict:
        out = {"tokens_scored": int(self.nll.size), "ppl": float(np.exp(self.nll.mean()))}
        if self.kl is not None:
            ref_ppl = float(np.exp(self.ref_nll.mean()))
            out |= {"reference_ppl": ref_ppl, "ppl_ratio": out["ppl"] / ref_ppl,
                    "kl_mean": float(self.kl.mean()), "kl_p99": float(np.percentile(self.kl, 99)),
                    "kl_max": float(self.kl.max()), "top1": float(self.top1.mean())}
        return out


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target) for each window over n tokens; targets first_target..end-1 are scored,
    each predicted by the logits one position earlier."""
    if window < 2 or not 1 <= stride <= window:
        raise ArgumentError(f"window {window} / stride {stride}: expected window >= 2 and 1 <= stride <= window")
    if n < 2:
        raise ArgumentError(f"text: {n} tokens; expected at least 2 to score")
    out = [(0, min(window, n), 1)]
    while out[-1][1] < n:
        start = out[-1][0] + stride
        out.append((start, min(start + window, n), out[-1][1]))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 logits [..., V] -> float64 log-probabilities."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def window_logprobs(model, ids: list[int], start: int, end: int, first_target: int) -> np.ndarray:
    """Log-probabilities [n_targets, V] of the predictions for targets first_target..end-1."""
    chunk = np.array([ids[start:end]], dtype=np.int64)
    # logits of positions first_target-1 .. end-2 predict the targets; the lm_head runs on those only
    n = end - first_target + 1
    logits = model.forward("prefill", chunk, np.ones_like(chunk), model.new_cache(1), num_logits=n)[0]
    return log_softmax(logits[:-1])


def evaluate(model, ids: list[int], reference=None, window: int = 512, stride: int = 256, progress=None) -> Scores:
    """Score token ids with `model` (and `reference`, another loaded folder with the same tokenizer)."""
    plan = windows(len(ids), window, stride)
    parts = []
    for start, end, first in plan:
        targets = np.array(ids[first:end])
        lp = window_logprobs(model, ids, start, end, first)
        part = {"nll": -lp[np.arange(targets.size), targets]}
        if reference is not None:
            ref = window_logprobs(reference, ids, start, end, first)
            part |= {"kl": (np.exp(ref) * (ref - lp)).sum(axis=-1), "top1": ref.argmax(-1) == lp.argmax(-1),
                     "ref_nll": -ref[np.arange(targets.size), targets]}
        parts.append(part)
        if progress:
            progress(end - first)
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Scores(**joined)


def evaluate_text(model, text: str, reference=None, window: int = 512, stride: int = 256, progress=None) -> dict:
    """The JSON-ready report of `qwen-edge eval`."""
    ids = model.tokenizer.encode(text)
    if reference is not None and reference.tokenizer.encode(text) != ids:
        raise ArgumentError("--reference: tokenizes the text differently; expected an export of the same checkpoint")
    window = min(window, model.max_length)
    started = time.perf_counter()
    scores = evaluate(model, ids, reference, window, stride, progress)
    q = model.manifest["quantization"]
    return {"model": str(model.manifest.folder), "reference": str(reference.manifest.folder) if reference else None,
            "quantization": {k: q.get(k) for k in ("bits", "group_size", "symmetric", "accuracy_level", "method")},
            "tokens": len(ids), "window": window, "stride": stride,
            "seconds": round(time.perf_counter() - started, 1)} | scores.summary()

