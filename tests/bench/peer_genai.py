"""Peer runner: onnxruntime-genai (runs inside the genai venv made by setup_peers.sh).

    python tests/bench/peer_genai.py --variant int4|int8 --model MODEL_DIR --prompt-ids prompt.json \
        --new-tokens 128 --runs 3 --threads 2 [--score NAME=DIR ...] --out result.json

MODEL_DIR is a model-builder output folder (genai_config.json + model.onnx). Timing uses the genai
Generator API: load = og.Config (intra_op_num_threads overlaid) + og.Model; TTFT = append_tokens(prompt
ids) + get_logits; decode = exactly --new-tokens forward steps (generate_next_token), greedy, with
min_length = max_length so EOS is masked and never stops the run. Scoring opens the same model.onnx with
onnxruntime.InferenceSession (the ORT build genai uses) and feeds each window with an empty KV cache: the
graph returns logits for every position. Same JSON contract as peer_llamacpp.py / peer_optimum.py; the
measurement runs in a child process so a crash still yields an ok=false row.
"""
import gc
import json
import os
import sys
import time

import numpy as np

from runner_common import load_windows, main_common, peak_rss_bytes, result, score_windows

PEER = "onnxruntime-genai"
VOCAB = 151936


# ----------------------------------------------------------------------------------------------
# onnxruntime-genai specifics
def ort_feeds(sess, ids, kv_heads, head_size):
    """Inputs for one fresh (no past) forward pass of a genai-builder graph."""
    n = len(ids)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    feeds = {}
    for i in sess.get_inputs():
        dt = dtypes.get(i.type)
        if i.name == "input_ids":
            feeds[i.name] = np.asarray([ids], dtype=dt)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, n), dtype=dt)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(n, dtype=dt)[None]
        elif i.name.startswith("past_key_values."):
            if dt is None:
                raise RuntimeError(f"unsupported KV dtype {i.type}")
            last = i.shape[-1] if isinstance(i.shape[-1], int) else head_size
            feeds[i.name] = np.zeros((1, kv_heads, 0, last), dtype=dt)
        else:
            raise RuntimeError(f"model.onnx has an input this runner does not know how to feed: {i.name} {i.type}")
    return feeds


def measure(args):
    import onnxruntime as ort
    import onnxruntime_genai as og

    if hasattr(og, "disable_telemetry_events"):
        og.disable_telemetry_events()
    notes = []
    model_dir = args.model
    if not os.path.exists(os.path.join(model_dir, "genai_config.json")):
        raise FileNotFoundError(f"variant unavailable: {model_dir}/genai_config.json missing "
                                "(see genai.FAILED in the peers dir)")
    with open(os.path.join(model_dir, "genai_config.json")) as f:
        gcfg = json.load(f)
    dec_cfg = gcfg["model"]["decoder"]
    with open(args.prompt_ids) as f:
        ids = [int(x) for x in json.load(f)["ids"]]
    n = args.new_tokens
    total = len(ids) + n + 1  # the first generate_next_token() only picks from the prompt's logits
    t = time.perf_counter()
    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t
    ttft, pre, dec, first_ids, last_logits = [], [], [], None, None
    for _ in range(args.runs):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        logits = gen.get_logits()
        dt = time.perf_counter() - t
        ttft.append(dt)
        pre.append(len(ids) / dt)
        t = time.perf_counter()
        for _ in range(n + 1):  # 1 pick from the prompt logits + n single-token forward passes
            gen.generate_next_token()
        dec.append(n / (time.perf_counter() - t))
        seq = list(gen.get_sequence(0))
        if len(seq) != total:
            raise RuntimeError(f"generator produced {len(seq) - len(ids)} tokens, wanted {n + 1}")
        if first_ids is None:
            first_ids = [int(x) for x in seq[len(ids):len(ids) + n]]
            last_logits = np.array(logits, dtype=np.float32).reshape(-1)
        del gen, params
    rss = peak_rss_bytes()
    try:
        tok = og.Tokenizer(model)
        notes.append("greedy text (first 40 tokens): " + json.dumps(tok.decode(np.array(first_ids[:40], np.int32))))
        del tok
    except Exception as e:  # noqa: BLE001
        notes.append(f"could not detokenize: {e}")
    notes.append(f"genai Generator, intra_op_num_threads={args.threads} via Config.overlay; greedy (do_sample=False), "
                 f"min_length=max_length={total} so EOS never stops it; decode = {n} forward steps")
    notes.append(f"onnxruntime {ort.__version__}; MatMulNBits attrs: {matmulnbits_attrs(model_dir)}")
    del model, config
    gc.collect()
    scores = {}
    if args.score:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(os.path.join(model_dir, dec_cfg["filename"]), so,
                                    providers=["CPUExecutionProvider"])
        kvh, hs = dec_cfg["num_key_value_heads"], dec_cfg["head_size"]

        def logits_fn(window):
            out = sess.run(["logits"], ort_feeds(sess, list(window), kvh, hs))[0]
            return np.asarray(out[0], dtype=np.float32)

        # faithfulness check: the scoring session reproduces the Generator's prompt logits
        chk = logits_fn(ids)[-1]
        diff = float(np.abs(chk - last_logits[:chk.size]).max())
        notes.append(f"scoring = onnxruntime.InferenceSession on {dec_cfg['filename']} with empty past; "
                     f"max |logit diff| vs Generator on the prompt's last position: {diff:.2e}")
        for name, wids, wins, ref in (load_windows(s) for s in args.score):
            scores[name] = score_windows(logits_fn, wids, wins, ref, notes)
        del sess
    return result(og.__version__, model_dir, rss, load_s, ttft, pre, dec, scores, first_ids, notes)


def matmulnbits_attrs(model_dir):
    try:
        import onnx
        m = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)
        seen = set()
        for node in m.graph.node:
            if node.op_type == "MatMulNBits":
                a = {x.name: x.i for x in node.attribute if x.name in ("bits", "block_size", "accuracy_level")}
                seen.add(f"bits={a.get('bits')} block={a.get('block_size')} acc={a.get('accuracy_level')}")
        return ", ".join(sorted(seen)) or "none"
    except Exception as e:  # noqa: BLE001
        return f"n/a ({e})"


if __name__ == "__main__":
    sys.exit(main_common(PEER, measure))
