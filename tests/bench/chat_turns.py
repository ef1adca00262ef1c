"""Time to first token per turn of a 5-turn chat: ChatSession (KV cache kept, only new tokens prefilled)
against re-sending the whole history each turn (what a stateless API does). Not run in CI.

    .venv/bin/python tests/bench/chat_turns.py MODEL [--threads 2] [--max-new-tokens 96]

Greedy, so both columns see the same conversation; prints a markdown table.
"""
import argparse

import toolkit

TURNS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Make it ignore case and punctuation.",
    "Now add type hints and a docstring.",
    "Write three pytest tests for it.",
    "Summarize what the function does in one sentence.",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    model = toolkit.load(args.model, threads=args.threads, max_length=4096)
    options = dict(temperature=0, max_new_tokens=args.max_new_tokens)

    chat = model.chat_session(**options)
    rows = []
    for i, text in enumerate(TURNS, 1):
        history = chat.history + [{"role": "user", "content": text}]
        fresh = model.complete([history], **options)[0]  # the whole history prefilled again
        fresh_ttft = fresh.stats.prefill_seconds
        answer = chat.send(text)
        s = chat.last
        same = "yes" if answer == fresh.text else "no"
        rows.append((i, s.prompt_tokens, s.prompt_tokens - s.reused_tokens, s.prefill_seconds, fresh_ttft,
                     s.decode_tokens_per_second, same))
    print(f"model {args.model}, {args.threads} threads, greedy, {args.max_new_tokens} new tokens at most\n")
    print("| turn | prompt tokens | prefilled (ChatSession) | TTFT ChatSession ms | TTFT full re-prefill ms "
          "| decode tok/s | same answer |")
    print("|---|---|---|---|---|---|---|")
    for i, total, new, ttft, fresh, tps, same in rows:
        print(f"| {i} | {total} | {new} | {1000 * ttft:.0f} | {1000 * fresh:.0f} | {tps:.1f} | {same} |")


if __name__ == "__main__":
    main()
