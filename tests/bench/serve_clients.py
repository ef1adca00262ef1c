"""`qwen-edge serve` under 8 concurrent openai clients on a real model folder (not run in CI).

    .venv/bin/python tests/bench/serve_clients.py MODEL [--clients 8] [--max-tokens 64] [--threads 2]

Starts the server on a free loopback port, sends the clients at once (half streaming), and prints per
client: time to its first piece, total time, tokens; then /health. Greedy, so every answer is checked
against the same prompt answered alone in-process.
"""
import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

EXE = str(Path(sys.executable).parent / "qwen-edge")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([EXE, "serve", args.model, "--port", str(port), "--threads", str(args.threads),
                             "--max-length", "2048"], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
        prompts = [f"In one sentence, what is {topic}?" for topic in
                   ("a hash map", "recursion", "a closure", "a race condition", "big-O notation", "a mutex",
                    "memoization", "a generator", "tail recursion", "a bloom filter")][:args.clients]
        rows = [None] * len(prompts)
        start = time.perf_counter()

        def ask(i):
            t0 = time.perf_counter()
            first = None
            if i % 2:
                text, usage = "", None
                for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[i]}],
                                                            temperature=0, max_tokens=args.max_tokens, stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter() - t0
                        text += chunk.choices[0].delta.content
                    usage = chunk.usage or usage
                tokens = usage.completion_tokens
            else:
                r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[i]}],
                                                   temperature=0, max_tokens=args.max_tokens)
                first, text, tokens = time.perf_counter() - t0, r.choices[0].message.content, r.usage.completion_tokens
            rows[i] = (i, "stream" if i % 2 else "whole", first, time.perf_counter() - t0, tokens, text)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        health = httpx.get(f"{base}/health").json()
    finally:
        proc.terminate()
        proc.wait()

    import toolkit

    local = toolkit.load(args.model, threads=args.threads, max_length=2048)
    print(f"{len(prompts)} clients at once, max_tokens {args.max_tokens}, greedy; wall {wall:.1f} s; /health after: {health}\n")
    print("| client | mode | first piece s | done s | tokens | same as alone |")
    print("|---|---|---|---|---|---|")
    for i, mode, first, done, tokens, text in rows:
        alone = local.generate([{"role": "user", "content": prompts[i]}], temperature=0, max_new_tokens=args.max_tokens)
        print(f"| {i} | {mode} | {first:.2f} | {done:.2f} | {tokens} | {'yes' if alone == text else 'no'} |")


if __name__ == "__main__":
    main()
