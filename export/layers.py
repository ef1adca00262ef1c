"""The building blocks every architecture shares: linear, embedding, lm_head, RMSNorm, over the weights
the store pass already wrote (export/store.py): they only name stored tensors, they compute nothing.

The weight's stored layout decides the op (as mlx-lm swaps in QuantizedLinear per module): a float export
emits MatMul / Gather / Gemm, a quantized one com.microsoft MatMulNBits / GatherBlockQuantized. With
tied embeddings the embedding and the lm_head read one quantized blob, stored once. With ops "portable"
the quantized ones are standard DequantizeLinear + MatMul / Gather instead (export/portable.py). The norms
are the backend's (export/backend.py).
"""
import numpy as np

from export import portable, prefill_int8
from export.onnx_builder import Graph
from export.store import Store

MS = "com.microsoft"


def matmul_nbits(g: Graph, w: Store, name: str, use: str, x: str, n: int, k: int, bias: str | None = None,
                 out: str | None = None) -> str:
    """x @ dequant(W).T (+ bias) with MatMulNBits over the stored matrix `name` [n, k]."""
    s = w.stored(name, use)
    zp = f"{name}.weight.zero_points"
    return g.op("MatMulNBits", x, g.weight(f"{name}.weight.qdata"), g.weight(f"{name}.weight.scales"),
                None if s.symmetric else g.weight(zp), None, bias, domain=MS, K=k, N=n, bits=s.bits,
                block_size=s.group_size, accuracy_level=w.spec.accuracy_for(s.bits), out=out)


def linear(g: Graph, w: Store, name: str, x: str, n: int, k: int, bias: bool = False,
           long: str | None = None) -> str:
    """x @ W.T (+ b) for the stored matrix `name` [n, k] (a checkpoint Linear, or several stacked along
    rows that read the same input: x @ [W1; W2; …].T -> [..., n]). `long` (prefill="int8", the prefill
    graph): the bool value that sends a long prompt through the matrix's int8 copy (export/prefill_int8.py)."""
    b = g.weight(f"{name}.bias") if bias else None
    s = w.stored(name, "matmul")
    if s.layout == "nbits" and long is not None:
        return prefill_int8.switch(g, long, lambda: prefill_int8.int8_matmul(g, name, x, k, b),
                                   lambda: matmul_nbits(g, w, name, "matmul", x, n, k, bias=b))
    if s.layout == "nbits":
        return matmul_nbits(g, w, name, "matmul", x, n, k, bias=b)
    if s.layout == "dq":
        y = g.op("MatMul", x, portable.dequantized_matrix(g, name, s.group_size))
    else:  # float32, stored [k, n] so MatMul reads it without a Transpose
        y = g.op("MatMul", x, g.weight(f"{name}.weight.T"))
    return g.op("Add", y, b) if b else y


def embedding(g: Graph, w: Store, name: str, vocab: int, hidden: int, ids: str) -> str:
    """Rows of the token embedding table [vocab, hidden] for `ids` [B, S] -> [B, S, hidden]."""
    s = w.stored(name, "embedding")
    if s.layout == "table":
        return g.op("Gather", g.weight(f"{name}.weight"), ids)
    if s.layout == "rows":
        return portable.embedding(g, name, s.bits, s.group_size, s.symmetric, ids)
    # GatherBlockQuantized reads the MatMulNBits blob [V, H/group, group*bits/8] as [V, H*bits/8].
    rows = g.weight_view(f"{name}.weight.qrows", f"{name}.weight.qdata", (vocab, hidden * s.bits // 8), np.uint8)
    zp = None if s.symmetric else g.weight(f"{name}.weight.zero_points")
    return g.op("GatherBlockQuantized", rows, ids, g.weight(f"{name}.weight.scales"), zp, domain=MS, bits=s.bits,
                block_size=s.group_size, gather_axis=0, quantize_axis=1)


def lm_head(g: Graph, w: Store, name: str, cfg, x: str, out: str | None = None) -> str:
    """Logits [..., vocab] from hidden states [..., hidden] with the stored matrix `name` (the embedding's
    when tied)."""
    V, H = cfg.vocab_size, cfg.hidden_size
    s = w.stored(name, "lm_head")
    if s.layout == "nbits":
        return matmul_nbits(g, w, name, "lm_head", x, V, H, out=out)
    if s.layout == "dq":
        return g.op("MatMul", x, portable.dequantized_matrix(g, name, s.group_size), out=out)
    # Gemm reads the [V, H] table transposed in place (a Transpose node would be constant-folded into a
    # second copy in RAM); Gemm is 2-D only, so [..., H] is flattened and the leading axes restored.
    flat = g.op("Reshape", x, g.const([-1, H], np.int64))
    y = g.op("Gemm", flat, g.weight(f"{name}.weight"), transB=1)
    shape = g.op("Concat", g.op("Shape", x, end=-1), g.const([V], np.int64), axis=0)
    return g.op("Reshape", y, shape, out=out)


def rms_norm(g: Graph, w: Store, name: str, cfg, x: str) -> str:
    """x / sqrt(mean(x²) + eps) * weight, computed in float32 (the backend's op)."""
    return w.backend.norm(g, g.weight(f"{name}.weight"), cfg.rms_norm_eps, x)


def add_rms_norm(g: Graph, w: Store, name: str, cfg, x: str, residual: str) -> tuple[str, str]:
    """The residual step and the next norm: (rms_norm(residual + x), residual + x), in one op where the
    backend has one (com.microsoft SkipSimplifiedLayerNormalization)."""
    return w.backend.add_norm(g, g.weight(f"{name}.weight"), cfg.rms_norm_eps, x, residual)
