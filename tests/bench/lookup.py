"""Prompt-lookup decoding on a code-editing prompt: qwen-edge int4 plain greedy vs `lookup=N`, and
onnxruntime-genai int4's plain greedy decode on the same prompt ids, in one run (not run in CI).

    .venv/bin/python tests/bench/lookup.py [--work models/peers-run] [--runs 3] [--threads 2]

The model is asked to rewrite a 40-line function with one small change, so most of the answer repeats the
prompt. qwen-edge runs greedy to its end token (every mode must produce the same token ids, checked);
genai decodes the same number of tokens through its runner (tests/bench/peer_genai.py). Speeds are decode
tokens per second: tokens after the first, over the time after the prefill. Prints a markdown table.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402  (also puts the repository on sys.path)

import toolkit  # noqa: E402

FUNCTION = '''def summarize_orders(orders, tax_rate=0.2, currency="EUR"):
    """Totals per customer, the largest order, and a report line per customer."""
    totals = {}
    largest = None
    for order in orders:
        customer = order["customer"]
        amount = order["quantity"] * order["unit_price"]
        if order.get("discount"):
            amount = amount * (1 - order["discount"])
        amount = round(amount * (1 + tax_rate), 2)
        totals[customer] = totals.get(customer, 0) + amount
        if largest is None or amount > largest["amount"]:
            largest = {"customer": customer, "amount": amount}
    lines = []
    for customer in sorted(totals):
        total = totals[customer]
        if total >= 1000:
            tier = "gold"
        elif total >= 500:
            tier = "silver"
        else:
            tier = "bronze"
        lines.append(f"{customer}: {total:.2f} {currency} ({tier})")
    count = len(totals)
    average = sum(totals.values()) / count if count else 0.0
    summary = {
        "customers": count,
        "average": round(average, 2),
        "largest": largest,
        "currency": currency,
    }
    report = "\\n".join(lines)
    if not lines:
        report = "no orders"
    return {
        "totals": totals,
        "summary": summary,
        "report": report,
    }
'''
REQUEST = ("Rewrite this function so that the parameter `orders` is called `purchases` (and the loop variable "
           "`order` is called `purchase`). Change nothing else. Reply with the whole function only.\n\n"
           f"```python\n{FUNCTION}```")


def decode_tps(stats) -> float:
    return stats.decode_tokens_per_second


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers-dir", type=Path, default=Path.home() / ".cache" / "qwen-edge" / "peers")
    ap.add_argument("--work", type=Path, default=peers.ROOT / "models" / "peers-run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drafts", type=int, nargs="*", default=[4, 8, 16])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    peers.export_ours(args.work)
    model = toolkit.load(args.work / "qwen-edge-int4", threads=args.threads, max_length=2048)
    ids = model.encode([{"role": "user", "content": REQUEST}])
    prompt = args.work / "prompt-edit.json"
    prompt.write_text(json.dumps({"ids": ids}))

    rows, reference = {}, None
    for mode in [0] + args.drafts:
        speeds, ttfts = [], []
        for _ in range(args.runs):
            c = model.complete([ids], temperature=0, repetition_penalty=1.0, max_new_tokens=1024, lookup=mode)[0]
            if reference is None:
                reference = c
            assert c.token_ids == reference.token_ids, f"lookup={mode} changed the output"
            speeds.append(decode_tps(c.stats))
            ttfts.append(c.stats.prefill_seconds)
        rows[f"qwen-edge int4, {'plain greedy' if mode == 0 else f'lookup={mode}'}"] = (
            statistics.median(speeds), statistics.median(ttfts))
        print(f"lookup={mode}: {statistics.median(speeds):.1f} tok/s", file=sys.stderr)
    n = len(reference.token_ids)

    out = args.work / "result-genai-edit.json"
    python = args.peers_dir / "genai" / "bin" / "python"
    if python.exists():
        subprocess.run([str(python), str(BENCH / "peer_genai.py"), "--variant", "int4", "--model",
                        str(args.peers_dir / "genai-int4"), "--prompt-ids", str(prompt), "--new-tokens", str(n),
                        "--runs", str(args.runs), "--threads", str(args.threads), "--out", str(out)],
                       stdout=subprocess.DEVNULL, timeout=3600)
    genai = json.loads(out.read_text()) if out.exists() else {"ok": False}
    if genai.get("ok"):
        rows["onnxruntime-genai int4, plain greedy"] = (genai["decode_tok_s"]["median"], genai["ttft_s"]["median"])
    base = rows.get("onnxruntime-genai int4, plain greedy", (None,))[0]

    print(f"Prompt: {len(ids)} tokens (rewrite a 40-line function, one rename); answer: {n} tokens, greedy, "
          f"repetition_penalty 1, identical in every qwen-edge mode; {args.runs} runs (medians), "
          f"{args.threads} threads.\n")
    print("| tool, mode | decode tok/s | vs genai int4 plain | TTFT ms |")
    print("|---|---|---|---|")
    for label, (tps, ttft) in rows.items():
        ratio = f"{tps / base:.2f}×" if base else "—"
        print(f"| {label} | {tps:.1f} | {ratio} | {1000 * ttft:,.0f} |")
    print(f"\nThe answer:\n{reference.text}")


if __name__ == "__main__":
    main()
