"""Pre-quantized GPTQ / AWQ checkpoints for tests, packed as AutoGPTQ / gptqmodel / AutoAWQ write them.

From a tiny float checkpoint (tests/tiny.py, one safetensors file), every q/k/v/o/gate/up/down projection
gets known random integer codes, float16 scales and zero points; the folder holds them in the published
layout (qweight, qzeros, scales, g_idx) with the float tensors (embedding, lm_head, norms, biases) in
float16 and a config.json with a quantization_config as Qwen's GPTQ-Int4 / AWQ releases carry. A second
folder holds the same model dequantized to float32, W = (q - zero) * scale exactly (a float16 scale times
a small integer is exact in float32), for transformers' Qwen2ForCausalLM to be the oracle.

The packers are written here from the published layouts, independently of export/prequantized.py:
    GPTQ qweight  [K/p, N]  element j of word [r, n] = q[n, p*r + j], in bits b*j.. (p = 32/b)
    GPTQ qzeros   [G, N/p]  element j of word [g, c] = zero[g, p*c + j]; v1 stores the word minus
                            0x11111111 (gptqmodel's v2 -> v1 save: a zero of 0 borrows from the next)
    AWQ  qweight  [K, N/8]  nibble i of word [k, c] = q[8c + AWQ_ORDER[i], k]
    AWQ  qzeros   [G, N/8]  nibble i of word [g, c] = zero[g, 8c + AWQ_ORDER[i]]
"""
import json
import shutil
from pathlib import Path

import numpy as np

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
KNOWN_FILE = "known.npz"


def pack_along_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint [R, C] -> int32 [R*bits/32, C]: element j of word [r, c] is codes[p*r + j, c] (GPTQ qweight,
    given the codes as [K, N])."""
    p = 32 // bits
    grouped = codes.astype(np.uint64).reshape(codes.shape[0] // p, p, codes.shape[1])
    words = sum(grouped[:, j, :] << np.uint64(bits * j) for j in range(p))
    return np.ascontiguousarray(words, dtype=np.uint32).view(np.int32)


def pack_along_columns(codes: np.ndarray, bits: int, order=None) -> np.ndarray:
    """uint [R, C] -> int32 [R, C*bits/32]: slot i of word [r, c] is codes[r, p*c + order[i]] (order: 0, 1, …
    for GPTQ qzeros, AWQ_ORDER for AWQ)."""
    p = 32 // bits
    order = range(p) if order is None else order
    grouped = codes.astype(np.uint64).reshape(codes.shape[0], codes.shape[1] // p, p)
    words = sum(grouped[:, :, o] << np.uint64(bits * i) for i, o in enumerate(order))
    return np.ascontiguousarray(words, dtype=np.uint32).view(np.int32)


def gptq_v1_words(words: np.ndarray, bits: int) -> np.ndarray:
    """True-zero words -> GPTQ v1 storage: minus 1 in each element as one 32-bit subtraction (modulo 2^32)."""
    step = sum(1 << (bits * j) for j in range(32 // bits))
    return ((words.view(np.uint32).astype(np.int64) - step) % (1 << 32)).astype(np.uint32).view(np.int32)


def choose_integers(rng, w: np.ndarray, bits: int, group_size: int, sym: bool, act_order: bool) -> dict:
    """Known codes q [N, K], float16 scales [G, N] sized from the float weight's groups, zero points [G, N]
    (2^(bits-1) when symmetric; random, with 0 and the largest code included, when not) and g_idx [K]
    (a random act-order permutation when `act_order`)."""
    n, k = w.shape
    group = k if group_size == -1 else group_size
    levels = 1 << bits
    codes = rng.integers(0, levels, size=(n, k), dtype=np.uint8)
    amax = np.abs(w).reshape(n, k // group, group).max(axis=-1).T  # [G, N]
    scales = np.maximum(amax / (levels / 2 - 0.5), 1e-3).astype(np.float16)
    if sym:
        zeros = np.full(scales.shape, levels // 2, dtype=np.uint8)
    else:
        zeros = rng.integers(0, levels, size=scales.shape, dtype=np.uint8)
        zeros[0, :2] = (0, levels - 1)
    g_idx = np.arange(k, dtype=np.int32) // group
    if act_order:
        perm = rng.permutation(k)
        g_idx[perm] = np.arange(k, dtype=np.int32) // group
    return {"codes": codes, "scales": scales, "zeros": zeros, "g_idx": g_idx}


def dequantize(known: dict) -> np.ndarray:
    """W [N, K] float32 = (q - zero[g_idx]) * scale[g_idx]."""
    g = known["g_idx"]
    zeros = known["zeros"][g].T.astype(np.float32)  # [N, K]
    scales = known["scales"][g].T.astype(np.float32)
    return (known["codes"].astype(np.float32) - zeros) * scales


def packed_tensors(prefix: str, known: dict, method: str, bits: int, checkpoint_format: str) -> dict:
    """The tensors of Linear `prefix` as the quantizer libraries save them."""
    if method == "awq":
        return {f"{prefix}.qweight": pack_along_columns(known["codes"].T, 4, AWQ_ORDER),
                f"{prefix}.qzeros": pack_along_columns(known["zeros"], 4, AWQ_ORDER),
                f"{prefix}.scales": known["scales"]}
    qzeros = pack_along_columns(known["zeros"], bits)
    if checkpoint_format == "gptq":
        qzeros = gptq_v1_words(qzeros, bits)
    return {f"{prefix}.qweight": pack_along_rows(known["codes"].T, bits), f"{prefix}.qzeros": qzeros,
            f"{prefix}.scales": known["scales"], f"{prefix}.g_idx": known["g_idx"]}


def quantization_config(method: str, bits: int, group_size: int, sym: bool, checkpoint_format: str,
                        desc_act: bool, static_groups: bool) -> dict:
    """The quantization_config of config.json, with the fields Qwen's GPTQ-Int4 / AWQ releases use."""
    if method == "awq":
        return {"bits": bits, "group_size": group_size, "modules_to_not_convert": None, "quant_method": "awq",
                "version": "gemm", "zero_point": True}
    return {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act,
            "static_groups": static_groups, "sym": sym, "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": checkpoint_format}


def read_float_tensors(base_folder: Path) -> dict:
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(base_folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    for name, t in tensors.items():
        if t.dtype not in (np.float32, np.float16):
            raise ValueError(f"{base_folder}: {name} is {t.dtype}; make the base checkpoint with dtype float32")
    return tensors


def contiguous(tensors: dict) -> dict:
    """safetensors' numpy API writes an array's memory as is: C order first."""
    return {name: np.ascontiguousarray(t) for name, t in tensors.items()}


def write_folder(dest: Path, base_folder: Path, config: dict, tensors: dict) -> Path:
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    for f in base_folder.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                          "model.safetensors.index.json"):
            shutil.copyfile(f, dest / f.name)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    save_file(contiguous(tensors), str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def make_prequantized_checkpoint(folder: Path, base_folder: Path, method: str, sym: bool = True,
                                 group_size: int = 32, checkpoint_format: str = "gptq", desc_act: bool = False,
                                 seed: int = 0, static_groups: bool = False, bits: int = 4) -> tuple[Path, Path]:
    """Write `folder`/quantized (GPTQ or AWQ, as published) and `folder`/dequantized (float32, the oracle's)
    from the float checkpoint `base_folder`; return both. AWQ is always asymmetric 4-bit GEMM (`sym`,
    `checkpoint_format`, `desc_act` are GPTQ's). desc_act without static_groups writes an act-order g_idx.
    The chosen integers are kept in `folder`/known.npz (see `known_integers`)."""
    if method not in ("gptq", "awq") or (method == "awq" and bits != 4):
        raise ValueError(f"method {method!r} bits {bits}: expected gptq (4 or 8 bits) or awq (4 bits)")
    folder, base_folder = Path(folder), Path(base_folder)
    rng = np.random.default_rng(seed)
    base = json.loads((base_folder / "config.json").read_text())
    floats = read_float_tensors(base_folder)
    quantized, dequantized, known_all = {}, {}, {}
    for name in sorted(floats):
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.split(".", 3)[-1] in PROJECTIONS:
            known = choose_integers(rng, floats[name].astype(np.float32), bits, group_size,
                                    sym and method == "gptq", desc_act and not static_groups and method == "gptq")
            quantized.update(packed_tensors(prefix, known, method, bits, checkpoint_format))
            dequantized[name] = dequantize(known)
            known_all.update({f"{prefix}|{key}": value for key, value in known.items()})
        else:  # stored float16, as in the published checkpoints; the oracle gets the same values in float32
            quantized[name] = floats[name].astype(np.float16)
            dequantized[name] = quantized[name].astype(np.float32)
    qc = quantization_config(method, bits, group_size, sym and method == "gptq", checkpoint_format, desc_act,
                             static_groups)
    q_folder = write_folder(folder / "quantized", base_folder,
                            base | {"torch_dtype": "float16", "quantization_config": qc}, quantized)
    d_folder = write_folder(folder / "dequantized", base_folder, base | {"torch_dtype": "float32"}, dequantized)
    np.savez(folder / KNOWN_FILE, **known_all)
    return q_folder, d_folder


def known_integers(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """The integers `make_prequantized_checkpoint(folder, …)` chose: {linear prefix: {"codes" [N, K],
    "scales" float16 [G, N], "zeros" (true zero points) [G, N], "g_idx" [K]}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(Path(folder) / KNOWN_FILE) as data:
        for key in data.files:
            prefix, field = key.split("|")
            out.setdefault(prefix, {})[field] = data[key]
    return out
