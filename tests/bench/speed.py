"""Quick speed probe of exported folders (not a test; `qwen-edge bench` in a later issue supersedes it).

    python tests/bench/speed.py models/q4 models/f32 [--prompt-tokens 137] [--new-tokens 64] [--threads 2]

Prints load time, prefill tok/s and greedy decode tok/s (median of --runs) for each folder.
"""
import argparse
import time

import numpy as np

import toolkit
from toolkit.kv_cache import KVCache


def measure(folder, prompt_tokens, new_tokens, threads, runs):
    t = time.perf_counter()
    m = toolkit.load(folder, threads=threads, max_length=prompt_tokens + new_tokens + 1)
    load = time.perf_counter() - t
    ids = (m.tokenizer.encode("Write a Python function that reverses a string. ") * prompt_tokens)[:prompt_tokens]
    rates = []
    for _ in range(runs):
        cache = KVCache(m.manifest["kv_cache"], 1)
        t = time.perf_counter()
        logits = m._step(m.prefill, np.array([ids]), np.ones((1, len(ids)), np.int64), cache)
        prefill = time.perf_counter() - t
        tokens = list(ids)
        t = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(int(logits[0].argmax()))
            logits = m._step(m.decode, np.array([tokens[-1:]]), np.ones((1, len(tokens)), np.int64), cache)
        rates.append((len(ids) / prefill, new_tokens / (time.perf_counter() - t)))
    prefill_rate, decode_rate = np.median(np.array(rates), axis=0)
    print(f"{folder}: load {load:.2f} s, prefill {prefill_rate:.0f} tok/s, decode {decode_rate:.1f} tok/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--prompt-tokens", type=int, default=137)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    for folder in a.folders:
        measure(folder, a.prompt_tokens, a.new_tokens, a.threads, a.runs)


if __name__ == "__main__":
    main()
