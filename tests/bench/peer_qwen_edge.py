"""Runner: qwen-edge itself, in the same contract as the peers (runs in the project's .venv).

    python tests/bench/peer_qwen_edge.py --variant int4 --model FOLDER --prompt-ids prompt.json \
        --new-tokens 128 --runs 3 --threads 2 [--score NAME=DIR ...] --out result.json

Load = toolkit.load (prefill and decode sessions ready); TTFT = the prefill call until its logits exist;
decode = exactly --new-tokens decode calls with greedy argmax, end tokens ignored. Scoring = the folder's
score graph, one fresh call per window.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from runner_common import load_windows, main_common, peak_rss_bytes, result, score_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def measure(args):
    import onnxruntime as ort

    import toolkit
    from toolkit.bench import greedy_timed

    ids = [int(x) for x in json.loads(Path(args.prompt_ids).read_text())["ids"]]
    n = args.new_tokens
    t = time.perf_counter()
    model = toolkit.load(args.model, threads=args.threads)  # the KV cache grows as needed (scoring: 512)
    load_s = time.perf_counter() - t
    ttft, dec, first_ids = [], [], None
    for _ in range(args.runs):
        first, rest, gen = greedy_timed(model, ids, n)
        ttft.append(first)
        dec.append(n / rest)
        first_ids = first_ids or gen[:n]
    rss = peak_rss_bytes()
    q = model.manifest["quantization"]
    notes = [f"onnxruntime {ort.__version__}; bits {q['bits']}, group {q['group_size']}, accuracy_level "
             f"{q['accuracy_level']}; greedy text (first 40 tokens): "
             + json.dumps(model.tokenizer.decode(first_ids[:40]))]
    scores = {}
    for name, wids, wins, ref in (load_windows(s) for s in args.score):
        def logits_fn(window):
            x = np.array([list(window)], dtype=np.int64)
            return model.forward("prefill", x, np.ones_like(x), model.new_cache(1), num_logits=x.shape[1])[0]
        scores[name] = score_windows(logits_fn, wids, wins, ref, notes)
    return result(toolkit.__version__, args.model, rss, load_s, ttft, [len(ids) / s for s in ttft], dec, scores,
                  first_ids, notes)


if __name__ == "__main__":
    sys.exit(main_common("qwen-edge", measure))
