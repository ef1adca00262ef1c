"""Qwen2 (Qwen2, Qwen2.5, Qwen2.5-Coder) as ONNX: the config and one function per block.

    h   = embed(input_ids)                                    [B, S, H]
    for each layer:
        h = h + o_proj(attention(rms_norm(h)))                 RoPE, grouped-query attention, KV cache
        h = h + down(silu(gate(rms_norm(h))) * up(rms_norm(h)))
    logits = lm_head(rms_norm(h[:, -1]))                      [B, V], the last position only

Reference semantics: transformers' modeling_qwen2 (RMSNorm in float32, non-interleaved rotate_half RoPE,
bias on q/k/v only). The same function builds the prefill graph (S dynamic) and the decode graph (S = 1).
"""
import math
from dataclasses import dataclass, fields

import numpy as np

from export.layers import Weights, embedding, linear, lm_head, rms_norm
from export.onnx_builder import BOOL, FLOAT, INT64, Graph
from toolkit.errors import ModelFolderError


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

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Qwen2Config":
        if d.get("model_type") != "qwen2":
            raise ModelFolderError(f"{source}: model_type {d.get('model_type')!r} is not supported; expected 'qwen2'")
        scaling = d.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ModelFolderError(f"{source}: rope_scaling {scaling} is not supported yet; expected null")
        if d.get("use_sliding_window"):
            raise ModelFolderError(f"{source}: use_sliding_window=true is not supported yet; expected false")
        names = {f.name for f in fields(cls)}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "rms_norm_eps"):
            if not isinstance(d.get(name), (int, float)):
                raise ModelFolderError(f"{source}: expected a number for {name!r}")
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        if not kw.get("head_dim"):
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        cfg = cls(**kw)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ModelFolderError(f"{source}: num_attention_heads {cfg.num_attention_heads} is not a multiple "
                                   f"of num_key_value_heads {cfg.num_key_value_heads}")
        return cfg


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


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) graph names of one layer's cache."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


def build(g: Graph, cfg: Qwen2Config, w: Weights, seq: int | str) -> None:
    """Fill `g` with the whole model; `seq` is 1 for decode or a symbolic name for prefill.

    Decode returns logits [B, V] for its one position. Prefill takes `num_logits` (int64 [1], N) and returns
    logits [B, N, V] for the last N positions: 1 to start generating, the draft tokens + 1 to verify a
    speculative draft, S to score every position (evaluation). The lm_head runs on those N rows only."""
    input_ids = g.input("input_ids", INT64, ["batch", seq])
    attention_mask = g.input("attention_mask", INT64, ["batch", "total_sequence"])
    num_logits = None if seq == 1 else g.input("num_logits", INT64, [1])
    cos, sin, mask = attention_inputs(g, cfg, input_ids, attention_mask)
    h = embedding(g, w, "model.embed_tokens", cfg.vocab_size, cfg.hidden_size, input_ids)
    for i in range(cfg.num_hidden_layers):
        with g.scope(f"layers.{i}"):
            h = decoder_layer(g, cfg, w, i, h, cos, sin, mask)
    with g.scope("final"):
        if num_logits is None:
            h = g.op("Reshape", h, g.const([0, cfg.hidden_size], np.int64))  # [B, 1, H] -> [B, H]
        else:  # the last N positions: [B, S, H] -> [B, N, H]
            h = g.op("Slice", h, g.op("Neg", num_logits), g.const([np.iinfo(np.int64).max], np.int64),
                     g.const([1], np.int64))
        lm_head(g, w, cfg, rms_norm(g, w, "model.norm", cfg, h), out="logits")
    g.output("logits", FLOAT, ["batch", cfg.vocab_size] if num_logits is None
             else ["batch", "num_logits", cfg.vocab_size])


def attention_inputs(g: Graph, cfg: Qwen2Config, input_ids: str, attention_mask: str):
    """RoPE tables [B, 1, S, D] and the additive attention mask [B, 1, rep*S, T], made once per graph.

    Positions count only the real tokens (cumsum of attention_mask - 1), so left padding shifts nothing.
    """
    with g.scope("rope"):
        total = g.op("Shape", attention_mask, start=1, end=2)  # [1] = T
        seq = g.op("Shape", input_ids, start=1, end=2)  # [1] = S
        past = g.op("Sub", total, seq)
        pos = g.op("Sub", g.op("CumSum", attention_mask, g.const(1, np.int64)), g.const(1, np.int64))
        pos = g.op("Slice", pos, past, total, g.const([1], np.int64))  # [B, S]
        inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.int64) / cfg.head_dim)
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=FLOAT), g.const([-1], np.int64)),
                     g.const(inv_freq.astype(np.float32)))  # [B, S, D/2]
        emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1], np.int64))
        cos, sin = g.op("Cos", emb), g.op("Sin", emb)
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


def decoder_layer(g: Graph, cfg: Qwen2Config, w: Weights, i: int, h: str, cos: str, sin: str, mask: str) -> str:
    """Pre-norm residual block: attention, then the SiLU-gated MLP."""
    p = f"model.layers.{i}"
    x = rms_norm(g, w, f"{p}.input_layernorm", cfg, h)
    with g.scope("attn"):
        h = g.op("Add", h, attention(g, cfg, w, i, x, cos, sin, mask))
    x = rms_norm(g, w, f"{p}.post_attention_layernorm", cfg, h)
    with g.scope("mlp"):
        return g.op("Add", h, mlp(g, cfg, w, f"{p}.mlp", x))


def mlp(g: Graph, cfg: Qwen2Config, w: Weights, p: str, x: str) -> str:
    """down_proj(silu(gate_proj(x)) * up_proj(x))

        x ──gate_proj──► Sigmoid·Mul (SiLU) ──┐
        x ──up_proj────────────────────────► Mul ──down_proj──►
    """
    H, I = cfg.hidden_size, cfg.intermediate_size
    gate = linear(g, w, f"{p}.gate_proj", x, I, H)
    up = linear(g, w, f"{p}.up_proj", x, I, H)
    silu = g.op("Mul", gate, g.op("Sigmoid", gate))
    return linear(g, w, f"{p}.down_proj", g.op("Mul", silu, up), H, I)


def attention(g: Graph, cfg: Qwen2Config, w: Weights, i: int, x: str, cos: str, sin: str, mask: str) -> str:
    """Grouped-query self-attention over [past KV ; new KV], written back as present.{i}.key|value.

        x ─q_proj─► [B,S,nh,D] ─► [B,nh,S,D] ─RoPE─► [B,kvh,rep*S,D] ──┐
        x ─k_proj─► [B,kvh,S,D] ─RoPE─► Concat(past) = present.key ──► Q·Kᵀ/√D + mask ─► Softmax ─┐
        x ─v_proj─► [B,kvh,S,D] ──────► Concat(past) = present.value ─────────────────────────► ·V ─► o_proj

    Each KV head serves `rep` query heads; folding those heads into the row axis of Q lets one MatMul per
    KV head do the work without materialising repeated keys.
    """
    p = f"model.layers.{i}.self_attn"
    nh, kvh, D, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    past_k, past_v, present_k, present_v = kv_names(i)

    def heads(name: str, n: int) -> str:  # [B, S, n*D] -> [B, n, S, D]
        y = linear(g, w, f"{p}.{name}", x, n * D, H, bias=True)
        return g.op("Transpose", g.op("Reshape", y, g.const([0, 0, n, D], np.int64)), perm=[0, 2, 1, 3])

    q = rope(g, heads("q_proj", nh), cos, sin)
    k = rope(g, heads("k_proj", kvh), cos, sin)
    v = heads("v_proj", kvh)
    for name in (past_k, past_v):
        g.input(name, FLOAT, ["batch", kvh, "past_sequence", D])
    k = g.op("Concat", past_k, k, axis=2, out=present_k)  # [B, kvh, T, D]
    v = g.op("Concat", past_v, v, axis=2, out=present_v)
    for name in (present_k, present_v):
        g.output(name, FLOAT, ["batch", kvh, "total_sequence", D])

    q = g.op("Reshape", g.op("Mul", q, g.const(1.0 / math.sqrt(D), np.float32)),
             g.const([0, kvh, -1, D], np.int64))  # [B, kvh, rep*S, D]
    scores = g.op("Add", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), mask)  # [B, kvh, rep*S, T]
    y = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, kvh, rep*S, D]
    y = g.op("Transpose", g.op("Reshape", y, g.const([0, nh, -1, D], np.int64)), perm=[0, 2, 1, 3])
    y = g.op("Reshape", y, g.const([0, 0, nh * D], np.int64))  # [B, S, nh*D]
    return linear(g, w, f"{p}.o_proj", y, H, nh * D)


def rope(g: Graph, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin, with rotate_half([a, b]) = [-b, a] on the last axis."""
    a, b = g.op_multi("Split", x, n_out=2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", g.op("Neg", b), a, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))
