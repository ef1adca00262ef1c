"""Which ops the graphs are made of, chosen once per export (as mlx-lm swaps a module): the graph
functions in export/layers.py and export/qwen2.py receive a Backend and call it where the op depends on
the target, so they read like the equations and a new target is a new Backend, not a branch everywhere.

    Fast(device="cpu")                   onnxruntime's contrib ops, float32 activations (the default export)
    Fast(device="cuda", "float16")       the same ops in float16: what onnxruntime's CUDA kernels take
                                         (GroupQueryAttention has no float32 CUDA kernel)
    Fast(device="dml", "float16")        DirectML: no GatherBlockQuantized kernel, so the embedding is a float16
                                         table; RoPE by RotaryEmbedding outside GroupQueryAttention (as
                                         onnxruntime-genai builds DirectML models)
    Portable()                           standard ONNX ops only (export/portable.py), float32
    Fast(prefill="int8")                 CPU, float32: prompts of at least prefill_threshold tokens run their
                                         matmuls on a stored int8 copy of each matrix (export/prefill_int8.py)

What the backend decides: the stored layout of each matrix (with its precision), the element type of
activations and of every float tensor stored (scales, biases, norm weights, RoPE tables), the norms, the
attention and what attention needs once per graph. Quantized matmuls and embeddings follow the stored
layout (export/layers.py).
"""
from dataclasses import dataclass

import numpy as np

from export import portable, prefill_int8, rope
from export.onnx_builder import FLOAT, FLOAT16, INT32, INT64, Graph

MS = "com.microsoft"
DEVICES = ("cpu", "cuda", "dml")
ACTIVATIONS = {"float32": (FLOAT, np.float32), "float16": (FLOAT16, np.float16)}


@dataclass(frozen=True)
class Fast:
    """com.microsoft MatMulNBits, GatherBlockQuantized, GroupQueryAttention, (Skip)SimplifiedLayerNormalization."""

    device: str = "cpu"
    activation: str = "float32"
    prefill: str = "nbits"  # "int8": long prompts on the int8 copies (export/prefill_int8.py)
    prefill_threshold: int = prefill_int8.DEFAULT_THRESHOLD  # tokens from which a call takes the int8 path
    ops = "fast"

    @property
    def elem(self) -> int:
        """ONNX element type of activations and stored float tensors."""
        return ACTIVATIONS[self.activation][0]

    @property
    def dtype(self):
        return ACTIVATIONS[self.activation][1]

    @property
    def in_place_cache(self) -> bool:
        """GroupQueryAttention appends to the past buffer: one buffer is bound as past and present."""
        return True

    def layout(self, quantized: bool, use: str) -> str:
        """How a matrix of this `use` is stored (export/store.py's table of layouts)."""
        if quantized and not (use == "embedding" and self.device == "dml"):
            return "nbits"
        return "T" if use == "matmul" else "table"

    def norm(self, g: Graph, weight: str, eps: float, x: str) -> str:
        """RMSNorm, computed in float32 inside the op whatever the activation type."""
        return g.op("SimplifiedLayerNormalization", x, weight, axis=-1, epsilon=eps, stash_type=1)

    def add_norm(self, g: Graph, weight: str, eps: float, x: str, residual: str) -> tuple[str, str]:
        """(rms_norm(residual + x), residual + x) in one op."""
        normed, _, _, total = g.op_multi("SkipSimplifiedLayerNormalization", x, residual, weight, n_out=4,
                                         domain=MS, epsilon=eps)
        return normed, total

    def attention_context(self, g: Graph, cfg, input_ids: str, attention_mask: str) -> tuple:
        """Made once per graph: each row's length for GroupQueryAttention, and RoPE's inputs."""
        seqlens, total = attention_lengths(g, attention_mask)
        if self.device == "dml":  # positions for RotaryEmbedding: the new tokens follow each row's past
            new = g.op("Shape", input_ids, start=1, end=2)
            start = g.op("Sub", g.op("Cast", seqlens, to=INT64), g.op("Sub", new, g.const([1], np.int64)))
            steps = g.op("Range", g.const(0, np.int64), g.op("Squeeze", new), g.const(1, np.int64))
            positions = g.op("Add", g.op("Unsqueeze", start, g.const([1], np.int64)), steps)
            return seqlens, total, g.weight("rope.cos"), g.weight("rope.sin"), positions
        return seqlens, total, g.weight("rope.cos"), g.weight("rope.sin")

    def attention(self, g: Graph, cfg, qkv: str, names: tuple, context: tuple, scales: tuple | None) -> str:
        """GroupQueryAttention over the stacked q/k/v projection; `scales` (k, v) for an int8 cache."""
        past_k, past_v, present_k, present_v = names
        nh, kvh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        heads = dict(domain=MS, num_heads=nh, kv_num_heads=kvh)
        if self.device == "dml":
            seqlens, total, cos, sin, positions = context
            q, k, v = g.op_multi("Split", qkv, g.const([nh * D, kvh * D, kvh * D], np.int64), n_out=3, axis=-1)
            q = g.op("RotaryEmbedding", q, positions, cos, sin, domain=MS, interleaved=0, num_heads=nh)
            k = g.op("RotaryEmbedding", k, positions, cos, sin, domain=MS, interleaved=0, num_heads=kvh)
            y, _, _ = g.op_multi("GroupQueryAttention", q, k, v, past_k, past_v, seqlens, total, n_out=3,
                                 outs=[None, present_k, present_v], do_rotary=0, **heads)
            return y
        quant = {}
        if scales is not None:  # keys and values stored as round(x / scale), scales per channel, in place
            context = (*context, None, None, None, *scales)
            quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        y, _, _ = g.op_multi("GroupQueryAttention", qkv, None, None, past_k, past_v, *context, n_out=3,
                             outs=[None, present_k, present_v], do_rotary=1, rotary_interleaved=0, **heads, **quant)
        return y

    def constants(self, cfg) -> dict[str, np.ndarray]:
        """Tables the graphs read that are computed rather than read from the checkpoint: RoPE's cos/sin
        [context_length, head_dim / 2] (YaRN-scaled when the config says so), in the activation type."""
        cos, sin = rope.tables(cfg.head_dim, cfg.rope_theta, cfg.context_length, cfg.rope_scaling)
        return {"rope.cos": cos.astype(self.dtype), "rope.sin": sin.astype(self.dtype)}


@dataclass(frozen=True)
class Portable(Fast):
    """Standard ONNX ops only (opset 21), float32, for runtimes without onnxruntime's contrib ops."""

    ops = "portable"

    @property
    def in_place_cache(self) -> bool:
        return False  # present = [past; new], a new tensor each call

    def layout(self, quantized: bool, use: str) -> str:
        if quantized:
            return "rows" if use == "embedding" else "dq"
        return "T" if use == "matmul" else "table"

    def norm(self, g, weight, eps, x):
        return portable.rms_norm(g, weight, eps, x)

    def add_norm(self, g, weight, eps, x, residual):
        total = g.op("Add", residual, x)
        return portable.rms_norm(g, weight, eps, total), total

    def attention_context(self, g, cfg, input_ids, attention_mask):
        return portable.attention_inputs(g, cfg, input_ids, attention_mask)

    def attention(self, g, cfg, qkv, names, context, scales):
        return portable.attention(g, cfg, qkv, names, context)

    def constants(self, cfg):
        return {}  # the graphs compute RoPE from the positions


def attention_lengths(g: Graph, attention_mask: str) -> tuple[str, str]:
    """GroupQueryAttention's view of the mask, made once per graph: seqlens_k int32 [B] (each row's
    length minus one, new tokens included) and total_sequence_length int32 [] (the mask's width)."""
    with g.scope("lengths"):
        count = g.op("ReduceSum", attention_mask, g.const([1], np.int64), keepdims=0)
        seqlens = g.op("Cast", g.op("Sub", count, g.const(1, np.int64)), to=INT32)
        total = g.op("Cast", g.op("Squeeze", g.op("Shape", attention_mask, start=1, end=2)), to=INT32)
    return seqlens, total


def backend(ops: str = "fast", device: str = "cpu", activation: str | None = None, prefill: str = "nbits",
            prefill_threshold: int = prefill_int8.DEFAULT_THRESHOLD):
    """The Backend for an export's --ops, --device and activation type (None: float16 on a GPU, else float32),
    and prefill ("nbits", or "int8": prompts of at least prefill_threshold tokens on int8 copies; fast CPU
    float32 only). Raises ValueError naming the option for a combination no backend builds."""
    if device not in DEVICES:
        raise ValueError(f"--device {device}: expected one of {', '.join(DEVICES)}")
    activation = activation or ("float32" if device == "cpu" else "float16")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation}: expected one of {', '.join(ACTIVATIONS)}")
    if prefill not in prefill_int8.MODES:
        raise ValueError(f"--prefill {prefill}: expected one of {', '.join(prefill_int8.MODES)}")
    if prefill == "int8" and (ops, device, activation) != ("fast", "cpu", "float32"):
        raise ValueError("--prefill int8: onnxruntime's int8 GEMM on the CPU; expected --ops fast --device cpu")
    if isinstance(prefill_threshold, bool) or not isinstance(prefill_threshold, int) or prefill_threshold < 2:
        raise ValueError(f"--prefill-threshold {prefill_threshold}: expected an integer >= 2")
    if ops == "portable":
        if device != "cpu" or activation != "float32":
            raise ValueError("--ops portable: builds float32 graphs for the CPU; expected --device cpu")
        return Portable()
    if ops != "fast":
        raise ValueError(f"--ops {ops}: expected fast or portable")
    if device == "cuda" and activation == "float32":
        raise ValueError("--device cuda: onnxruntime's CUDA GroupQueryAttention takes float16; expected float16")
    return Fast(device, activation, prefill, prefill_threshold)
