"""What a JSON-schema constraint costs per token (issue 14): decode speed of the same prompt with and without
`json_schema=`, measured two ways: whole runs in interleaved rounds (tok/s medians), and the two decoded in
lockstep, token by token (ms per token, medians; load from elsewhere on the machine falls on both alike). Also
the time of the token mask itself, split into llguidance's mask computation and applying it to the logits
(numpy), that time over the unconstrained time per token, and the one-off costs (llguidance's tokenizer, once
per model; compiling the grammar, once per request).

    flock /tmp/qwen-edge-bench.lock .venv/bin/python tests/bench/constrained.py [MODEL] [--threads 2] [--rounds 5]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import toolkit  # noqa: E402
from toolkit import constrained  # noqa: E402

PROMPT = [{"role": "user", "content": "List eight programming languages as JSON: for each its name, the year it "
                                      "appeared, its main paradigm and a one-sentence description."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["languages"], "properties": {
    "languages": {"type": "array", "minItems": 8, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "year", "paradigm", "description"],
        "properties": {"name": {"type": "string"}, "year": {"type": "integer"},
                       "paradigm": {"enum": ["imperative", "functional", "object-oriented", "logic", "multi"]},
                       "description": {"type": "string"}}}}}}


class Timed(constrained.Matcher):
    """A Matcher that records how long its mask computation, mask application and token consumption take."""

    log = {"compute": [], "apply": [], "consume": []}

    def mask(self, logits):
        t0 = time.perf_counter()
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        t1 = time.perf_counter()
        constrained.apply_mask(self._words, logits)
        t2 = time.perf_counter()
        self.log["compute"].append(t1 - t0)
        self.log["apply"].append(t2 - t1)
        return logits

    def consume(self, token):
        t0 = time.perf_counter()
        super().consume(token)
        self.log["consume"].append(time.perf_counter() - t0)


def lockstep(model, tokens: int) -> tuple[float, float]:
    """Decode the prompt twice at once, with and without the schema, alternating token by token (each row its
    own KV cache): ms per decoded token of each. Load from elsewhere falls on both alike."""
    ids = model.encode(PROMPT)
    done = {k: toolkit.Completion("", ids) for k in ("free", "json")}
    runs = {"free": model.run([ids], temperature=0, max_new_tokens=tokens, collect=[done["free"]]),
            "json": model.run([ids], temperature=0, max_new_tokens=tokens, collect=[done["json"]], json_schema=SCHEMA)}
    spent, counted = {"free": 0.0, "json": 0.0}, {"free": 0, "json": 0}
    live = dict(runs)
    while live:
        for kind in list(live):
            before, t = len(done[kind].token_ids), time.perf_counter()
            if next(live[kind], None) is None:
                del live[kind]
                continue
            if before:  # the prefill's step (the first token) is not decoding
                spent[kind] += time.perf_counter() - t
                counted[kind] += len(done[kind].token_ids) - before
    return 1e3 * spent["free"] / counted["free"], 1e3 * spent["json"] / counted["json"]


def run(model, tokens: int, **options) -> tuple[float, int, str]:
    c = model.complete([PROMPT], temperature=0, max_new_tokens=tokens, **options)[0]
    return c.stats.decode_tokens_per_second, len(c.token_ids), c.text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "sample-int4"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", dest="out", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    import llguidance

    model = toolkit.load(args.model, threads=args.threads, max_length=1024)
    t = time.perf_counter()
    constrained.guidance_tokenizer(model, llguidance)
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    constraint = constrained.compile_constraint(model, json_schema=SCHEMA)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    constraint.matcher()
    matcher_s = time.perf_counter() - t
    constrained.Constraint.matcher = lambda self: Timed(self)
    run(model, 16)
    run(model, 16, json_schema=SCHEMA)  # warm-up
    Timed.log = {k: [] for k in Timed.log}
    free, bound = [], []
    for r in range(args.rounds):
        for kind in (("free", "json") if r % 2 == 0 else ("json", "free")):
            tps, n, _ = run(model, args.tokens, **({"json_schema": SCHEMA} if kind == "json" else {}))
            (bound if kind == "json" else free).append(tps)
            print(f"round {r} {kind:4}: {tps:6.2f} tok/s over {n} tokens", flush=True)
    paired = [100 * (f / b - 1) for f, b in zip(free, bound)]  # each round's two runs were back to back
    steps = [lockstep(model, args.tokens) for _ in range(args.rounds)]
    for f, b in steps:
        print(f"lockstep: {f:.2f} ms/token free, {b:.2f} ms/token json ({100 * (b / f - 1):+.1f} %)", flush=True)
    us = {k: 1e6 * statistics.median(v) for k, v in Timed.log.items()}
    # the same overhead by accounting, less sensitive to other load on the machine than two tok/s figures:
    # the time spent in the constraint per token over the unconstrained time per token
    spent_ms = 1e3 * sum(map(sum, Timed.log.values())) / len(Timed.log["consume"])
    report = {
        "model": Path(args.model).name, "threads": args.threads, "rounds": args.rounds, "tokens": args.tokens,
        "decode_tok_s_free": statistics.median(free), "decode_tok_s_json": statistics.median(bound),
        "overhead_percent": 100 * (statistics.median(free) / statistics.median(bound) - 1),
        "overhead_percent_paired_median": statistics.median(paired),
        "lockstep_ms_per_token_free": statistics.median(f for f, _ in steps),
        "lockstep_ms_per_token_json": statistics.median(b for _, b in steps),
        "overhead_percent_lockstep_median": statistics.median(100 * (b / f - 1) for f, b in steps),
        "constraint_ms_per_token": spent_ms,
        "overhead_percent_accounted": spent_ms * statistics.median(free) / 10,
        "mask_compute_us_median": us["compute"], "mask_apply_us_median": us["apply"],
        "consume_us_median": us["consume"],
        "mask_compute_us_mean": 1e6 * statistics.mean(Timed.log["compute"]),
        "mask_compute_us_p95": 1e6 * float(np.percentile(Timed.log["compute"], 95)),
        "tokenizer_build_s": tokenizer_s, "grammar_compile_ms": 1e3 * compile_s, "matcher_ms": 1e3 * matcher_s,
        "llguidance": llguidance.__version__,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
