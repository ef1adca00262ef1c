"""Long prompts on the CPU's int8 matrix units (AVX-512 VNNI / AMX through onnxruntime's MLAS int8 GEMM):
prefill="int8", an opt-in of the fast CPU backend (export/backend.py).

MatMulNBits at accuracy_level 4 quantizes its input per block of 32 and is built for few rows: on a long
prompt its int4 kernel is 2-2.5x slower than a plain int8 GEMM (tests/bench/prefill.py). With this option
each quantized Linear also has an int8 copy, quantized from the float checkpoint per output channel, and the
prefill graph picks per call, by the prompt's length:

    long = Shape(input_ids)[1] >= threshold                       once per graph (long_prompt)
    y = If(long,
           then: x ─row_quantize─► uint8 [.., K] (zero point 128), row scale [.., 1]
                   ─MatMulIntegerToFloat (× column scales)─► Mul(row scale) (+ bias)      int8_matmul
           else: MatMulNBits(x)                                    (export/layers.py matmul_nbits)
    )

So one session serves prompts and single-token steps (which take the else branch: decode is unchanged), the
decode graph has no If. Stored per matrix M (its rows stacked as MatMulNBits stacks them):
    M.weight.int8         int8 [K, N]   round(W / scale), W from the float checkpoint (not the int4 codes)
    M.weight.int8_scales  float32 [N]   max|W[n, :]| / 127
Cost: a second copy of every layer matrix, int8 (the 0.5B sample: +344 MB on disk; peak RSS at a 1536-token
prompt 1,022 MB against 711 MB).
"""
import contextlib

import numpy as np
import onnx
from onnx import helper

from export.onnx_builder import FLOAT, Graph

MS = "com.microsoft"
MODES = ("nbits", "int8")
DEFAULT_THRESHOLD = 64  # tokens; below it MatMulNBits is as fast (tests/bench/prefill.py, 2 threads)


def stored_names(name: str) -> tuple[str, str]:
    """The int8 copy's codes and column scales of matrix `name`."""
    return f"{name}.weight.int8", f"{name}.weight.int8_scales"


def quantize_channels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel of a float [N, K] weight: (codes int8 [K, N], scales float32 [N])."""
    scales = np.maximum(np.abs(w).max(axis=1), np.finfo(np.float32).tiny) / 127
    codes = np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(codes.T), scales.astype(np.float32)


SEPARATE = ("mlp.gate_up_proj",)  # stacked matrices whose int8 copies are stored per part: the int8 branch
# multiplies by gate and up separately, so the MLP needs no Split of a [S, 2I] product


def tensors(ckpt, plan):
    """(name, array) of every int8 copy, one matrix (or part) at a time (`plan`: qwen2.matrices; uses
    "matmul" only), for the store pass to append to the weights file."""
    for m in plan:
        if m.use != "matmul":
            continue
        if m.name.endswith(SEPARATE):
            copies = [(part, ckpt.tensor(f"{part}.weight", (rows, m.k))) for part, rows in m.parts]
        else:
            copies = [(m.name, np.concatenate([ckpt.tensor(f"{part}.weight", (rows, m.k)) for part, rows in m.parts]))]
        for name, w in copies:
            codes, scales = quantize_channels(w)
            yield stored_names(name)[0], codes
            yield stored_names(name)[1], scales
            del w


def long_prompt(g: Graph, input_ids: str, threshold: int) -> str:
    """bool [] : the call has at least `threshold` new tokens (made once per prefill graph)."""
    with g.scope("prefill_int8"):
        length = g.op("Squeeze", g.op("Shape", input_ids, start=1, end=2))
        return g.op("GreaterOrEqual", length, g.const(threshold, np.int64))


def row_quantize(g: Graph, x: str, k: int) -> tuple[str, str]:
    """x [.., K] float -> (uint8 codes round(x / s) + 128, s [.., 1] = max|x| per row / 127): one scale per
    token, by QuantizeLinear with one block of K along the last axis. max|x| = max(max x, -min x): two
    reductions, no |x| tensor."""
    last = g.const([-1], np.int64)
    high = g.op("Max", g.op("ReduceMax", x, last, keepdims=1), g.op("Neg", g.op("ReduceMin", x, last, keepdims=1)))
    scale = g.op("Div", g.op("Max", high, g.const(1e-8, np.float32)), g.const(127, np.float32))
    zero = g.op("Expand", g.const([[[128]]], np.uint8), g.op("Shape", scale))
    return g.op("QuantizeLinear", x, scale, zero, axis=-1, block_size=k), scale


def int8_matmul(g: Graph, name: str, x: str, k: int, bias: str | None = None, quantized=None) -> str:
    """x @ W.T (+ b) with the int8 copy of matrix `name`: per-token int8 activations × per-channel int8 weights,
    int32 accumulation (MLAS's u8 x s8 kernel), scaled back to float. `quantized`: row_quantize(x), when
    several matrices read x."""
    codes, scales = stored_names(name)
    xq, row_scale = quantized or row_quantize(g, x, k)
    y = g.op("MatMulIntegerToFloat", xq, g.weight(codes), g.const(1, np.float32), g.weight(scales),
             g.const(128, np.uint8), domain=MS)  # acc(int32) x column scale
    y = g.op("Mul", y, row_scale)
    return g.op("Add", y, bias) if bias else y


@contextlib.contextmanager
def _nodes_into(g: Graph, nodes: list):
    """Ops made inside the block go to `nodes` (a branch) instead of the graph; weights and constants still
    become the graph's initializers, which the branches read from the outer scope."""
    saved, g.nodes = g.nodes, nodes
    try:
        yield
    finally:
        g.nodes = saved


def gate_up(g: Graph, parts: tuple[str, str], x: str, k: int) -> tuple[str, str]:
    """(x @ gate.T, x @ up.T) with the int8 copies of the gate and up parts of a stacked matrix (SEPARATE), x
    quantized once."""
    quantized = row_quantize(g, x, k)
    return tuple(int8_matmul(g, part, x, k, quantized=quantized) for part in parts)


def branch(g: Graph, name: str, make) -> onnx.GraphProto:
    """A subgraph of the ops `make()` adds; its outputs are the value(s) `make()` returns."""
    nodes = []
    with _nodes_into(g, nodes):
        out = make()
    outs = [out] if isinstance(out, str) else list(out)
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, FLOAT, None) for o in outs])


def switch(g: Graph, long: str, then_make, else_make, n_out: int = 1):
    """If(long) then_make() else else_make(): the value (n_out > 1: the values) of the branch taken."""
    node = g._fresh("If").replace("/", "_")
    outs = g.op_multi("If", long, n_out=n_out, then_branch=branch(g, f"{node}_int8", then_make),
                      else_branch=branch(g, f"{node}_nbits", else_make))
    return outs[0] if n_out == 1 else outs

