"""`qwen-edge bench`: load time, time to first token, prefill and decode speed, peak RSS, weights on disk.

Greedy with end tokens ignored, so every run decodes the same number of tokens. Each run starts from an
empty cache: prefill of the prompt (its time is the time to first token), then new_tokens - 1 decode calls.
"""
import resource
import sys
import time

import numpy as np

from toolkit.errors import ArgumentError

# A fixed English + code passage; the prompt is its first N tokens (repeated if N is larger).
PROMPT_TEXT = (
    "You are reviewing a small Python module. Explain what it does, point out any bug, and suggest a test.\n\n"
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n"
    "    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n"
    "        if i >= window:\n            total -= values[i - window]\n        if i >= window - 1:\n"
    "            out.append(total / window)\n    return out\n\n"
)


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def stats(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def greedy_timed(model, ids: list[int], steps: int) -> tuple[float, float, list[int]]:
    """Prefill `ids`, then `steps` greedy single-token calls, end tokens ignored: (seconds to the first
    token, seconds of the steps, the steps + 1 tokens chosen). Shared with tests/bench/peer_qwen_edge.py."""
    cache = model.new_cache(1)
    mask = np.ones((1, len(ids)), dtype=np.int64)
    t0 = time.perf_counter()
    tokens = [int(np.argmax(model.forward("prefill", np.array([ids], dtype=np.int64), mask, cache)[0, -1]))]
    t1 = time.perf_counter()
    for _ in range(steps):
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        tokens.append(int(np.argmax(model.forward("decode", np.array([tokens[-1:]], dtype=np.int64), mask, cache)[0])))
    return t1 - t0, time.perf_counter() - t1, tokens


def bench(folder, prompt_tokens: int = 128, new_tokens: int = 128, runs: int = 3, threads: int | None = None,
          provider: str = "cpu", prepack_cache=False) -> dict:
    """Measure one model folder; returns the JSON-ready report. prepack_cache: as toolkit.load's (the load
    time is then the first load's, making the cache, or a later load's, mapping it)."""
    from toolkit.model import load

    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 2), ("runs", runs, 1)):
        if not isinstance(value, int) or value < low:
            raise ArgumentError(f"--{name.replace('_', '-')} {value}: expected an integer >= {low}")
    t = time.perf_counter()
    model = load(folder, provider=provider, threads=threads, max_length=prompt_tokens + new_tokens + 1,
                 prepack_cache=prepack_cache)
    load_s = time.perf_counter() - t
    ids = prompt_ids(model.tokenizer, prompt_tokens)
    ttft, decode = [], []
    greedy_timed(model, ids[:8], 1)  # warm-up: first calls allocate ORT's arenas
    for _ in range(runs):
        first, rest, _ = greedy_timed(model, ids, new_tokens - 1)
        ttft.append(first)
        decode.append((new_tokens - 1) / rest)
    files = model.manifest["files"]
    q = model.manifest["quantization"]
    return {
        "model": str(model.manifest.folder), "bits": q["bits"], "group_size": q.get("group_size"),
        "accuracy_level": q.get("accuracy_level"), "threads": threads, "provider": provider,
        "prepack_cache": bool(prepack_cache),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs,
        "load_s": load_s, "ttft_s": stats(ttft), "prefill_tok_s": stats([prompt_tokens / s for s in ttft]),
        "decode_tok_s": stats(decode), "peak_rss_bytes": peak_rss_bytes(),
        "weights_bytes": files[model.manifest["weights_file"]]["bytes"],
        "folder_bytes": sum(f["bytes"] for f in files.values()),
    }


def format_report(r: dict) -> str:
    def s3(d, fmt):
        return f"{fmt.format(d['median'])} (min {fmt.format(d['min'])}, max {fmt.format(d['max'])})"
    return "\n".join([
        f"model        {r['model']}  (bits {r['bits']}, group {r['group_size']}, accuracy_level {r['accuracy_level']})",
        f"setup        {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, {r['runs']} runs, "
        f"threads {r['threads'] or 'default'}, {r['provider']}",
        f"load         {r['load_s']:.2f} s" + (" (through the prepack cache)" if r.get("prepack_cache") else ""),
        f"first token  {s3({k: v * 1000 for k, v in r['ttft_s'].items()}, '{:.0f}')} ms",
        f"prefill      {s3(r['prefill_tok_s'], '{:.1f}')} tok/s",
        f"decode       {s3(r['decode_tok_s'], '{:.1f}')} tok/s",
        f"peak RSS     {r['peak_rss_bytes'] / 2**20:,.0f} MiB",
        f"on disk      weights {r['weights_bytes'] / 2**20:,.1f} MiB, folder {r['folder_bytes'] / 2**20:,.1f} MiB",
    ])
