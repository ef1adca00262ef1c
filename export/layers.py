"""The building blocks every architecture shares: linear, embedding, lm_head, RMSNorm.

The weight's storage decides the op (as mlx-lm swaps in QuantizedLinear per module): a float export
emits MatMul / Gather / Gemm, a quantized one com.microsoft MatMulNBits / GatherBlockQuantized. With
tied embeddings the embedding and the lm_head read one quantized blob, stored once. With ops "portable"
the quantized ones are standard DequantizeLinear + MatMul / Gather instead (export/portable.py).
"""
import numpy as np

from export import portable
from export.checkpoint import Checkpoint
from export.onnx_builder import Graph
from export.quantize import QuantSpec, quantize_weight

MS = "com.microsoft"


class Weights:
    """Tensors for the graph functions: read lazily from the checkpoint, quantized per the spec, and
    recorded (`self.quantized`, `self.float`) for the manifest."""

    def __init__(self, ckpt: Checkpoint, spec: QuantSpec, tied: bool, importance: dict | None = None,
                 ops: str = "fast"):
        self.ckpt, self.spec, self.tied = ckpt, spec, tied
        self.ops = ops  # "fast" (onnxruntime contrib ops) or "portable" (standard ONNX only)
        self._quantized = {}  # checkpoint matrix name -> QuantizedWeight, quantized once for every graph
        self.importance = importance or {}  # matrix name -> mean square of its input channels (calibrated)
        self.quantized: dict[str, int] = {}  # checkpoint tensor name -> bits, for those stored as int4/int8
        self.groups: dict[str, int] = {}  # checkpoint tensor name -> group size, for the same tensors
        self.stacked: dict[str, tuple[int, int]] = {}  # graph matrix name -> (bits, group size)
        self.float: list[str] = []  # checkpoint tensor names stored as float32

    def tensor(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.float:
            self.float.append(name)
        return self.ckpt.tensor(name, shape)


def quantize_matrix(w: Weights, name: str, n: int, k: int):
    """Checkpoint weight `name` [n, k] quantized per the spec (once; recorded for the manifest)."""
    if name in w._quantized:
        return w._quantized[name]
    method = w.spec.method
    importance = w.importance.get(name)
    if method == "calibrated" and importance is None:  # e.g. an untied embedding: no matmul input
        method = "search"
    qw = quantize_weight(w.ckpt.tensor(f"{name}.weight", (n, k)), w.spec.bits_for(name, w.tied),
                         w.spec.group_for(name, w.tied), w.spec.symmetric, method, importance)
    w.quantized[f"{name}.weight"] = qw.bits
    w.groups[f"{name}.weight"] = qw.group_size
    w._quantized[name] = qw
    return qw


def quantized(g: Graph, w: Weights, name: str, parts: list[tuple[str, int]], k: int) -> tuple[str, str, str | None]:
    """(data, scales, zero_points) names in the weights file of the matrix `name`: the checkpoint weights
    `parts` [(name, rows)], each [rows, k], quantized on first use and stacked along the rows (one
    MatMulNBits can then compute q/k/v, or gate/up, at once: rows are quantized independently, so stacking
    changes nothing numerically). zero_points is None when symmetric."""
    names = (f"{name}.weight.qdata", f"{name}.weight.scales", f"{name}.weight.zero_points")
    if names[0] not in g.weights:
        qws = [quantize_matrix(w, part, n, k) for part, n in parts]
        if len({(q.bits, q.group_size) for q in qws}) != 1:
            raise ValueError(f"{name}: parts quantized with different bits or group sizes")
        g.weights.add(names[0], np.concatenate([q.packed for q in qws]))
        g.weights.add(names[1], np.concatenate([q.scales for q in qws]))
        if qws[0].zero_points is not None:
            g.weights.add(names[2], np.concatenate([q.zero_points for q in qws]))
        w.stacked[name] = (qws[0].bits, qws[0].group_size)
    return tuple(n_ if n_ in g.weights else None for n_ in names)


def matmul_nbits(g: Graph, w: Weights, name: str, parts: list[tuple[str, int]], x: str, k: int,
                 bias: str | None = None, out: str | None = None) -> str:
    """x @ dequant(W).T (+ bias) with MatMulNBits, W the rows of `parts` stacked (see `quantized`)."""
    data, scales, zp = quantized(g, w, name, parts, k)
    bits, group = w.stacked[name]
    n = sum(rows for _, rows in parts)
    return g.op("MatMulNBits", x, g.weight(data), g.weight(scales), zp and g.weight(zp), None, bias, domain=MS,
                K=k, N=n, bits=bits, block_size=group, accuracy_level=w.spec.accuracy_for(bits), out=out)


def linear(g: Graph, w: Weights, name: str, x: str, n: int, k: int, bias: bool = False) -> str:
    """x @ W.T (+ b) for a checkpoint Linear `name` with W [n, k]."""
    return stacked_linear(g, w, name, [(name, n)], x, k, bias)


def stacked_linear(g: Graph, w: Weights, name: str, parts: list[tuple[str, int]], x: str, k: int,
                   bias: bool = False) -> str:
    """One matmul computing several checkpoint Linears that read the same input: x @ [W1; W2; …].T
    (+ [b1; b2; …]) -> [..., sum of rows]; `name` names the stacked matrix in the graph."""
    b = None
    if bias:
        b = f"{name}.bias"
        if b not in g.weights:
            g.weights.add(b, np.concatenate([w.tensor(f"{part}.bias", (n,)) for part, n in parts]))
        b = g.weight(b)
    if w.spec.quantized and w.ops == "portable":
        qws = [quantize_matrix(w, part, n, k) for part, n in parts]
        y = g.op("MatMul", x, portable.dequantized_matrix(g, name, qws, qws[0].bits, qws[0].group_size))
        return g.op("Add", y, b) if b else y
    if w.spec.quantized:
        return matmul_nbits(g, w, name, parts, x, k, bias=b)
    wt = f"{name}.weight.T"  # stored as [k, n] so MatMul reads it without a Transpose
    if wt not in g.weights:
        g.weights.add(wt, np.concatenate([w.tensor(f"{part}.weight", (n, k)) for part, n in parts]).T)
    y = g.op("MatMul", x, g.weight(wt))
    return g.op("Add", y, b) if b else y


def embedding(g: Graph, w: Weights, name: str, vocab: int, hidden: int, ids: str) -> str:
    """Rows of the token embedding table [vocab, hidden] for `ids` [B, S] -> [B, S, hidden]."""
    if not w.spec.quantized:
        return g.op("Gather", float_matrix(g, w, name, vocab, hidden), ids)
    if w.ops == "portable":
        return portable.embedding(g, name, quantize_matrix(w, name, vocab, hidden), ids)
    data, scales, zp = quantized(g, w, name, [(name, vocab)], hidden)
    # GatherBlockQuantized reads the MatMulNBits blob [V, H/group, group*bits/8] as [V, H*bits/8].
    bits, group = w.stacked[name]
    rows = g.weight_view(f"{name}.weight.qrows", data, (vocab, hidden * bits // 8), np.uint8)
    return g.op("GatherBlockQuantized", rows, ids, g.weight(scales), zp and g.weight(zp), domain=MS, bits=bits,
                block_size=group, gather_axis=0, quantize_axis=1)


def lm_head(g: Graph, w: Weights, cfg, x: str, out: str) -> str:
    """Logits [..., vocab] from hidden states [..., hidden]; tied checkpoints reuse the embedding."""
    name = "model.embed_tokens" if w.tied else "lm_head"
    V, H = cfg.vocab_size, cfg.hidden_size
    if w.spec.quantized and w.ops == "portable":
        qw = quantize_matrix(w, name, V, H)
        return g.op("MatMul", x, portable.dequantized_matrix(g, name, [qw], qw.bits, qw.group_size), out=out)
    if w.spec.quantized:
        return matmul_nbits(g, w, name, [(name, V)], x, H, out=out)
    # Gemm reads the [V, H] table transposed in place (a Transpose node would be constant-folded into a
    # second copy in RAM); Gemm is 2-D only, so [..., H] is flattened and the leading axes restored.
    table = float_matrix(g, w, name, V, H)
    flat = g.op("Reshape", x, g.const([-1, H], np.int64))
    y = g.op("Gemm", flat, table, transB=1)
    shape = g.op("Concat", g.op("Shape", x, end=-1), g.const([V], np.int64), axis=0)
    return g.op("Reshape", y, shape, out=out)


def float_matrix(g: Graph, w: Weights, name: str, n: int, k: int) -> str:
    """Weight `name` [n, k] in float32, as stored in the checkpoint (no transpose)."""
    key = f"{name}.weight"
    if key not in g.weights:
        g.weights.add(key, w.tensor(key, (n, k)))
    return g.weight(key)


def norm_weight(g: Graph, w: Weights, name: str, cfg) -> str:
    key = f"{name}.weight"
    if key not in g.weights:
        g.weights.add(key, w.tensor(key, (cfg.hidden_size,)))
    return g.weight(key)


def rms_norm(g: Graph, w: Weights, name: str, cfg, x: str) -> str:
    """x / sqrt(mean(x²) + eps) * weight, computed in float32 (ORT's SimplifiedLayerNormalization)."""
    if w.ops == "portable":
        return portable.rms_norm(g, norm_weight(g, w, name, cfg), cfg.rms_norm_eps, x)
    return g.op("SimplifiedLayerNormalization", x, norm_weight(g, w, name, cfg), axis=-1, epsilon=cfg.rms_norm_eps,
                stash_type=1)


def add_rms_norm(g: Graph, w: Weights, name: str, cfg, x: str, residual: str) -> tuple[str, str]:
    """The residual step and the next norm in one op: (rms_norm(residual + x), residual + x), with
    com.microsoft SkipSimplifiedLayerNormalization."""
    if w.ops == "portable":
        total = g.op("Add", residual, x)
        return rms_norm(g, w, name, cfg, total), total
    normed, _, _, total = g.op_multi("SkipSimplifiedLayerNormalization", x, residual, norm_weight(g, w, name, cfg),
                                     n_out=4, domain=MS, epsilon=cfg.rms_norm_eps)
    return normed, total
