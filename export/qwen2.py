"""Qwen2 (Qwen2, Qwen2.5, Qwen2.5-Coder) as ONNX: the config and one function per block.

    h   = embed(input_ids)                                    [B, S, H]
    for each layer:
        h = h + o_proj(attention(rms_norm(h)))                 RoPE, grouped-query attention, KV cache
        h = h + down(silu(gate(rms_norm(h))) * up(rms_norm(h)))
    logits = lm_head(rms_norm(h)[:, -N:])                     [B, N, V], the last N positions

Op choices that keep a decode step to few nodes (each node costs scheduling time on a one-token step):
q/k/v and gate/up are stacked into one MatMulNBits each (bias fused into it), the residual adds ride in
SkipSimplifiedLayerNormalization, and RoPE + KV append + attention are one GroupQueryAttention.

Reference semantics: transformers' modeling_qwen2 (RMSNorm in float32, non-interleaved rotate_half RoPE,
bias on q/k/v only). The same function builds the prefill graph (S dynamic) and the decode graph (S = 1).
"""
import math
from dataclasses import dataclass

import numpy as np

from export import prefill_int8, rope
from export.layers import add_rms_norm, embedding, linear, lm_head, rms_norm
from export.onnx_builder import FLOAT, INT8, INT64, Graph
from export.store import Matrix, Store
from toolkit.errors import ModelFolderError


# Bounds of the integers that size the graphs and tables: far above any Qwen2 (151,936 tokens, hidden 8,192,
# 80 layers, 131,072 positions with YaRN), far below what would exhaust memory before a tensor is checked.
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 20, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 512,
          "max_position_embeddings": 1 << 20}


def show(value, width: int = 40) -> str:
    """repr(value) for a one-line message, cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


class Fields:
    """Typed, range-checked reads of one config dict; errors name the field and the file."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def _value(self, name: str, default, expected: str):
        value = self.d.get(name)
        if value is None and default is None:
            raise ModelFolderError(f"{self.source}: {name} is missing; expected {expected}")
        return default if value is None else value

    def integer(self, name: str, default=None, low: int = 1) -> int:
        """An integer in [low, LIMITS[name]] (null or absent: `default`)."""
        expected = f"an integer in [{low}, {LIMITS[name]}]"
        value = self._value(name, default, expected)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= LIMITS[name]:
            raise ModelFolderError(f"{self.source}: {name} {show(value)}: expected {expected}")
        return value

    def number(self, name: str, default, low: float, high: float, expected: str) -> float:
        """A finite number in the open interval (low, high) (null or absent: `default`)."""
        value = self._value(name, default, expected)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not low < value < high):
            raise ModelFolderError(f"{self.source}: {name} {show(value)}: expected {expected}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._value(name, default, "true or false")
        if not isinstance(value, bool):
            raise ModelFolderError(f"{self.source}: {name} {show(value)}: expected true or false")
        return value


def check_token_ids(value, name: str, source: str, vocab_size: int, many: bool = False) -> list[int]:
    """A token id in [0, vocab_size) or null (with `many`, as eos_token_id, also a list of them): the runtime
    stops at them and pads with them."""
    ids = value if many and isinstance(value, list) else [] if value is None else [value]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ModelFolderError(f"{source}: {name} {show(value)}: expected a token id in [0, {vocab_size})"
                                   + (", a list of them" if many else "") + " or null")
    return ids


@dataclass(frozen=True)
class Qwen2Config:
    """The fields of a Qwen2 config.json that shape the graphs, under their Hugging Face names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_attention_heads, as transformers derives it
    model_type: str = "qwen2"
    rope_scaling: rope.RopeScaling | None = None  # YaRN (Qwen2.5's long context), or None: plain RoPE

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Qwen2Config":
        """The config of a config.json dict (or GGUF metadata under the same names). Every field the export
        uses is type- and range-checked here, so nothing later divides by zero or sizes a table from a
        negative or absurd number; anything else raises a one-line ModelFolderError naming the field."""
        if not isinstance(d, dict):
            raise ModelFolderError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "qwen2":
            raise ModelFolderError(f"{source}: model_type {show(d.get('model_type'))} is not supported; expected "
                                   "'qwen2'")
        if d.get("use_sliding_window") not in (None, False):
            raise ModelFolderError(f"{source}: use_sliding_window {show(d['use_sliding_window'])} is not supported "
                                   "(yet); expected false")
        get = Fields(d, source)
        nh = get.integer("num_attention_heads")
        kvh = get.integer("num_key_value_heads", nh)
        if nh % kvh:
            raise ModelFolderError(f"{source}: num_attention_heads {nh} is not a multiple of num_key_value_heads "
                                   f"{kvh}; expected num_key_value_heads to divide it")
        hidden = get.integer("hidden_size")
        head_dim = get.integer("head_dim", 0, low=0)  # 0 or absent: hidden_size / num_attention_heads
        if head_dim == 0 and hidden % nh:
            raise ModelFolderError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {nh}; "
                                   "expected it to be (or a head_dim)")
        head_dim = head_dim or hidden // nh
        if head_dim % 2 or head_dim > LIMITS["head_dim"]:
            raise ModelFolderError(f"{source}: head_dim {head_dim} (given or hidden_size / num_attention_heads): "
                                   f"expected an even number up to {LIMITS['head_dim']} (RoPE turns channel pairs)")
        cfg = cls(vocab_size=get.integer("vocab_size"), hidden_size=hidden,
                  intermediate_size=get.integer("intermediate_size"),
                  num_hidden_layers=get.integer("num_hidden_layers"), num_attention_heads=nh, num_key_value_heads=kvh,
                  rms_norm_eps=get.number("rms_norm_eps", None, 0.0, 1.0, "a number in (0, 1)"),
                  rope_theta=get.number("rope_theta", 10000.0, 1.0, math.inf, "a finite number > 1"),
                  max_position_embeddings=get.integer("max_position_embeddings", rope.DEFAULT_MAX_POSITIONS),
                  tie_word_embeddings=get.boolean("tie_word_embeddings", False), head_dim=head_dim,
                  rope_scaling=rope.RopeScaling.from_config(d, source))
        if cfg.context_length > LIMITS["max_position_embeddings"]:
            s = cfg.rope_scaling
            raise ModelFolderError(f"{source}: rope_scaling.factor {s.factor:g} × original_max_position_embeddings "
                                   f"{s.original_max_position_embeddings} = {cfg.context_length} positions; expected "
                                   f"at most {LIMITS['max_position_embeddings']}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            check_token_ids(d.get(name), name, source, cfg.vocab_size, many=name == "eos_token_id")
        return cfg

    @property
    def context_length(self) -> int:
        """Positions the graphs serve: max_position_embeddings, or YaRN's original × factor if larger."""
        return rope.context_length(self.max_position_embeddings, self.rope_scaling)


def expected_tensors(cfg: Qwen2Config) -> dict[str, tuple]:
    """Every checkpoint tensor the graphs read, with its shape (lm_head only when untied)."""
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    out = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        for name, n in (("q_proj", nh * D), ("k_proj", kvh * D), ("v_proj", kvh * D)):
            out[f"{p}.self_attn.{name}.weight"] = (n, H)
            out[f"{p}.self_attn.{name}.bias"] = (n,)
        out[f"{p}.self_attn.o_proj.weight"] = (H, nh * D)
        out |= {f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                f"{p}.mlp.down_proj.weight": (H, I), f"{p}.input_layernorm.weight": (H,),
                f"{p}.post_attention_layernorm.weight": (H,)}
    return out


def matrices(cfg: Qwen2Config) -> list[Matrix]:
    """Every matrix the graphs read, in the order the store pass writes them: q/k/v and gate/up stacked
    (one MatMulNBits computes each stack), the embedding, and the lm_head (the embedding's when tied)."""
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    out = [Matrix("model.embed_tokens", (("model.embed_tokens", cfg.vocab_size),), H, use="embedding")]
    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out += [Matrix(f"{a}.qkv_proj", ((f"{a}.q_proj", nh * D), (f"{a}.k_proj", kvh * D), (f"{a}.v_proj", kvh * D)),
                       H, bias=True),
                Matrix(f"{a}.o_proj", ((f"{a}.o_proj", H),), nh * D),
                Matrix(f"{m}.gate_up_proj", ((f"{m}.gate_proj", I), (f"{m}.up_proj", I)), H),
                Matrix(f"{m}.down_proj", ((f"{m}.down_proj", H),), I)]
    head = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    return out + [Matrix(head, ((head, cfg.vocab_size),), H, use="lm_head")]


def vectors(cfg: Qwen2Config) -> dict[str, tuple]:
    """The norms' weights (stored as float32 under their checkpoint names)."""
    names = ["model.norm.weight"]
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    return {name: (cfg.hidden_size,) for name in names}


def constants(cfg: Qwen2Config, backend, kv_ranges: dict | None = None) -> dict[str, np.ndarray]:
    """Tables computed rather than read: the backend's (GroupQueryAttention's RoPE cos/sin caches; the
    portable graphs compute theirs from the positions), and with an int8 KV cache each layer's per-channel
    scales [1, kv_heads, 1, head_dim]: the calibrated range of each cached channel / 127 (export/calibrate.py)."""
    out = backend.constants(cfg)
    for i in range(cfg.num_hidden_layers) if kv_ranges else ():
        for kv in ("k", "v"):
            r = kv_ranges[f"model.layers.{i}.self_attn.{kv}_range"]
            out[f"model.layers.{i}.self_attn.{kv}_scale"] = (r / 127).reshape(1, cfg.num_key_value_heads, 1,
                                                                                cfg.head_dim).astype(np.float32)
    return out


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) graph names of one layer's cache."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


def build(g: Graph, cfg: Qwen2Config, w: Store, seq: int | str) -> None:
    """Fill `g` with the whole model; `seq` is 1 for decode or a symbolic name for prefill.

    Decode returns logits [B, V] for its one position. Prefill takes `num_logits` (int64 [1], N) and returns
    logits [B, N, V] for the last N positions: 1 to start generating, the draft tokens + 1 to verify a
    speculative draft, S to score every position (evaluation). The lm_head runs on those N rows only.

    attention_mask [B, T] (T = past + S) marks the real tokens: each row's count of ones is its length, the
    new tokens of a row sit at its first free cache positions (right padding; a batch that decodes leaves
    holes in the mask, only the counts matter)."""
    input_ids = g.input("input_ids", INT64, ["batch", seq])
    attention_mask = g.input("attention_mask", INT64, ["batch", "total_sequence"])
    num_logits = None if seq == 1 else g.input("num_logits", INT64, [1])
    context = w.backend.attention_context(g, cfg, input_ids, attention_mask)  # once per graph
    long = None  # prefill="int8": whether this call's prompt takes the int8 path (export/prefill_int8.py)
    if seq != 1 and w.backend.prefill == "int8" and w.spec.quantized:
        long = prefill_int8.long_prompt(g, input_ids, w.backend.prefill_threshold)
    h = embedding(g, w, "model.embed_tokens", cfg.vocab_size, cfg.hidden_size, input_ids)
    delta = None  # the last block's output, added to the residual stream by the next norm
    for i in range(cfg.num_hidden_layers):
        with g.scope(f"layers.{i}"):
            h, delta = decoder_layer(g, cfg, w, i, h, delta, context, long)
    with g.scope("final"):
        x, _ = add_rms_norm(g, w, "model.norm", cfg, delta, h)
        if num_logits is None:
            x = g.op("Reshape", x, g.const([0, cfg.hidden_size], np.int64))  # [B, 1, H] -> [B, H]
        else:  # the last N positions: [B, S, H] -> [B, N, H]
            x = g.op("Slice", x, g.op("Neg", num_logits), g.const([np.iinfo(np.int64).max], np.int64),
                     g.const([1], np.int64))
        head = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
        if w.backend.elem == FLOAT:
            lm_head(g, w, head, cfg, x, out="logits")
        else:  # logits leave the graph as float32 (for the host's sampling), cast at the edge
            g.op("Cast", lm_head(g, w, head, cfg, x), to=FLOAT, out="logits")
    g.output("logits", FLOAT, ["batch", cfg.vocab_size] if num_logits is None
             else ["batch", "num_logits", cfg.vocab_size])


def rope_tables(cfg: Qwen2Config) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * inv_freq, [context_length, head_dim / 2] (YaRN-scaled when the config says
    so, export/rope.py), for GroupQueryAttention's fused non-interleaved (rotate_half) RoPE."""
    return rope.tables(cfg.head_dim, cfg.rope_theta, cfg.context_length, cfg.rope_scaling)


def decoder_layer(g: Graph, cfg: Qwen2Config, w: Store, i: int, h: str, delta: str | None,
                  context: tuple, long: str | None = None) -> tuple[str, str]:
    """Pre-norm residual block. The residual adds are folded into the norms: (h, delta) in, where the
    stream is h + delta (delta None for the first layer), (h', delta') out. `long`: see layers.linear."""
    p = f"model.layers.{i}"
    if delta is None:
        x = rms_norm(g, w, f"{p}.input_layernorm", cfg, h)
    else:
        x, h = add_rms_norm(g, w, f"{p}.input_layernorm", cfg, delta, h)
    with g.scope("attn"):
        a = attention(g, cfg, w, i, x, context, long)
    x, h = add_rms_norm(g, w, f"{p}.post_attention_layernorm", cfg, a, h)
    with g.scope("mlp"):
        return h, mlp(g, cfg, w, f"{p}.mlp", x, long)


def mlp(g: Graph, cfg: Qwen2Config, w: Store, p: str, x: str, long: str | None = None) -> str:
    """down_proj(silu(gate_proj(x)) * up_proj(x)), gate and up as one stacked matmul (prefill="int8": a long
    prompt's gate and up are two int8 matmuls, export/prefill_int8.py).

        x ──[gate; up]──► Split ─ gate ─► Sigmoid·Mul (SiLU) ──┐
                                └ up ───────────────────────► Mul ──down_proj──►
    """
    H, I = cfg.hidden_size, cfg.intermediate_size

    def stacked():
        gate_up = linear(g, w, f"{p}.gate_up_proj", x, 2 * I, H)
        return g.op_multi("Split", gate_up, n_out=2, axis=-1, num_outputs=2)

    if long is None or w.stored(f"{p}.gate_up_proj", "matmul").layout != "nbits":
        gate, up = stacked()
    else:  # prefill="int8": a long prompt multiplies by the int8 copies of gate and up, no Split
        gate, up = prefill_int8.switch(g, long, lambda: prefill_int8.gate_up(
            g, (f"{p}.gate_proj", f"{p}.up_proj"), x, H), stacked, n_out=2)
    silu = g.op("Mul", gate, g.op("Sigmoid", gate))
    return linear(g, w, f"{p}.down_proj", g.op("Mul", silu, up), H, I, long=long)


def attention(g: Graph, cfg: Qwen2Config, w: Store, i: int, x: str, context: tuple, long: str | None = None) -> str:
    """Grouped-query self-attention with RoPE and the KV cache, in com.microsoft GroupQueryAttention.

        x ──[q; k; v] (+ bias)──► GroupQueryAttention ──► o_proj
                 past_key_values.{i}.key|value ──┘  └──► present.{i}.key|value   [B, kv_heads, T, D]

    The op rotates q and k (positions from each row's length), appends k and v to the past, and attends
    causally; each KV head serves num_heads / kv_heads query heads without repeating them. With ops
    "portable" the same in standard ops (export/portable.py), present = [past; new].
    """
    p = f"model.layers.{i}.self_attn"
    nh, kvh, D, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    past_k, past_v, present_k, present_v = kv_names(i)
    qkv = linear(g, w, f"{p}.qkv_proj", x, (nh + 2 * kvh) * D, H, bias=True, long=long)
    cache = INT8 if w.kv_cache == "int8" else w.backend.elem
    for name in (past_k, past_v):
        g.input(name, cache, ["batch", kvh, "past_sequence", D])
    scales = (g.weight(f"{p}.k_scale"), g.weight(f"{p}.v_scale")) if w.kv_cache == "int8" else None
    y = w.backend.attention(g, cfg, qkv, kv_names(i), context, scales)
    for name in (present_k, present_v):
        g.output(name, cache, ["batch", kvh, "total_sequence", D])
    return linear(g, w, f"{p}.o_proj", y, H, nh * D, long=long)
