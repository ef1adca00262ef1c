"""Peer runner: optimum-onnx ORTModelForCausalLM (runs inside the optimum venv made by setup_peers.sh).

    python tests/bench/peer_optimum.py --variant fp32 --model EXPORT_DIR --prompt-ids prompt.json \
        --new-tokens 128 --runs 3 --threads 2 [--score NAME=DIR ...] --out result.json

EXPORT_DIR is an `optimum-cli export onnx --task text-generation-with-past` folder. Load =
ORTModelForCausalLM.from_pretrained (CPUExecutionProvider, intra_op_num_threads=--threads); TTFT = one
forward over the prompt ids (empty past) until its logits exist; decode = exactly --new-tokens manual
single-token forwards over past_key_values with greedy argmax, EOS ignored. Scoring = one forward per
window (fresh, use_cache=False) returning logits for every position. Same JSON contract as
peer_genai.py / peer_llamacpp.py; the measurement runs in a child process so a crash still yields a row.
"""
import json
import os
import sys
import time

import numpy as np

from runner_common import load_windows, main_common, peak_rss_bytes, result, score_windows

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PEER = "optimum-onnx (ORTModelForCausalLM)"
VOCAB = 151936


# ----------------------------------------------------------------------------------------------
# optimum specifics
def measure(args):
    import onnxruntime as ort
    import torch
    from importlib.metadata import version
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(args.threads)
    notes = []
    model_dir = args.model
    if not os.path.exists(os.path.join(model_dir, "model.onnx")):
        raise FileNotFoundError(f"variant unavailable: {model_dir}/model.onnx missing (see optimum.FAILED in the peers dir)")
    with open(args.prompt_ids) as f:
        ids = [int(x) for x in json.load(f)["ids"]]
    n = args.new_tokens
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(model_dir, provider="CPUExecutionProvider", session_options=so,
                                                use_cache=True)
    load_s = time.perf_counter() - t
    ttft, pre, dec, first_ids = [], [], [], None
    with torch.inference_mode():
        for _ in range(args.runs):
            x = torch.tensor([ids], dtype=torch.long)
            t = time.perf_counter()
            out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            dt = time.perf_counter() - t
            ttft.append(dt)
            pre.append(len(ids) / dt)
            gen, past = [tok], out.past_key_values
            t = time.perf_counter()
            for i in range(n):  # exactly n single-token forward passes, EOS ignored
                out = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=past,
                            attention_mask=torch.ones((1, len(ids) + i + 1), dtype=torch.long), use_cache=True)
                past = out.past_key_values
                gen.append(int(out.logits[0, -1].argmax()))
            dec.append(n / (time.perf_counter() - t))
            if first_ids is None:
                first_ids = gen[:n]
            del out, past
    rss = peak_rss_bytes()
    try:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        notes.append("greedy text (first 40 tokens): " + json.dumps(tok.decode(first_ids[:40], skip_special_tokens=False)))
    except Exception as e:  # noqa: BLE001
        notes.append(f"could not detokenize: {e}")
    notes.append(f"onnxruntime {ort.__version__}, optimum {version('optimum')}, transformers {version('transformers')}, "
                 f"torch {torch.__version__}; intra_op_num_threads={args.threads}; use_io_binding={model.use_io_binding}; "
                 f"manual greedy loop over past_key_values; decode = {n} forward steps")
    scores = {}
    if args.score:
        def logits_fn(window):
            with torch.inference_mode():
                x = torch.tensor([list(window)], dtype=torch.long)
                lg = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
                return lg.float().numpy() if isinstance(lg, torch.Tensor) else np.asarray(lg, np.float32)

        for name, wids, wins, ref in (load_windows(s) for s in args.score):
            scores[name] = score_windows(logits_fn, wids, wins, ref, notes)
    return result(version("optimum-onnx"), model_dir, rss, load_s, ttft, pre, dec, scores, first_ids, notes)


if __name__ == "__main__":
    sys.exit(main_common(PEER, measure))
