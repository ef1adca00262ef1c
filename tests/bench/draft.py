"""Speculative decoding with a draft model on the sample (not run in CI): acceptance and decode speed of a
target alone and with a draft, the per-step costs behind them, and what they predict for a bigger target.

    flock /tmp/qwen-edge-bench.lock .venv/bin/python tests/bench/draft.py --draft models/sample-int4 \\
        --target models/sample-fp32 --target models/sample-int8 [--threads 2] [--new-tokens 128] [--runs 2]
        [--out models/draft-bench.json] [--step-target FOLDER]

For each target and prompt (a coding and a prose question, chat template, greedy with the checkpoint's
repetition penalty): plain decoding (draft=False), then the draft with draft_tokens = each of --kmax; every
greedy mode must give the same token ids as plain decoding (checked, reported). With --sampled, also
sampling with Qwen2.5's usual settings (seed = run index), with and without the draft. Decode tok/s is Stats'
(tokens after the first over the time after the target's prefill; it includes the draft's prefill of the
prompt, done in the first round). Each round's (drafted, accepted) is logged to estimate the per-token
acceptance probability alpha (the MLE of a truncated geometric: accepted / (accepted + rounds that ended in a
rejection)).

Per-step costs, on a cache of the prompt length + 64 positions, medians of --reps calls: a single decode step
(c1), a verification call of k+1 tokens (v(k), prefill graph with num_logits = k+1) and the draft's step
(cd). The model: a round of k drafts costs k*cd + v(k) and yields (1 - alpha^(k+1)) / (1 - alpha) tokens
(i.i.d. acceptance), so speed-up(k) = E(k) * c1 / (k*cd + v(k)). It is checked against the measured runs,
then applied to a target whose decode step is --big-step ms (a 7B int4 on this machine: ~300 ms), with
v(k)/c1 measured on --step-target (e.g. a 7B-shaped int4 export; default: the draft's folder, the same int4
kernels) — a model, not a measurement. Target and draft run with onnxruntime's thread spinning off (as
`load(..., draft=...)` sets it), plain decoding included.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import toolkit  # noqa: E402
from toolkit import speculative  # noqa: E402
from toolkit.bench import peak_rss_bytes  # noqa: E402

PROMPTS = {
    "code": "Write a Python class LRUCache with get and put methods, O(1) each, using an OrderedDict. Add "
            "docstrings and type hints, then show a short usage example.",
    "prose": "Explain how a refrigerator keeps food cold: the refrigerant cycle, the compressor, the condenser "
             "and the evaporator, in three paragraphs for a curious teenager.",
}
KS = (1, 2, 4, 8, 16)
SAMPLED = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)  # Qwen2.5's usual defaults


class RoundLog:
    """Collects each round's (drafted, accepted) by wrapping AdaptiveK.update."""

    def __init__(self):
        self.rounds: list[tuple[int, int]] = []
        original = speculative.AdaptiveK.update
        log = self

        def update(self, drafted, accepted):
            log.rounds.append((drafted, accepted))
            return original(self, drafted, accepted)

        speculative.AdaptiveK.update = update

    def take(self) -> list[tuple[int, int]]:
        rounds, self.rounds = self.rounds, []
        return rounds


def alpha_of(rounds) -> float:
    accepted = sum(a for _, a in rounds)
    rejections = sum(1 for d, a in rounds if a < d)
    return accepted / (accepted + rejections) if accepted + rejections else float("nan")


def step_costs(model, ids: list[int], reps: int, ks=KS) -> dict:
    """Seconds per call on a cache of len(ids) positions: decode step, verify of k+1 tokens (median)."""
    cache = model.new_cache(1)
    model.forward("prefill", np.array([ids], dtype=np.int64), np.ones((1, len(ids)), np.int64), cache)
    base = cache.length

    def timed(n: int) -> float:
        times = []
        for r in range(reps + 1):
            fed = np.array([ids[-n:]], dtype=np.int64)  # any tokens: the cost does not depend on them
            mask = np.ones((1, base + n), np.int64)
            t = time.perf_counter()
            if n == 1:
                model.forward("decode", fed, mask, cache)
            else:
                model.forward("prefill", fed, mask, cache, num_logits=n)
            if r:  # the first call of a shape warms up
                times.append(time.perf_counter() - t)
            cache.truncate(base)
        return statistics.median(times)

    return {"step": timed(1), "verify": {k: timed(k + 1) for k in ks}}


def expected_tokens(alpha: float, k: int) -> float:
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, k: int, step: float, draft_step: float, verify: float) -> float:
    return expected_tokens(alpha, k) * step / (k * draft_step + verify)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", type=Path, required=True)
    ap.add_argument("--target", type=Path, action="append", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--kmax", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--big-step", type=float, default=300.0, help="decode step of the big target, ms")
    ap.add_argument("--step-target", type=Path, default=None,
                    help="folder whose v(k)/c1 stands in for the big target's (default: the draft's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sampled", action="store_true",
                    help=f"also sample ({SAMPLED}), seeds 0..runs-1, with and without the draft")
    args = ap.parse_args()
    log = RoundLog()
    report = {"threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs, "targets": {}}
    draft = toolkit.load(args.draft, threads=args.threads, max_length=1024)
    draft.generate("hi", max_new_tokens=2, temperature=0)
    context = draft.encode([{"role": "user", "content": PROMPTS["code"]}])
    context += context[:64]
    step_model = None
    if args.step_target is not None:  # first: a big folder is loaded alone, then freed
        big = toolkit.Model(args.step_target, threads=args.threads, max_length=1024, spin=False)
        step_model = step_costs(big, context, max(3, args.reps // 3))
        report["step_target"] = {"folder": str(args.step_target), "costs": step_model}
        print(f"{args.step_target}: {step_model}", file=sys.stderr)
        del big
    for folder in args.target:
        alone = toolkit.load(folder, threads=args.threads, max_length=1024)  # onnxruntime's default spinning
        alone.generate("hi", max_new_tokens=2, temperature=0)
        spinning = {name: statistics.median(
            alone.complete([[{"role": "user", "content": text}]], temperature=0, max_new_tokens=args.new_tokens)[0]
            .stats.decode_tokens_per_second for _ in range(args.runs)) for name, text in PROMPTS.items()}
        del alone
        target = toolkit.load(folder, threads=args.threads, max_length=1024, draft=draft)  # spinning off for both
        target.generate("hi", max_new_tokens=2, temperature=0)
        log.take()
        rows = {}
        for name, text in PROMPTS.items():
            ids = target.encode([{"role": "user", "content": text}])
            rows[(name, "plain, loaded alone")] = {"tokens": None, "decode_tok_s": spinning[name], "identical": None,
                                                  "acceptance_rate": None, "alpha": None, "mean_k": None,
                                                  "tokens_per_round": None}
            greedy = dict(temperature=0)
            modes = {"plain": dict(draft=False, **greedy)} | {
                f"draft k<={k}": dict(draft=draft, draft_tokens=k, **greedy) for k in args.kmax}
            if args.sampled:
                modes |= {"plain, sampled": dict(draft=False, **SAMPLED),
                          f"draft k<={max(args.kmax)}, sampled": dict(draft=draft, draft_tokens=max(args.kmax),
                                                                       **SAMPLED)}
            reference = None
            for mode, extra in modes.items():
                speeds, rounds, same = [], [], None
                for run in range(args.runs):
                    c = target.complete([ids], max_new_tokens=args.new_tokens, seed=run, **extra)[0]
                    reference = reference or c
                    if extra["temperature"] == 0:
                        same = (same is None or same) and c.token_ids == reference.token_ids
                    speeds.append(c.stats.decode_tokens_per_second)
                    rounds += log.take()
                drafted = sum(d for d, _ in rounds)
                accepted = sum(a for _, a in rounds)
                rows[(name, mode)] = {
                    "tokens": len(c.token_ids), "decode_tok_s": statistics.median(speeds), "identical": same,
                    "acceptance_rate": accepted / drafted if drafted else None, "alpha": alpha_of(rounds),
                    "mean_k": drafted / len(rounds) if rounds else None,
                    "tokens_per_round": (accepted + len(rounds)) / len(rounds) if rounds else None}
                print(f"{folder.name} {name} {mode}: {rows[(name, mode)]}", file=sys.stderr)
            rows[(name, "answer")] = reference.text
        costs = step_costs(target, context, args.reps)
        report["targets"][folder.name] = {"rows": {f"{n} | {m}": v for (n, m), v in rows.items()}, "costs": costs}
        del target
    draft_costs = step_costs(draft, context, args.reps)
    report["draft"] = {"folder": args.draft.name, "costs": draft_costs}
    step_model = step_model or draft_costs
    report["peak_rss_bytes"] = peak_rss_bytes()
    print_report(report, draft_costs, step_model, args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))


def print_report(report: dict, draft_costs: dict, step_model: dict, args) -> None:
    cd = draft_costs["step"]
    print(f"\nDraft {report['draft']['folder']}; {args.threads} threads; greedy, {args.new_tokens} new tokens, "
          f"{args.runs} runs (medians).\n")
    print("| target | prompt | mode | tokens | decode tok/s | vs plain | acceptance | alpha | mean k | tok/round "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, t in report["targets"].items():
        rows = t["rows"]
        for key, r in rows.items():
            if not isinstance(r, dict):
                continue
            prompt, mode = key.split(" | ")
            plain = rows[f"{prompt} | plain{', sampled' if 'sampled' in mode else ''}"]["decode_tok_s"]
            fmt = lambda v, f: "—" if v is None else f.format(v)
            print(f"| {name} | {prompt} | {mode} | {r['tokens'] or '—'} | {r['decode_tok_s']:.1f} | "
                  f"{r['decode_tok_s'] / plain:.2f}× | {fmt(r['acceptance_rate'], '{:.0%}')} | "
                  f"{fmt(r['alpha'] if r['acceptance_rate'] is not None else None, '{:.2f}')} | "
                  f"{fmt(r['mean_k'], '{:.1f}')} | {fmt(r['tokens_per_round'], '{:.2f}')} | "
                  f"{ {None: '—', True: 'yes', False: 'NO'}[r['identical']]} |")
    print("\nPer-call costs, ms (cache of prompt + 64 positions):\n")
    print("| model | step c1 | " + " | ".join(f"verify k={k}" for k in KS) + " |")
    print("|---|---|" + "---|" * len(KS))
    for name, costs in [(n, t["costs"]) for n, t in report["targets"].items()] + [
            (report["draft"]["folder"] + " (draft)", draft_costs)]:
        print(f"| {name} | {1000 * costs['step']:.1f} | " + " | ".join(
            f"{1000 * costs['verify'][k]:.1f} ({costs['verify'][k] / costs['step']:.2f}×)" for k in KS) + " |")
    print("\nModel check (measured alpha and mean k of the k<=16 runs; speed-up = E(k) c1 / (k cd + v(k))):\n")
    for name, t in report["targets"].items():
        c = t["costs"]
        for key, r in t["rows"].items():
            if isinstance(r, dict) and r.get("mean_k") and "sampled" not in key:
                k = max(1, round(r["mean_k"]))
                pred = predicted_speedup(r["alpha"], k, c["step"], cd, c["verify"][min(KS, key=lambda x: abs(x - k))])
                plain = t["rows"][key.split(" | ")[0] + " | plain"]["decode_tok_s"]
                print(f"- {name}, {key}: alpha {r['alpha']:.2f}, k≈{k}: predicted {pred:.2f}×, "
                      f"measured {r['decode_tok_s'] / plain:.2f}×")
    big = args.big_step / 1000
    ratio = {k: step_model["verify"][k] / step_model["step"] for k in KS}
    source = report.get("step_target", {}).get("folder", report["draft"]["folder"])
    print(f"\nA big target with a {args.big_step:.0f} ms decode step and this draft ({1000 * cd:.1f} ms a step), "
          f"v(k) = {args.big_step:.0f} ms × v(k)/c1 measured on {source} (c1 {1000 * step_model['step']:.0f} ms; "
          f"{', '.join(f'k={k}: {r:.2f}' for k, r in ratio.items())}) — a model, not a measurement:\n")
    print("| alpha | " + " | ".join(f"k={k}" for k in KS) + " | best |")
    print("|---|" + "---|" * (len(KS) + 1))
    for alpha in (0.5, 0.6, 0.7, 0.8, 0.9):
        gains = {k: predicted_speedup(alpha, k, big, cd, big * ratio[k]) for k in KS}
        best = max(gains, key=gains.get)
        print(f"| {alpha:.1f} | " + " | ".join(f"{g:.2f}×" for g in gains.values()) +
              f" | k={best}: {gains[best]:.2f}× ({gains[best] / big:.1f} tok/s) |")
    print(f"\npeak RSS {report['peak_rss_bytes'] / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
