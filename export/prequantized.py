"""Checkpoints that are already quantized (GPTQ, AWQ): their integers and scales moved bit for bit into
MatMulNBits' layout, never requantized.

A Linear's weight is W [N, K] (out_features, in_features). Both formats store b-bit codes q, and per group
of `group_size` consecutive inputs and per output a float16 scale and an integer zero point:

    W[n, k] = (q[n, k] - zero[g(k), n]) * scale[g(k), n]        g(k) = k // group_size, G = K / group_size

GPTQ (AutoGPTQ, gptqmodel; quant_method "gptq"), b = 4 or 8, p = 32 / b codes per int32, element j of a
word in bits b*j .. b*j+b-1 (4-bit: word = q7 q6 q5 q4 q3 q2 q1 q0, one hex digit each):

    qweight  int32 [K/p, N]   packed along the INPUT dim: word [r, n] holds q[n, p*r + j]
    qzeros   int32 [G, N/p]   packed along the OUTPUT dim: word [g, c] holds zero[g, p*c + j]
    scales   fp16  [G, N]
    g_idx    int32 [K]        group of each input: k // group_size unless act-order (desc_act) permutes it
    bias     fp16  [N]        (q/k/v only, as in the float model: read it like any float tensor)

    checkpoint_format "gptq" (v1, also when absent) stores zero - 1; "gptq_v2" stores the zero itself.

AWQ (AutoAWQ GEMM; quant_method "awq", version "gemm"), 4-bit, zero_point true (asymmetric):

    qweight  int32 [K, N/8]   packed along the OUTPUT dim, interleaved: nibble i of word [k, c] holds
                              q[8c + AWQ_ORDER[i], k], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros   int32 [G, N/8]   zero[g, 8c + AWQ_ORDER[i]] in nibble i
    scales   fp16  [G, N]

MatMulNBits (com.microsoft; export/quantize.py's QuantizedWeight), block = the MatMulNBits block_size:

    B            uint8   [N, K/block, block*b/8]    4-bit: q[n, 2i] in the low nibble, q[n, 2i+1] in the high
    scales       float32 [N, K/block]               float16 -> float32 is exact
    zero_points  uint8   [N, ceil(K/block*b/8)]     4-bit: two per byte, low nibble first; absent: 2^(b-1)

A GPTQ word read as its 4 little-endian bytes is already 4 bytes of a B row (byte j = codes 2j, 2j+1, low
nibble first; 8-bit: byte j = code j), so GPTQ's qweight becomes B by a byte transpose, no arithmetic.
AWQ's codes are unpacked, de-interleaved, transposed and repacked.

Decisions, each keeping the weights bit-exact:
- Zero points are left out (MatMulNBits' implicit 2^(b-1)) exactly when every zero point of the matrix
  equals 2^(b-1), whatever `sym` says (a symmetric GPTQ stores 7 = 8 - 1 everywhere); otherwise explicit.
- GPTQ v1 zeros are read as gptqmodel reads them (convert_gptq_v1_to_v2_format, what transformers loads
  through): the whole int32 word plus 0x11111111 (8-bit: 0x01010101), modulo 2^32. That is the exact inverse
  of gptqmodel's v2 -> v1 save, where a true zero of 0 is stored as 15 and borrows from the next element.
  Below 15 it is simply stored + 1; at 15 the kernels disagree (AutoGPTQ's CUDA kernels read 16, which no
  4-bit code can hold; its Triton kernel and onnxruntime-genai read 0 without the carry).
- Group sizes above 256 and -1 (one group over all of K) become MatMulNBits blocks of the largest power of
  two up to 128 that divides them, each block repeating its group's scale and zero point (exact).
- act-order: a g_idx other than k // group_size (desc_act without static_groups) cannot be expressed by
  MatMulNBits' contiguous blocks without permuting the activations, so it is refused, naming the tensor.
- GPTQ 8-bit is supported (MatMulNBits bits=8); other widths, and AWQ other than 4-bit GEMM, are refused.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.checkpoint import read_json
from export.quantize import QuantizedWeight, pack_nibbles
from toolkit.errors import ModelFolderError

METHODS = ("gptq", "awq")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> offset added to every stored zero point
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds element AWQ_ORDER[i] of its 8
MAX_BLOCK = 256  # the largest MatMulNBits block_size used as is; larger groups are split into blocks of 128


@dataclass(frozen=True)
class PrequantizedFormat:
    """How a pre-quantized checkpoint stores its Linears, read from config.json's quantization_config."""

    method: str  # "gptq" or "awq"
    bits: int  # 4 (GPTQ also 8)
    group_size: int  # as stored: a power of two >= 16, or -1 for one group over all of K
    symmetric: bool  # what the config says; the stored zero points decide whether zero_points are explicit
    zero_offset: int  # added to each stored zero point: 1 for GPTQ v1 ("gptq"), 0 for "gptq_v2" and AWQ
    source: str  # the config file, for messages

    @classmethod
    def from_config(cls, config: dict, source: str) -> "PrequantizedFormat | None":
        """The format config.json's `quantization_config` describes; None when there is none (a float
        checkpoint). Anything this module cannot import bit-exactly raises a one-line ModelFolderError."""
        qc = config.get("quantization_config")
        if qc is None:
            return None
        if not isinstance(qc, dict):
            raise ModelFolderError(f"{source}: quantization_config is a {type(qc).__name__}; expected an object")
        return cls.from_quantization_config(qc, source, "quantization_config.")

    @classmethod
    def from_folder(cls, folder: Path, config: dict) -> "PrequantizedFormat | None":
        """As `from_config` on `folder`'s config.json, falling back to AutoGPTQ's side file
        quantize_config.json (older GPTQ folders; it has no quant_method, GPTQ being implied)."""
        folder = Path(folder)
        found = cls.from_config(config, str(folder / "config.json"))
        side = folder / "quantize_config.json"
        if found is not None or not side.exists():
            return found
        return cls.from_quantization_config({"quant_method": "gptq"} | read_json(side), str(side), "")

    @classmethod
    def from_quantization_config(cls, qc: dict, source: str, where: str = "") -> "PrequantizedFormat":
        """The format of one quantization_config object; `where` prefixes field names in messages."""
        method = str(qc.get("quant_method", "")).lower()
        if method not in METHODS:
            raise ModelFolderError(f"{source}: {where}quant_method {qc.get('quant_method')!r} is not supported; "
                                   f"expected 'gptq' or 'awq' (or a float checkpoint)")
        bits = qc.get("bits", qc.get("w_bit"))
        allowed = (4, 8) if method == "gptq" else (4,)
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
            raise ModelFolderError(f"{source}: {where}bits {bits!r} is not supported for {method}; expected "
                                   f"{' or '.join(map(str, allowed))}")
        group = qc.get("group_size", qc.get("q_group_size"))
        if not isinstance(group, int) or isinstance(group, bool) or not (
                group == -1 or (group >= 16 and group & (group - 1) == 0)):
            raise ModelFolderError(f"{source}: {where}group_size {group!r} is not supported; expected a power "
                                   f"of two from 16, or -1 (one group per row)")
        if method == "gptq":
            return cls._gptq(qc, source, where, bits, group)
        return cls._awq(qc, source, where, bits, group)

    @classmethod
    def _gptq(cls, qc: dict, source: str, where: str, bits: int, group: int) -> "PrequantizedFormat":
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if not isinstance(fmt, str) or fmt not in GPTQ_FORMATS:
            raise ModelFolderError(f"{source}: {where}checkpoint_format {fmt!r} is not supported; expected "
                                   f"'gptq' or 'gptq_v2'")
        if qc.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
            raise ModelFolderError(f"{source}: {where}pack_dtype {qc['pack_dtype']!r} is not supported; "
                                   f"expected 'int32'")
        if qc.get("dynamic"):
            raise ModelFolderError(f"{source}: {where}dynamic (per-module bits or group sizes) is not "
                                   f"supported; expected null")
        return cls("gptq", bits, group, bool(qc.get("sym", True)), GPTQ_FORMATS[fmt], source)

    @classmethod
    def _awq(cls, qc: dict, source: str, where: str, bits: int, group: int) -> "PrequantizedFormat":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelFolderError(f"{source}: {where}version {qc.get('version')!r} is not supported; expected "
                                   f"'gemm' (AutoAWQ's GEMM packing)")
        if qc.get("zero_point", True) is not True:
            raise ModelFolderError(f"{source}: {where}zero_point {qc.get('zero_point')!r} is not supported; "
                                   f"expected true")
        backend = str(qc.get("backend", "autoawq")).lower()
        if backend != "autoawq":
            raise ModelFolderError(f"{source}: {where}backend {qc.get('backend')!r} is not supported; expected "
                                   f"'autoawq'")
        return cls("awq", bits, group, False, 0, source)

    @property
    def per_word(self) -> int:
        """Codes per int32."""
        return 32 // self.bits

    def group(self, k: int) -> int:
        """The stored group size for input dimension k (-1 is all of k)."""
        return k if self.group_size == -1 else self.group_size

    def block_size(self, k: int) -> int:
        """MatMulNBits block_size for input dimension k: the group itself up to 256, else the largest power
        of two up to 128 that divides it (the group's scale and zero point repeated over its blocks)."""
        group = self.group(k)
        if group <= MAX_BLOCK and group >= 16 and group & (group - 1) == 0:
            return group
        for block in (128, 64, 32, 16):
            if group % block == 0:
                return block
        raise ModelFolderError(f"{self.source}: group_size {self.group_size} over an input dimension of {k}: "
                               f"expected one divisible by 16 (MatMulNBits' smallest block)")

    def expected_tensors(self, prefix: str, n: int, k: int) -> dict[str, tuple]:
        """The tensors Linear `prefix` [n, k] must have, with their shapes. A GPTQ `g_idx` [k] is optional
        and checked by `weight` when present; a bias is the float model's."""
        group, p = self.group(k), self.per_word
        if k % group:
            raise ModelFolderError(f"{self.source}: group_size {group} does not divide {k}, the input dimension "
                                   f"of {prefix}")
        if self.method == "gptq":
            return {f"{prefix}.qweight": (k // p, n), f"{prefix}.qzeros": (k // group, n // p),
                    f"{prefix}.scales": (k // group, n)}
        return {f"{prefix}.qweight": (k, n // p), f"{prefix}.qzeros": (k // group, n // p),
                f"{prefix}.scales": (k // group, n)}

    def provides(self, ckpt, prefix: str) -> bool:
        """Whether Linear `prefix` is stored quantized (modules_to_not_convert, a float lm_head: not)."""
        return ckpt.has(f"{prefix}.qweight")

    def weight(self, ckpt, prefix: str, n: int, k: int) -> QuantizedWeight:
        """Linear `prefix` [n, k] of checkpoint `ckpt` (anything with has / check / raw / folder, as
        export.checkpoint.Checkpoint) in MatMulNBits' layout, its codes, scales and zero points unchanged."""
        for name, shape in self.expected_tensors(prefix, n, k).items():
            ckpt.check(name, shape)
        self._check_g_idx(ckpt, prefix, k)
        block = self.block_size(k)
        qweight = _int32(ckpt, f"{prefix}.qweight")
        qzeros = _int32(ckpt, f"{prefix}.qzeros")
        if self.method == "gptq":
            packed = gptq_packed(qweight, self.bits, block)
            zeros = unpack_columns(add_to_each(qzeros, self.zero_offset, self.bits), self.bits)
        else:
            packed = awq_packed(qweight, block)
            zeros = unpack_columns(qzeros, self.bits, AWQ_ORDER)
        repeat = self.group(k) // block
        scales = np.repeat(_float32(ckpt, f"{prefix}.scales"), repeat, axis=0)
        zeros = np.repeat(zeros, repeat, axis=0)
        return QuantizedWeight(packed, np.ascontiguousarray(scales.T), zero_points(zeros.T, self.bits), self.bits,
                               block, (n, k))

    def bias(self, ckpt, prefix: str, n: int) -> np.ndarray | None:
        """Bias [n] of Linear `prefix` as float32, or None when it has none."""
        name = f"{prefix}.bias"
        return ckpt.tensor(name, (n,)) if ckpt.has(name) else None

    def _check_g_idx(self, ckpt, prefix: str, k: int) -> None:
        name = f"{prefix}.g_idx"
        if self.method != "gptq" or not ckpt.has(name):
            return
        ckpt.check(name, (k,))
        group = self.group(k)
        if not np.array_equal(np.asarray(ckpt.raw(name)), np.arange(k) // group):
            raise ModelFolderError(
                f"{ckpt.folder}: tensor {name} orders the inputs by activation (desc_act without static_groups); "
                f"expected g_idx[i] = i // {group}, as MatMulNBits reads contiguous groups: use a checkpoint "
                f"quantized with desc_act=false or static_groups=true")


def _int32(ckpt, name: str) -> np.ndarray:
    raw = ckpt.raw(name)
    if raw.dtype != np.int32:
        raise ModelFolderError(f"{ckpt.folder}: tensor {name} has dtype {raw.dtype}, expected int32 (packed codes)")
    return np.ascontiguousarray(raw)


def _float32(ckpt, name: str) -> np.ndarray:
    """A float16 / bf16 / float32 tensor as float32 (every one exactly representable)."""
    raw = ckpt.raw(name)
    if raw.dtype == np.uint16:  # bf16 bit patterns: the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if raw.dtype not in (np.float16, np.float32):
        raise ModelFolderError(f"{ckpt.folder}: tensor {name} has dtype {raw.dtype}, expected float16")
    return raw.astype(np.float32)


def word_bytes(words: np.ndarray) -> np.ndarray:
    """The 4 little-endian bytes of each int32: [..., C] -> uint8 [..., C, 4] (the stored bytes)."""
    words = np.ascontiguousarray(words)
    return words.view(np.uint8).reshape(words.shape + (4,))


def unpack_columns(words: np.ndarray, bits: int, order=None) -> np.ndarray:
    """Codes packed along the last axis, element j in bits bits*j.. of each word (or, with `order`, element
    order[i] in slot i): int32 [R, C] -> uint8 [R, C * 32/bits]."""
    b = word_bytes(words)
    slots = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[:-1] + (8,)) if bits == 4 else b
    if order is not None:
        slots = slots[..., np.argsort(order)]
    return slots.reshape(words.shape[0], -1)


def add_to_each(words: np.ndarray, offset: int, bits: int) -> np.ndarray:
    """`offset` added to every bits-wide element of each int32, as one 32-bit addition modulo 2^32 (carries
    included: gptqmodel's GPTQ v1 -> v2 conversion)."""
    if not offset:
        return words
    step = sum(offset << (bits * j) for j in range(32 // bits))  # 4-bit, offset 1: 0x11111111
    total = np.ascontiguousarray(words).view("<u4") + np.uint32(step)
    return total.astype("<u4").view(np.int32)


def gptq_packed(qweight: np.ndarray, bits: int, block: int) -> np.ndarray:
    """GPTQ qweight int32 [K/p, N] -> MatMulNBits B uint8 [N, K/block, block*bits/8], by moving bytes."""
    rows, n = qweight.shape
    k = rows * 32 // bits
    return np.ascontiguousarray(word_bytes(qweight).transpose(1, 0, 2)).reshape(n, k // block, block * bits // 8)


def awq_packed(qweight: np.ndarray, block: int) -> np.ndarray:
    """AWQ qweight int32 [K, N/8] -> MatMulNBits B uint8 [N, K/block, block/2], a slice of outputs at a
    time (about 2 M codes) so no full-size intermediate is made."""
    k, words = qweight.shape
    out = np.empty((words * 8, k // block, block // 2), np.uint8)
    step = max(1, (1 << 21) // (8 * k))
    for c in range(0, words, step):
        codes = unpack_columns(qweight[:, c:c + step], 4, AWQ_ORDER)  # [K, 8 * step]
        out[8 * c:8 * c + codes.shape[1]] = pack_nibbles(codes.T.reshape(codes.shape[1], k // block, block))
    return out


def zero_points(zeros: np.ndarray, bits: int) -> np.ndarray | None:
    """True zero points uint8 [N, K/block] in MatMulNBits' input, or None when all are the implicit 2^(bits-1)."""
    if np.all(zeros == 1 << (bits - 1)):
        return None
    return pack_nibbles(zeros) if bits == 4 else np.ascontiguousarray(zeros, dtype=np.uint8)


def with_zero_points(qw: QuantizedWeight) -> QuantizedWeight:
    """`qw` with explicit zero points (the implicit 2^(bits-1) written out): for stacking it with matrices
    that carry theirs into one MatMulNBits. Same weights."""
    if qw.zero_points is not None:
        return qw
    zeros = np.full(qw.scales.shape, 1 << (qw.bits - 1), dtype=np.uint8)
    packed = pack_nibbles(zeros) if qw.bits == 4 else zeros
    return QuantizedWeight(qw.packed, qw.scales, packed, qw.bits, qw.group_size, qw.shape)


class PrequantizedCheckpoint:
    """A Hugging Face checkpoint whose Linears are stored quantized (GPTQ / AWQ), seen through the interface
    of export.checkpoint.Checkpoint: `imported(part, n, k)` hands the store pass a Linear's codes as they are
    (never requantized); `tensor(…weight)` returns its dequantized float32 weight, so the calibration
    forward, `--bits 32` and the up-front shape checks work unchanged. Tensors stored as floats (embedding,
    lm_head, norms, biases) pass through."""

    def __init__(self, ckpt, fmt: PrequantizedFormat):
        self.ckpt, self.format = ckpt, fmt
        self.folder, self.config = ckpt.folder, ckpt.config

    def _linear(self, name: str) -> str | None:
        """The Linear prefix of `name` when it is a weight stored quantized, else None."""
        prefix = name[:-len(".weight")] if name.endswith(".weight") else None
        return prefix if prefix and self.format.provides(self.ckpt, prefix) else None

    def has(self, name: str) -> bool:
        return self._linear(name) is not None or self.ckpt.has(name)

    def check(self, name: str, shape: tuple) -> None:
        prefix = self._linear(name)
        if prefix is None or len(shape) != 2:
            return self.ckpt.check(name, shape)
        for part, part_shape in self.format.expected_tensors(prefix, *shape).items():
            self.ckpt.check(part, part_shape)

    def tensor(self, name: str, shape: tuple, rows=slice(None)) -> np.ndarray:
        prefix = self._linear(name)
        if prefix is None:
            return self.ckpt.tensor(name, shape, rows)
        from export.quantize import dequantize_weight

        return dequantize_weight(self.format.weight(self.ckpt, prefix, *shape))[rows]

    def raw(self, name: str) -> np.ndarray:
        return self.ckpt.raw(name)

    def imported(self, part: str, n: int, k: int) -> QuantizedWeight | None:
        """Linear `part` [n, k] in MatMulNBits' layout as the checkpoint stores it, or None if it is float."""
        return self.format.weight(self.ckpt, part, n, k) if self.format.provides(self.ckpt, part) else None

    def write_side_files(self, dest: Path) -> None:
        self.ckpt.write_side_files(dest)

    def describe(self) -> dict:
        """For the manifest: what the checkpoint's quantization was."""
        f = self.format
        return {"method": f.method, "bits": f.bits, "group_size": f.group_size, "symmetric": f.symmetric,
                "gptq_v1_zero_offset": f.zero_offset if f.method == "gptq" else None}
