"""Peer runner: llama-cpp-python on GGUF files (runs inside the llamacpp venv made by setup_peers.sh).

    python tests/bench/peer_llamacpp.py --variant sample-mixed|q8_0|q4_0 --model FILE.gguf|GGUF_DIR \
        --prompt-ids prompt.json --new-tokens 128 --runs 3 --threads 2 [--score NAME=DIR ...] --out result.json

    python tests/bench/peer_llamacpp.py --make-gguf q8_0|q4_0 --model SAMPLE.gguf --out NEW.gguf

Runner contract (shared by peer_genai.py / peer_optimum.py): feeds the exact prompt ids, times load,
TTFT (prefill until the first token's logits exist), prefill tok/s = len(ids)/TTFT, and decode tok/s over
exactly --new-tokens greedy steps with EOS ignored; peak RSS is read right after the timing runs, before
scoring. Scoring feeds each window as a fresh sequence and compares log-softmax against reference.npy.
Writes result.json ({"ok": false, "why": ...} on failure, exit 0). The measurement runs in a child
process so that a crash (e.g. a segfault inside llama.cpp) still yields a result row.

--make-gguf dequantizes every tensor of the sample GGUF (gguf.quants) and writes a new GGUF with all
metadata copied: q8_0 = every 2-D weight Q8_0; q4_0 = 2-D weights Q4_0 except output.weight Q8_0 (what
llama.cpp's Q4_0 preset gives here: its Q6_K choice for output falls back to Q8_0 because 896 is not a
multiple of 256); 1-D tensors (norms, biases) F32.
"""
import json
import os
import sys
import time

import numpy as np

from runner_common import load_windows, main_common, peak_rss_bytes, result, score_windows

PEER = "llama.cpp (llama-cpp-python)"
VOCAB = 151936


# ----------------------------------------------------------------------------------------------
# llama.cpp specifics
def gguf_path(args):
    p = args.model
    if os.path.isdir(p):
        p = os.path.join(p, f"{args.variant}.gguf")
    if not os.path.exists(p):
        raise FileNotFoundError(f"variant unavailable: {p} does not exist (see llamacpp.FAILED in the peers dir)")
    return p


def new_llama(path, threads, n_ctx, logits_all, notes):
    import inspect

    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama
    kw = dict(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
              logits_all=logits_all, verbose=False)
    why = "quantized GGUFs segfault on this VM in the first decode with the AMX/repack extra buffer types"
    if "use_extra_bufts" in inspect.signature(Llama.__init__).parameters:
        kw["use_extra_bufts"] = False
        msg = f"model built with use_extra_bufts=False ({why})"
    elif "use_extra_bufts" in dict(C.llama_model_params._fields_):
        # llama-cpp-python 0.3.36 has the C field but no Llama() keyword: set it in the default params
        if not getattr(C.llama_model_default_params, "_no_extra_bufts", False):
            orig = C.llama_model_default_params

            def no_extra_bufts():
                p = orig()
                p.use_extra_bufts = False
                return p
            no_extra_bufts._no_extra_bufts = True
            C.llama_model_default_params = no_extra_bufts
        msg = f"model params use_extra_bufts=False, set through llama_model_default_params ({why})"
    else:
        msg = "this llama-cpp-python has no use_extra_bufts: default buffer types"
    if msg not in notes:
        notes.append(msg)
    llm = Llama(**kw)
    if hasattr(llm, "model_params") and hasattr(llm.model_params, "use_extra_bufts") and llm.model_params.use_extra_bufts:
        raise RuntimeError("could not turn off use_extra_bufts")
    return llm


def last_logits(llm):
    """View of the logits of the last evaluated token (Llama.eval only fills .scores with logits_all=True)."""
    import llama_cpp.llama_cpp as C
    return np.ctypeslib.as_array(C.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def measure(args):
    import llama_cpp

    notes = []
    path = gguf_path(args)
    with open(args.prompt_ids) as f:
        ids = [int(x) for x in json.load(f)["ids"]]
    n = args.new_tokens
    t = time.perf_counter()
    llm = new_llama(path, args.threads, len(ids) + n + 16, False, notes)
    load_s = time.perf_counter() - t
    if llm.n_vocab() != VOCAB:
        notes.append(f"model vocab {llm.n_vocab()} (expected {VOCAB})")
    ttft, pre, dec, first_ids = [], [], [], None
    for _ in range(args.runs):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(last_logits(llm)))
        dt = time.perf_counter() - t
        ttft.append(dt)
        pre.append(len(ids) / dt)
        gen = [tok]
        t = time.perf_counter()
        for _ in range(n):  # exactly n single-token forward passes, EOS ignored
            llm.eval([gen[-1]])
            gen.append(int(np.argmax(last_logits(llm))))
        dec.append(n / (time.perf_counter() - t))
        if first_ids is None:
            first_ids = gen[:n]
    rss = peak_rss_bytes()
    text = llm.detokenize(first_ids[:40]).decode("utf-8", "replace")
    notes.append("greedy text (first 40 tokens): " + json.dumps(text))
    notes.append(f"n_threads=n_threads_batch={args.threads}; greedy = numpy argmax of llama_get_logits_ith(-1); decode = "
                 f"{n} single-token eval() calls after the prompt")
    del llm
    scores = {}
    if args.score:
        specs = [load_windows(s) for s in args.score]
        max_win = max(e - s for _, _, wins, _ in specs for s, e, _ in wins)
        sc = new_llama(path, args.threads, max_win + 8, True, notes)

        def logits_fn(window):
            sc.reset()
            sc.eval(list(window))
            return np.array(sc.scores[:len(window)], dtype=np.float32)

        for name, wids, wins, ref in specs:
            scores[name] = score_windows(logits_fn, wids, wins, ref, notes)
        del sc
    return result(llama_cpp.__version__, path, rss, load_s, ttft, pre, dec, scores, first_ids, notes)


# ----------------------------------------------------------------------------------------------
# --make-gguf: requantize the sample's (dequantized) weights with the gguf package only
def make_gguf(args):
    import gguf
    from gguf.quants import dequantize, quantize

    Q = gguf.GGMLQuantizationType
    target = {"q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
    wtype, ftype = target[args.make_gguf]
    t0 = time.time()
    reader = gguf.GGUFReader(args.model)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = args.out + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            val = int(ftype)
        writer.add_key_value(field.name, val, vtype, sub_type=sub)
    counts = {}
    for tensor in reader.tensors:
        w = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if w.ndim == 2:
            qt = Q.Q8_0 if (tensor.name == "output.weight") else wtype
            data = quantize(w, qt)
        else:
            qt, data = Q.F32, w
        counts[qt.name] = counts.get(qt.name, 0) + 1
        writer.add_tensor(tensor.name, data, raw_dtype=qt if qt != Q.F32 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {tmp}: {os.path.getsize(tmp)} bytes, tensor types {counts}, {time.time() - t0:.1f}s")
    # check that it loads and generates text before it takes its final name
    import llama_cpp
    notes = []
    llm = new_llama(tmp, 2, 256, False, notes)
    prompt = llm.tokenize(b"<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n"
                          b"<|im_start|>assistant\n", add_bos=False, special=True)
    llm.eval(prompt)
    gen = []
    for _ in range(40):
        gen.append(int(np.argmax(last_logits(llm))))
        llm.eval([gen[-1]])
    print(f"llama-cpp-python {llama_cpp.__version__} ({notes[0]}) greedy continuation:")
    text = llm.detokenize(gen).decode("utf-8", "replace")
    print(text)
    del llm
    if len(set(gen)) < 8:
        print(f"FAILED: degenerate greedy output {gen}")
        return 1
    os.replace(tmp, args.out)
    print(f"verified; renamed to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_common(
        PEER, measure,
        extra_args=lambda ap: ap.add_argument("--make-gguf", choices=["q8_0", "q4_0"]),
        special=lambda args: make_gguf(args) if args.make_gguf else None))
