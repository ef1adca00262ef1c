"""Prefill matmul options on the CPU's int8 units (issue 13, step 1): one layer's four projections of the
sample model (qkv 896→1152, o 896→896, gate_up 896→9728, down 4864→896) at M = 128, 512, 1536 tokens.

    a   MatMulNBits int4, accuracy_level 4 (today)
    b   int8 per-output-channel weights (a stored copy) × per-row dynamic int8 activations:
        QuantizeLinear(per row) → MatMulInteger (u8×s8 or s8×s8) → Cast → Mul(row scale) → Mul(column scale);
        and com.microsoft DynamicQuantizeMatMul / MatMulIntegerToFloat (per-tensor activation scale)
    c   the int8 weights derived inside the graph from the int4 blob on every call: the blob read as uint4 [N, K]
        → DequantizeLinear (blocked, axis 1) → QuantizeLinear (per channel, axis 0) → Transpose → MatMulInteger
Fidelity: relative output error against x @ W4ᵀ in float (W4 = the dequantized int4 weights the model uses) on
real activations (the float model over tests/data/prose.txt, in numpy: export/calibrate.py's decoder_layer).

    flock /tmp/qwen-edge-bench.lock .venv/bin/python tests/bench/prefill.py [--layers 0,12,23] [--skip-time]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "sample-int4"
HF = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-hf"
MS = "com.microsoft"
PROJ = {"qkv": ("self_attn.qkv_proj", 1152, 896), "o": ("self_attn.o_proj", 896, 896),
        "gate_up": ("mlp.gate_up_proj", 9728, 896), "down": ("mlp.down_proj", 896, 4864)}


def blob(layer: int, proj: str):
    """(qdata uint8 [N, K/g, g/2], scales [N, K/g], zero points uint8 [N, K/g/2] | None, g) from the weights file."""
    m = onnx.load(str(MODEL / "prefill.onnx"), load_external_data=False)
    name = f"model.layers.{layer}.{PROJ[proj][0]}.weight"
    out = {}
    for t in m.graph.initializer:
        if t.name.startswith(name):
            ext = {e.key: e.value for e in t.external_data}
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            a = np.fromfile(MODEL / ext["location"], dtype=dtype, count=int(ext["length"]) // dtype.itemsize,
                            offset=int(ext["offset"]))
            out[t.name[len(name) + 1:]] = a.reshape(tuple(t.dims))
    q = out["qdata"]
    return q, out["scales"], out.get("zero_points"), q.shape[2] * 2


def bias(layer: int):
    m = onnx.load(str(MODEL / "prefill.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == f"model.layers.{layer}.self_attn.qkv_proj.bias")
    ext = {e.key: e.value for e in t.external_data}
    return np.fromfile(MODEL / ext["location"], np.float32, count=int(ext["length"]) // 4, offset=int(ext["offset"]))


def unpack(q, scales, zp, g):
    """Codes [N, K] and zero points [N, K/g] (8 for symmetric) and the float weight [N, K]."""
    n = q.shape[0]
    codes = np.stack([q & 15, q >> 4], -1).reshape(n, -1)
    z = np.full(scales.shape, 8, np.uint8) if zp is None else np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :scales.shape[1]]
    w = ((codes.reshape(n, -1, g).astype(np.float32) - z[..., None]) * scales[..., None]).reshape(n, -1)
    return codes, z, w


def int8_channels(w):
    """Per-output-channel symmetric int8: codes [N, K] int8 and scales [N]."""
    s = np.maximum(np.abs(w).max(1), 1e-12) / 127
    return np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8), s.astype(np.float32)


def model(nodes, inits, k, n, opset=21):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def row_quant(nodes, act: str):
    """Per-row symmetric dynamic quantization of x [M, K]: (codes name, row scale [M, 1] name).
    act "s8": int8 codes, zero point 0; "u8": uint8 codes with zero point 128."""
    nodes += [helper.make_node("Abs", ["x"], ["ax"]),
              helper.make_node("ReduceMax", ["ax", "ax1"], ["amax"], keepdims=1),
              helper.make_node("Max", ["amax", "tiny"], ["amax2"]),
              helper.make_node("Div", ["amax2", "c127"], ["rs"]),  # [M, 1]
              helper.make_node("Reshape", ["rs", "flat"], ["rs1"]),  # [M]
              helper.make_node("Shape", ["rs1"], ["mshape"]),
              helper.make_node("Expand", ["zp_" + act, "mshape"], ["zps"]),
              helper.make_node("QuantizeLinear", ["x", "rs1", "zps"], ["xq"], axis=0)]
    return "xq", "rs"


def row_consts(act):
    return [numpy_helper.from_array(np.array([-1], np.int64), "ax1"),
            numpy_helper.from_array(np.array(1e-8, np.float32), "tiny"),
            numpy_helper.from_array(np.array(127, np.float32), "c127"),
            numpy_helper.from_array(np.array([-1], np.int64), "flat"),
            numpy_helper.from_array(np.array(0 if act == "s8" else 128, np.int8 if act == "s8" else np.uint8),
                                    "zp_" + act),
            numpy_helper.from_array(np.array(0 if act == "s8" else 128, np.int8 if act == "s8" else np.uint8),
                                    "azp")]


def variants(q, scales, zp, g, b=None):
    """{name: ModelProto} for one projection (y = x @ W4ᵀ (+ b))."""
    n, k = q.shape[0], q.shape[1] * g
    codes, z, w = unpack(q, scales, zp, g)
    w8, cs = int8_channels(w)
    out = {}
    bias_in = [numpy_helper.from_array(b, "b")] if b is not None else []
    nb = [helper.make_node("MatMulNBits", ["x", "q", "s"] + (["zp"] if zp is not None else []) + ([""] + ["b"] if b is not None else []),
                           ["y"], domain=MS, K=k, N=n, bits=4, block_size=g, accuracy_level=4)]
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scales, "s")] + \
        ([numpy_helper.from_array(zp, "zp")] if zp is not None else []) + bias_in
    out["a_nbits"] = model(nb, inits, k, n)

    def tail(nodes, inits, acc, rs):
        """int32 [M, N] → float × row scale × column scale (+ bias)."""
        nodes += [helper.make_node("Cast", [acc], ["accf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["accf", rs], ["y1"]),
                  helper.make_node("Mul", ["y1", "cs"], ["y" if b is None else "y2"])]
        if b is not None:
            nodes.append(helper.make_node("Add", ["y2", "b"], ["y"]))
        inits += [numpy_helper.from_array(cs, "cs")] + bias_in
        return nodes, inits

    for act in ("u8", "s8"):
        nodes = []
        xq, rs = row_quant(nodes, act)
        nodes.append(helper.make_node("MatMulInteger", [xq, "w8", "azp"], ["acc"]))
        out[f"b_row_{act}s8"] = model(*tail(nodes, row_consts(act) + [numpy_helper.from_array(np.ascontiguousarray(w8.T), "w8")], "acc", rs), k, n)
    # per-tensor u8 activations (com.microsoft)
    dq = [helper.make_node("DynamicQuantizeMatMul", ["x", "w8", "cs", "", "b" if b is not None else ""], ["y"], domain=MS)]
    out["b_tensor_DQMatMul"] = model(dq, [numpy_helper.from_array(np.ascontiguousarray(w8.T), "w8"),
                                          numpy_helper.from_array(cs, "cs")] + bias_in, k, n)
    mitf = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
            helper.make_node("MatMulIntegerToFloat", ["xq", "w8", "xs", "cs", "xz", "", "b" if b is not None else ""],
                             ["y"], domain=MS)]
    out["b_tensor_MMItoF"] = model(mitf, [numpy_helper.from_array(np.ascontiguousarray(w8.T), "w8"),
                                          numpy_helper.from_array(cs, "cs")] + bias_in, k, n)
    # c: derived in the graph from the int4 blob (uint4 view of the same bytes) on every call
    if zp is not None and (k // g) % 2 == 0:
        u4 = helper.make_tensor("q4", TensorProto.UINT4, [n, k], q.tobytes(), raw=True)
        z4 = helper.make_tensor("z4", TensorProto.UINT4, [n, k // g], zp.tobytes(), raw=True)
        for act in ("u8", "s8"):
            nodes = []
            xq, rs = row_quant(nodes, act)
            nodes += [helper.make_node("DequantizeLinear", ["q4", "s", "z4"], ["wf"], axis=1, block_size=g),
                      helper.make_node("QuantizeLinear", ["wf", "cs", "czp"], ["wq"], axis=0),
                      helper.make_node("Transpose", ["wq"], ["wqt"], perm=[1, 0]),
                      helper.make_node("MatMulInteger", [xq, "wqt", "azp"], ["acc"])]
            inits = row_consts(act) + [u4, z4, numpy_helper.from_array(scales, "s"),
                                       numpy_helper.from_array(np.zeros(n, np.int8), "czp")]
            out[f"c_derived_{act}s8"] = model(*tail(nodes, inits, "acc", rs), k, n)
        # the conversion alone (its cost per call): the int8 [K, N] weights summed to a scalar-ish output
        nodes = [helper.make_node("DequantizeLinear", ["q4", "s", "z4"], ["wf"], axis=1, block_size=g),
                 helper.make_node("QuantizeLinear", ["wf", "cs", "czp"], ["wq"], axis=0),
                 helper.make_node("Transpose", ["wq"], ["wqt"], perm=[1, 0]),
                 helper.make_node("Cast", ["wqt"], ["wqf"], to=TensorProto.FLOAT),
                 helper.make_node("Slice", ["wqf", "st", "en"], ["w1"]),  # [1, N]
                 helper.make_node("Slice", ["x", "st", "en2"], ["x1"]),  # [M, 1]
                 helper.make_node("Add", ["x1", "w1"], ["y"])]
        out["c_conversion_only"] = model(nodes, [u4, z4, numpy_helper.from_array(scales, "s"),
                                                 numpy_helper.from_array(cs, "cs"),
                                                 numpy_helper.from_array(np.zeros(n, np.int8), "czp"),
                                                 numpy_helper.from_array(np.array([0, 0], np.int64), "st"),
                                                 numpy_helper.from_array(np.array([1, n], np.int64), "en"),
                                                 numpy_helper.from_array(np.array([1 << 30, 1], np.int64), "en2")], k, n)
    return out, w


def session(m, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    # keep the in-graph conversion per call (constant folding would store its result: a second copy)
    so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timeit(sess, x, reps):
    sess.run(None, {"x": x})
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def emulated(x, w4, ref, calib_x, outliers=(4, 16), alphas=(0.5,)):
    """Numpy emulation of per-row int8 activations × per-channel int8 weights with (i) the `k` input channels of
    largest calibration mean square kept in a float side matmul, (ii) SmoothQuant smoothing (x / s, W · s,
    s = max|x|^α / max|W|^(1-α) per input channel, from calibration activations)."""
    def rowq(a):
        s = np.maximum(np.abs(a).max(1, keepdims=True), 1e-8) / 127
        return np.round(a / s) * s

    def chq(w):
        s = np.maximum(np.abs(w).max(1, keepdims=True), 1e-12) / 127
        return np.round(w / s) * s

    out = {}
    ms = np.mean(calib_x.astype(np.float64) ** 2, 0)
    for k in outliers:
        c = np.argsort(ms)[-k:]
        xm = x.copy()
        xm[:, c] = 0
        y = rowq(xm) @ chq(w4).T + x[:, c] @ w4[:, c].T
        out[f"row8+{k}float"] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    for a in alphas:
        sm = np.maximum(np.abs(calib_x).max(0), 1e-5) ** a / np.maximum(np.abs(w4).max(0), 1e-5) ** (1 - a)
        y = rowq(x / sm) @ chq(w4 * sm).T
        out[f"smooth{a}"] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    return out


def real_activations(layers, tokens=512, text=ROOT / "tests/data/prose.txt"):
    """{layer: {proj: x [tokens, K]}}: inputs of each projection from the float model over prose.txt."""
    from export import calibrate
    from export.checkpoint import open_checkpoint
    from export.qwen2 import Qwen2Config
    import json

    ckpt = open_checkpoint(HF)
    cfg = Qwen2Config.from_dict(json.loads((HF / "config.json").read_text()))
    ids = calibrate.token_batches(HF / "tokenizer.json", Path(text).read_text(), tokens, 1)
    h = ckpt.tensor("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))[ids]
    cos, sin = calibrate.rope_tables(tokens, cfg)
    out = {}
    for i in range(max(layers) + 1):
        p = f"model.layers.{i}"
        rec = {}

        def record(names, x):
            key = {"q_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "down_proj": "down"}.get(names[0].split(".")[-1])
            if key:
                rec[key] = x.reshape(-1, x.shape[-1]).copy()
        h = calibrate.decoder_layer(h, calibrate.layer_weights(ckpt.tensor, cfg, p), cfg, p, cos, sin, record)
        if i in layers:
            out[i] = rec
    return out, ckpt


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def scored_logprobs(folder, prefix: int, scored: int, one_call: bool = False):
    """Log-probs [scored, V] of tokens prefix+1 … of tests/data/prose.txt: the prefill of `prefix` tokens gives
    the first, then one single-token step per token (teacher-forced), each on the cache the prefill left.
    one_call: a single prefill over everything, the last `scored` positions (the float reference)."""
    import toolkit

    model = toolkit.load(folder, threads=2)
    ids = model.tokenizer.encode((ROOT / "tests/data/prose.txt").read_text())[:prefix + scored]
    cache = model.new_cache(1)
    if one_call:
        x = np.array([ids[:prefix + scored - 1]], dtype=np.int64)
        return log_softmax(model.forward("prefill", x, np.ones_like(x), cache, num_logits=scored)[0])
    x = np.array([ids[:prefix]], dtype=np.int64)
    out = [model.forward("prefill", x, np.ones_like(x), cache)[0, -1]]
    for t in range(prefix, prefix + scored - 1):
        out.append(model.forward("decode", np.array([[ids[t]]], dtype=np.int64), np.ones((1, t + 1), np.int64), cache)[0])
    return log_softmax(np.stack(out))


def kl_after_prefill(folders, reference, prefix=1024, scored=256):
    """Mean KL(reference || model) over the scored tokens, for each model folder."""
    ref = scored_logprobs(reference, prefix, scored, one_call=True)
    p = np.exp(ref)
    for folder in folders:
        lp = scored_logprobs(folder, prefix, scored)
        kl = (p * (ref - lp)).sum(-1)
        print(f"{folder}: KL {kl.mean():.5f} (first token {kl[0]:.5f}, tokens 2-{scored} {kl[1:].mean():.5f})",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,12,23")
    ap.add_argument("--time-layer", type=int, default=12)
    ap.add_argument("--sizes", default="128,512,1536")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--export", metavar="OUT", help="export the sample with prefill=int8 to OUT and stop")
    ap.add_argument("--kl", nargs="+", metavar="FOLDER", help="KL of decoding after each folder's prefill of "
                    "1024 tokens of prose.txt vs models/sample-fp32 over the next 256 tokens, and stop")
    args = ap.parse_args()
    if args.kl:
        kl_after_prefill(args.kl, ROOT / "models" / "sample-fp32")
        return
    if args.export:
        from export import QuantSpec
        from export import export
        export(HF, Path(args.export), QuantSpec.recommended(4), prefill="int8", log=print)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    if not args.skip_time:
        total = {}
        for proj in PROJ:
            q, s, zp, g = blob(args.time_layer, proj)
            vs, _ = variants(q, s, zp, g, bias(args.time_layer) if proj == "qkv" else None)
            for name, m in vs.items():
                try:
                    sess = session(m)
                except Exception as e:  # noqa: BLE001
                    print(f"{proj:8s} {name:20s} session failed: {str(e).splitlines()[0][:160]}", flush=True)
                    continue
                row = []
                for M in sizes:
                    x = rng.standard_normal((M, q.shape[1] * g)).astype(np.float32)
                    try:
                        t = timeit(sess, x, 7 if M <= 512 else 5)
                    except Exception as e:  # noqa: BLE001
                        print(f"{proj:8s} {name:20s} run failed: {str(e).splitlines()[0][:160]}", flush=True)
                        break
                    row.append(t)
                    total[(name, M)] = total.get((name, M), 0) + t
                print(f"{proj:8s} {name:20s} " + "  ".join(f"M={M}: {t * 1e3:8.2f} ms" for M, t in zip(sizes, row)),
                      flush=True)
        print("one layer, four projections (sum of medians):")
        for name in dict.fromkeys(n for n, _ in total):
            print(f"  {name:20s} " + "  ".join(f"M={M}: {total.get((name, M), float('nan')) * 1e3:8.2f} ms"
                                               for M in sizes) + f"   ×24 at M={sizes[-1]}: "
                  f"{total.get((name, sizes[-1]), float('nan')) * 24:.2f} s")
    if not args.skip_fidelity:
        layers = [int(s) for s in args.layers.split(",")]
        acts, ckpt = real_activations(layers)
        calib, _ = real_activations(layers, text=ROOT / "export/data/calibration.txt")  # channel choice
        print("fidelity: ‖y − x·W4ᵀ‖ / ‖x·W4ᵀ‖ on real activations (512 tokens of prose.txt); "
              "'int4 weights' is ‖x·W4ᵀ − x·Wᵀ‖ / ‖x·Wᵀ‖ (the error today's weights already have)")
        for i in layers:
            for proj in PROJ:
                q, s, zp, g = blob(i, proj)
                vs, w4 = variants(q, s, zp, g)
                x = acts[i][proj].astype(np.float32)
                ref = x @ w4.T
                parts = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "gate_up": ("mlp.gate_proj", "mlp.up_proj")}.get(proj, (PROJ[proj][0],))
                wf = np.concatenate([ckpt.tensor(f"model.layers.{i}.{p}.weight",
                                                 ckpt.raw(f"model.layers.{i}.{p}.weight").shape) for p in parts])
                yf = x @ wf.T
                errs = {"int4 weights": np.linalg.norm(ref - yf) / np.linalg.norm(yf)}
                for name, m in vs.items():
                    if name == "c_conversion_only":
                        continue
                    try:
                        y = session(m).run(None, {"x": x})[0]
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name}: {str(e).splitlines()[0][:200]}")
                        continue
                    errs[name] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
                errs |= emulated(x, w4, ref, calib[i][proj])
                kurt = np.abs(x).max() / np.sqrt(np.mean(x * x))
                print(f"  layer {i:2d} {proj:8s} max|x|/rms {kurt:7.1f}  " +
                      "  ".join(f"{k} {v:.4f}" for k, v in errs.items()), flush=True)


if __name__ == "__main__":
    main()
