"""Activation statistics for calibrated quantization: the mean square of every input channel of every
matrix, from the float model run over calibration text (llama.cpp calls this the importance matrix).

The model runs layer by layer in numpy, a few calibration sequences at a time, so only one layer's float
weights and a bounded slice of activations are in memory at once. A channel that carries large activations
makes its weight column's rounding error cost more at the output; `quantize(..., method="calibrated")` weighs the error that way.

`sequential_pass` (--method compensated) runs the same model with each matrix quantized as soon as the
Gram matrix of its input is known, GPTQ's "true sequential" order (export/compensate.py).
"""
from importlib import resources

import numpy as np

from export import rope as rope_module
from toolkit.errors import ArgumentError

DEFAULT_TEXT = "calibration.txt"  # ships with the package: see export/data/README.md


def default_text() -> str:
    return resources.files("export").joinpath("data", DEFAULT_TEXT).read_text(encoding="utf-8")


def token_batches(tokenizer_json, text: str, seq_len: int = 256, max_sequences: int = 32) -> np.ndarray:
    """Calibration token ids [n_sequences, seq_len]: consecutive slices of the tokenized text."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids
    n = min(len(ids) // seq_len, max_sequences)
    if n < 1:
        raise ArgumentError(f"--calibration text: {len(ids)} tokens; expected at least {seq_len}")
    return np.array(ids[:n * seq_len], dtype=np.int64).reshape(n, seq_len)


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps) * weight


def rope_tables(seq_len: int, cfg):
    """Full-width cos and sin [S, D] (each half repeated) for `rope`, YaRN-scaled if the config says so."""
    cos, sin = rope_module.tables(cfg.head_dim, cfg.rope_theta, seq_len, cfg.rope_scaling)
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)  # float32: float64 halves speed


def rope(x, cos, sin):  # x [B, n, S, D]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(x, get, p, cfg, cos, sin, record_kv=None):
    """Causal grouped-query attention of one layer (no cache); returns the input of o_proj [B, S, nh*D].
    `record_kv(k, v)` sees the keys (before RoPE) and values [B, kv_heads, S, D]."""
    B, S, H = x.shape
    nh, kvh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def proj(name, n):
        y = x @ get(f"{p}.{name}.weight", (n * D, H)).T + get(f"{p}.{name}.bias", (n * D,))
        return y.reshape(B, S, n, D).transpose(0, 2, 1, 3)

    k, v = proj("k_proj", kvh), proj("v_proj", kvh)
    if record_kv:
        record_kv(k, v)
    q, k = rope(proj("q_proj", nh), cos, sin), rope(k, cos, sin)
    q = q.reshape(B, kvh, nh // kvh * S, D) / np.sqrt(D)
    scores = q @ k.transpose(0, 1, 3, 2)  # [B, kvh, rep*S, S]
    causal = np.tile(np.triu(np.full((S, S), -np.inf, dtype=np.float32), 1), (nh // kvh, 1))
    scores = scores + causal
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    y = (probs @ v).reshape(B, nh, S, D).transpose(0, 2, 1, 3)
    return y.reshape(B, S, nh * D)


CHUNK_SEQUENCES = 4  # calibration sequences through a layer at once: bounds the activations (7B MLP: 78 MB)


def layer_weights(get, cfg, p: str) -> dict:
    """Every tensor of decoder layer `p` in float32: the only layer in memory (a 7B layer: 0.9 GB)."""
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"self_attn.q_proj": (nh * D, H), "self_attn.k_proj": (kvh * D, H), "self_attn.v_proj": (kvh * D, H),
              "self_attn.o_proj": (H, nh * D), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H),
              "mlp.down_proj": (H, I)}
    out = {f"{p}.{name}.weight": get(f"{p}.{name}.weight", shape) for name, shape in shapes.items()}
    for name in ("q_proj", "k_proj", "v_proj"):
        out[f"{p}.self_attn.{name}.bias"] = get(f"{p}.self_attn.{name}.bias", (shapes[f"self_attn.{name}"][0],))
    for name in ("input_layernorm", "post_attention_layernorm"):
        out[f"{p}.{name}.weight"] = get(f"{p}.{name}.weight", (H,))
    return out


def decoder_layer(h, w: dict, cfg, p: str, cos, sin, record, record_kv=None) -> np.ndarray:
    """One layer of the float model on hidden states h [B, S, H]; `record(names, x)` sees each matmul input,
    `record_kv(k, v)` the layer's keys (before RoPE) and values."""
    x = rms_norm(h, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
    record([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], x)
    a = attention(x, lambda name, shape: w[name], f"{p}.self_attn", cfg, cos, sin, record_kv)
    record([f"{p}.self_attn.o_proj"], a)
    h = h + a @ w[f"{p}.self_attn.o_proj.weight"].T
    x = rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
    record([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], x)
    m = x @ w[f"{p}.mlp.gate_proj.weight"].T
    m /= 1 + np.exp(-m)  # SiLU, in place
    m *= x @ w[f"{p}.mlp.up_proj.weight"].T
    record([f"{p}.mlp.down_proj"], m)
    return h + m @ w[f"{p}.mlp.down_proj.weight"].T


def activation_stats(ckpt, cfg, tokens: np.ndarray, progress=None) -> dict:
    """{checkpoint matrix name (without .weight): mean square of its input per channel, float32 [K]}.

    Layer by layer: one layer's weights in float32, the sequences through it CHUNK_SEQUENCES at a time
    (attention never crosses sequences), the hidden states of all of them kept between layers."""
    get = ckpt.tensor
    H = cfg.hidden_size
    sums: dict[str, np.ndarray] = {}
    kv_range: dict[str, np.ndarray] = {}  # KV-cache scales, see kv_cache_scales

    def record(names, x):
        x = x.reshape(-1, x.shape[-1])
        ss = np.einsum("ij,ij->j", x, x, dtype=np.float64)  # float64 sums, no float64 copy of x
        for name in names:
            sums[name] = sums.get(name, 0.0) + ss

    ids, where = np.unique(tokens, return_inverse=True)  # only the rows the text uses, not the whole table
    h = get("model.embed_tokens.weight", (cfg.vocab_size, H), ids)[where.reshape(tokens.shape)]  # [B, S, H]
    cos, sin = rope_tables(tokens.shape[1], cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        w = layer_weights(get, cfg, p)
        for s in range(0, len(h), CHUNK_SEQUENCES):
            h[s:s + CHUNK_SEQUENCES] = decoder_layer(h[s:s + CHUNK_SEQUENCES], w, cfg, p, cos, sin, record,
                                                     lambda k, v: kv_ranges(kv_range, p, k, v))
        del w
        if progress:
            progress(i + 1, cfg.num_hidden_layers)
    final = rms_norm(h, get("model.norm.weight", (H,)), cfg.rms_norm_eps)
    record(["lm_head", "model.embed_tokens"] if cfg.tie_word_embeddings else ["lm_head"], final)
    stats = {name: (ss / tokens.size).astype(np.float32) for name, ss in sums.items()}
    return stats | {name: np.maximum(r, 1e-6).astype(np.float32) for name, r in kv_range.items()}


def kv_ranges(out: dict, p: str, k: np.ndarray, v: np.ndarray) -> None:
    """The largest magnitude each cached channel of layer `p` may take, for an int8 KV cache's per-channel
    scales (range / 127), over [B, kv_heads, S, D] keys before RoPE and values. RoPE rotates key channels
    c and c + D/2 together by a position-dependent angle, so a key channel's range after RoPE is the pair's
    norm sqrt(k_c² + k_{c+D/2}²), whatever the position: both channels of a pair get it. Values: max |v|."""
    half = k.shape[-1] // 2
    pair = np.sqrt(np.square(k[..., :half]) + np.square(k[..., half:])).max(axis=(0, 2))  # [kv_heads, D/2]
    ranges = {f"{p}.self_attn.k_range": np.concatenate([pair, pair], axis=-1),
              f"{p}.self_attn.v_range": np.abs(v).max(axis=(0, 2))}
    for name, r in ranges.items():
        out[name] = np.maximum(out[name], r) if name in out else r


GRAM_BLOCK = 1024  # wider inputs get H's lower triangle block by block (~60 % of the products), then mirrored


def gram(xs) -> np.ndarray:
    """H = Σ xᵀx [K, K] in float64 over activation chunks x [..., K], each product taken in float32."""
    h = None
    for x in xs:
        x = x.reshape(-1, x.shape[-1])
        k = x.shape[1]
        if h is None:
            h = np.zeros((k, k), np.float64)
        if k <= 2 * GRAM_BLOCK:
            h += x.T @ x
            continue
        for j in range(0, k, GRAM_BLOCK):
            h[j:, j:j + GRAM_BLOCK] += x[:, j:].T @ x[:, j:j + GRAM_BLOCK]
    if h is not None and len(h) > 2 * GRAM_BLOCK:  # the blocks below the diagonal mirrored above it
        for j in range(0, len(h), GRAM_BLOCK):  # (no index arrays: a whole triangle's would take 16 B/element)
            h[j:j + GRAM_BLOCK, j + GRAM_BLOCK:] = h[j + GRAM_BLOCK:, j:j + GRAM_BLOCK].T
    return h


def sequential_pass(ckpt, cfg, tokens: np.ndarray, quantize, progress=None) -> dict:
    """The float model over the calibration tokens with each matrix quantized as soon as its input is known
    ("true sequential", as GPTQ runs): `quantize(parts, h, weights, n_tokens)` gets the checkpoint names of
    the matrices that read one input, that input's Gram matrix H = Σ xᵀx (float64 [K, K]) and the layer's
    float32 weights, and replaces those matrices' weights in the dict with their dequantized values. So
    per layer: q/k/v from the normed input; o_proj from the attention of the quantized q/k/v; gate/up from
    the normed residual after the quantized attention; down_proj from the MLP's inner activations; then
    the layer's output with all its quantized weights is the next layer's input. Last the lm_head (weights
    None: `quantize` reads them) with H of the final normed hidden states.

    One layer's weights and Gram matrices in memory at a time, the sequences through it CHUNK_SEQUENCES at
    a time; the hidden states of all sequences are kept (and updated in place) between stages, and the
    attention outputs of all (the same size) from o_proj's H until the residual step. Returns
    the KV cache's channel ranges of the quantized model (see kv_ranges)."""
    get = ckpt.tensor
    H, eps, count = cfg.hidden_size, cfg.rms_norm_eps, int(tokens.size)
    kv_range: dict[str, np.ndarray] = {}
    ids, where = np.unique(tokens, return_inverse=True)
    h = get("model.embed_tokens.weight", (cfg.vocab_size, H), ids)[where.reshape(tokens.shape)]  # [B, S, H]
    cos, sin = rope_tables(tokens.shape[1], cfg)
    chunks = [slice(s, s + CHUNK_SEQUENCES) for s in range(0, len(h), CHUNK_SEQUENCES)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        att, mlp = f"{p}.self_attn", f"{p}.mlp"
        w = layer_weights(get, cfg, p)

        def norm1(x):
            return rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)

        def norm2(x):
            return rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)

        def attn(s, record_kv=None):
            return attention(norm1(h[s]), lambda name, shape: w[name], att, cfg, cos, sin, record_kv)

        def inner(x):  # the MLP's activations before down_proj
            m = x @ w[f"{mlp}.gate_proj.weight"].T
            m /= 1 + np.exp(-m)
            m *= x @ w[f"{mlp}.up_proj.weight"].T
            return m

        quantize([f"{att}.{n}" for n in ("q_proj", "k_proj", "v_proj")], gram(norm1(h[s]) for s in chunks), w, count)

        def attentions():  # kept for the residual step: the size of h
            for s in chunks:
                a[s] = attn(s, lambda k, v: kv_ranges(kv_range, p, k, v))
                yield a[s]

        a = np.empty((*h.shape[:2], cfg.num_attention_heads * cfg.head_dim), np.float32)
        quantize([f"{att}.o_proj"], gram(attentions()), w, count)

        def after_attention():
            for s in chunks:
                h[s] += a[s] @ w[f"{att}.o_proj.weight"].T
                yield norm2(h[s])

        quantize([f"{mlp}.gate_proj", f"{mlp}.up_proj"], gram(after_attention()), w, count)
        a = None
        quantize([f"{mlp}.down_proj"], gram(inner(norm2(h[s])) for s in chunks), w, count)
        for s in chunks:
            h[s] += inner(norm2(h[s])) @ w[f"{mlp}.down_proj.weight"].T
        w = None  # before the next layer's are read
        if progress:
            progress(i + 1, cfg.num_hidden_layers)
    final = (rms_norm(h[s], get("model.norm.weight", (H,)), eps) for s in chunks)
    quantize(["model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"], gram(final), None, count)
    return {name: np.maximum(r, 1e-6).astype(np.float32) for name, r in kv_range.items()}
