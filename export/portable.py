"""`--ops portable`: the same model in standard ONNX ops only (opset 21), for runtimes without onnxruntime's
com.microsoft contrib ops. export/store.py stores the weights in these layouts, and export/layers.py and
export/qwen2.py build the graphs from them when the ops are "portable"; the default ("fast") graphs use
MatMulNBits, GatherBlockQuantized, GroupQueryAttention and SkipSimplifiedLayerNormalization instead.

    quantized matmul   DequantizeLinear(W [K, N] int4/uint4/int8/uint8, scales [K/g, N], zero points,
                       axis=0, block_size=g) -> MatMul    (onnxruntime fuses the pair into MatMulNBits)
    embedding          Gather of the rows, their scales (and zero points) -> blocked DequantizeLinear;
                       4-bit rows are stored two codes per byte and split with BitwiseAnd / BitShift
    RMSNorm            Pow, ReduceMean, Add, Sqrt, Div, Mul
    attention          RoPE from positions = cumsum(attention_mask) - 1, K/V concatenated to the past
                       (present = [past; new]), causal + padding mask, grouped-query attention in MatMul /
                       Softmax without repeating K/V

4-bit tensors are packed as ONNX stores them: the whole tensor row-major, two values per byte, the even
index in the low nibble. Symmetric codes (implicit zero point 2^(bits-1)) become signed int4/int8.
"""
import math

import numpy as np

from export import rope
from export.onnx_builder import BOOL, FLOAT, INT4, INT8, UINT4, UINT8, Graph, WeightFile
from export.quantize import pack_nibbles, unpack_nibbles


def codes(qw) -> tuple[np.ndarray, np.ndarray | None]:
    """(q uint8 [N, K] codes, zero points uint8 [N, K/g] or None) of a QuantizedWeight."""
    n, k = qw.shape
    groups = k // qw.group_size
    q = unpack_nibbles(qw.packed, qw.group_size) if qw.bits == 4 else qw.packed
    zero = None
    if qw.zero_points is not None:
        zero = unpack_nibbles(qw.zero_points, groups) if qw.bits == 4 else qw.zero_points
    return q.reshape(n, k), zero


def store_codes(file: WeightFile, name: str, values: np.ndarray, bits: int, signed: bool) -> None:
    """Store integer codes `values` as an ONNX tensor of the width and signedness asked for."""
    if bits == 8:
        data = (values ^ 0x80).view(np.int8) if signed else values
        file.add(name, data, elem_type=INT8 if signed else UINT8)
    else:
        data = pack_nibbles(((values ^ 0x8) if signed else values).reshape(-1))
        file.add(name, data, shape=values.shape, elem_type=INT4 if signed else UINT4)


def store_dequantized_matrix(file: WeightFile, name: str, qws: list) -> None:
    """The stacked matrices `qws` as DequantizeLinear's input, transposed to [K, N] for MatMul."""
    key = f"{name}.weight.dq"
    parts = [codes(q) for q in qws]
    q = np.concatenate([p[0] for p in parts]).T.copy()  # [K, N]
    scales = np.concatenate([q_.scales for q_ in qws]).T.copy()  # [K/g, N]
    zero = None if parts[0][1] is None else np.concatenate([p[1] for p in parts]).T.copy()
    store_codes(file, key, q, qws[0].bits, signed=zero is None)
    file.add(f"{key}.scales", scales)
    if zero is not None:
        store_codes(file, f"{key}.zero_points", zero, qws[0].bits, signed=False)


def dequantized_matrix(g: Graph, name: str, group: int) -> str:
    """DequantizeLinear of the stored matrix `name` (see store_dequantized_matrix): float [K, N]."""
    key = f"{name}.weight.dq"
    zp = f"{key}.zero_points"
    return g.op("DequantizeLinear", g.weight(key), g.weight(f"{key}.scales"), g.weight(zp) if zp in g.weights else None,
                axis=0, block_size=group)


def store_embedding(file: WeightFile, name: str, qw) -> None:
    """A quantized [V, H] table as rows to gather: 8-bit codes, or 4-bit rows of packed codes."""
    key = f"{name}.weight.rows"
    v, h = qw.shape
    q, zero = codes(qw)
    if qw.bits == 8:
        store_codes(file, key, q, 8, signed=zero is None)
    else:  # the MatMulNBits bytes are already rows of packed codes, [V, H/2]
        file.add(key, qw.packed.reshape(v, h // 2))
    file.add(f"{key}.scales", qw.scales)
    if zero is not None:
        file.add(f"{key}.zero_points", zero)


def embedding(g: Graph, name: str, bits: int, group: int, symmetric: bool, ids: str) -> str:
    """Rows of the stored quantized table `name` (see store_embedding) for `ids` [B, S] -> float [B, S, H]."""
    key = f"{name}.weight.rows"
    rows = g.op("Gather", g.weight(key), ids)  # [B, S, H] or [B, S, H/2] packed
    if bits == 4:
        low = g.op("BitwiseAnd", rows, g.const(0x0F, np.uint8))
        high = g.op("BitShift", rows, g.const(4, np.uint8), direction="RIGHT")
        pairs = g.op("Concat", g.op("Unsqueeze", low, g.const([-1], np.int64)),
                     g.op("Unsqueeze", high, g.const([-1], np.int64)), axis=-1)  # [B, S, H/2, 2]
        rows = g.op("Reshape", pairs, g.const([0, 0, -1], np.int64))  # [B, S, H] uint8 codes
        if symmetric:  # code - 8 as int8, no zero point
            rows = g.op("Sub", g.op("Cast", rows, to=INT8), g.const(8, np.int8))
    scales = g.op("Gather", g.weight(f"{key}.scales"), ids)  # [B, S, H/g]
    zp = g.op("Gather", g.weight(f"{key}.zero_points"), ids) if not symmetric else None
    return g.op("DequantizeLinear", rows, scales, zp, axis=-1, block_size=group)


def rms_norm(g: Graph, weight: str, eps: float, x: str) -> str:
    """x / sqrt(mean(x²) + eps) * weight."""
    mean = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1], np.int64), keepdims=1)
    return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.const(eps, np.float32)))), weight)


def attention_inputs(g: Graph, cfg, input_ids: str, attention_mask: str) -> tuple[str, str, str]:
    """RoPE tables [B, 1, S, D] and the additive attention mask [B, 1, rep*S, T], made once per graph.

    Positions count only the real tokens (cumsum of attention_mask - 1), so holes in the mask (a batch's
    shorter rows while it decodes) shift nothing."""
    with g.scope("rope"):
        total = g.op("Shape", attention_mask, start=1, end=2)  # [1] = T
        seq = g.op("Shape", input_ids, start=1, end=2)  # [1] = S
        past = g.op("Sub", total, seq)
        pos = g.op("Sub", g.op("CumSum", attention_mask, g.const(1, np.int64)), g.const(1, np.int64))
        pos = g.op("Slice", pos, past, total, g.const([1], np.int64))  # [B, S]
        inv_freq = rope.inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=FLOAT), g.const([-1], np.int64)),
                     g.const(inv_freq.astype(np.float32)))  # [B, S, D/2]
        emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1], np.int64))
        cos, sin = g.op("Cos", emb), g.op("Sin", emb)
        factor = rope.attention_factor(cfg.rope_scaling)  # YaRN scales q and k, so the logits by factor²
        if factor != 1.0:
            cos, sin = (g.op("Mul", t, g.const(factor, np.float32)) for t in (cos, sin))
    with g.scope("mask"):
        key_pos = g.op("Range", g.const(0, np.int64), g.op("Squeeze", total), g.const(1, np.int64))  # [T]
        query_pos = g.op("Range", g.op("Squeeze", past), g.op("Squeeze", total), g.const(1, np.int64))  # [S]
        causal = g.op("LessOrEqual", key_pos, g.op("Unsqueeze", query_pos, g.const([-1], np.int64)))  # [S, T]
        keep = g.op("Unsqueeze", g.op("Cast", attention_mask, to=BOOL), g.const([1], np.int64))  # [B, 1, T]
        allowed = g.op("And", causal, keep)  # [B, S, T]
        bias = g.op("Where", allowed, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32))
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        # Queries are laid out [B, kv_heads, rep * S, D] (see attention), so the mask repeats rep times.
        mask = g.op("Tile", g.op("Unsqueeze", bias, g.const([1], np.int64)), g.const([1, 1, rep, 1], np.int64))
    return cos, sin, mask


def attention(g: Graph, cfg, qkv: str, names: tuple, rope: tuple[str, str, str]) -> str:
    """Grouped-query self-attention of the stacked q/k/v projection `qkv` [B, S, (nh + 2 kvh) D] over
    [past KV ; new KV]; returns [B, S, nh D].

        q ─► [B,nh,S,D] ─RoPE─► [B,kvh,rep*S,D] ──────────────────┐
        k ─► [B,kvh,S,D] ─RoPE─► Concat(past) = present.key ──► Q·Kᵀ/√D + mask ─► Softmax ─┐
        v ─► [B,kvh,S,D] ──────► Concat(past) = present.value ─────────────────────────► ·V

    Each KV head serves `rep` query heads; folding those heads into the row axis of Q lets one MatMul per
    KV head do the work without materialising repeated keys."""
    nh, kvh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    past_k, past_v, present_k, present_v = names
    cos, sin, mask = rope
    q, k, v = g.op_multi("Split", qkv, g.const([nh * D, kvh * D, kvh * D], np.int64), n_out=3, axis=-1)

    def heads(y: str, n: int) -> str:  # [B, S, n*D] -> [B, n, S, D]
        return g.op("Transpose", g.op("Reshape", y, g.const([0, 0, n, D], np.int64)), perm=[0, 2, 1, 3])

    q = rotate(g, heads(q, nh), cos, sin)
    k = rotate(g, heads(k, kvh), cos, sin)
    k = g.op("Concat", past_k, k, axis=2, out=present_k)  # [B, kvh, T, D]
    v = g.op("Concat", past_v, heads(v, kvh), axis=2, out=present_v)
    q = g.op("Reshape", g.op("Mul", q, g.const(1.0 / math.sqrt(D), np.float32)),
             g.const([0, kvh, -1, D], np.int64))  # [B, kvh, rep*S, D]
    scores = g.op("Add", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), mask)  # [B, kvh, rep*S, T]
    y = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, kvh, rep*S, D]
    y = g.op("Transpose", g.op("Reshape", y, g.const([0, nh, -1, D], np.int64)), perm=[0, 2, 1, 3])
    return g.op("Reshape", y, g.const([0, 0, nh * D], np.int64))  # [B, S, nh*D]


def rotate(g: Graph, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin, with rotate_half([a, b]) = [-b, a] on the last axis."""
    a, b = g.op_multi("Split", x, n_out=2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", g.op("Neg", b), a, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))
