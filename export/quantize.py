"""Weight-only group quantization as pure numpy functions, packed the way ORT's MatMulNBits reads it.

A weight W is [N, K] (out_features, in_features, as in a torch Linear). It is split into groups of
`group_size` consecutive values along K; each group gets one float scale (and, when asymmetric, one
integer zero point):

    w ≈ (q - zero_point) * scale          q in [0, 2^bits - 1], stored unsigned

Symmetric groups use the implicit zero point 2^(bits-1) that MatMulNBits assumes when no zero_points
input is given, with scale = max|w| / (2^(bits-1) - 1) so that rounding error stays within scale/2.
Asymmetric groups stretch [min(w, 0), max(w, 0)] over the full unsigned range.

MatMulNBits layout (com.microsoft, bits 4 or 8):
    B            uint8 [N, K/group, group*bits/8]   4-bit: element 2i in the low nibble, 2i+1 in the high
    scales       float [N * K/group]
    zero_points  uint8 [N * ceil(K/group * bits/8)] 4-bit: two zero points per byte, low nibble first
"""
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ArgumentError

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class QuantizedWeight:
    """A [N, K] weight, quantized per group along K, in MatMulNBits' packed layout."""

    packed: np.ndarray  # uint8 [N, K/group, group*bits/8]
    scales: np.ndarray  # float32 [N, K/group]
    zero_points: np.ndarray | None  # uint8 [N, ceil(K/group*bits/8)] packed, None when symmetric
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K)

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp


def check_group_size(group_size: int) -> None:
    """Raise ArgumentError unless group_size is a power of two from 16 to 256."""
    if group_size < 16 or group_size > 256 or group_size & (group_size - 1):
        raise ArgumentError(f"--group-size {group_size}: expected a power of two from 16 to 256")


def check_divides(k: int, group_size: int, name: str = "K", role: str = "") -> None:
    """Raise ArgumentError unless group_size divides the input dimension k of `name`."""
    check_group_size(group_size)
    if k % group_size:
        raise ArgumentError(f"--group-size {group_size} does not divide {name} = {k}{role}")


def quantize(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True):
    """Round-to-nearest group quantization of a [N, K] weight.

    Returns (q, scales, zero_points): q uint8 [N, K/group, group] in [0, 2^bits-1], scales float32
    [N, K/group], zero_points uint8 [N, K/group] (the implicit 2^(bits-1) when symmetric).
    """
    if bits not in SUPPORTED_BITS:
        raise ArgumentError(f"--bits {bits}: expected one of {SUPPORTED_BITS} (or 32 for float)")
    n, k = w.shape
    check_divides(k, group_size)
    g = w.astype(np.float32, copy=False).reshape(n, k // group_size, group_size)
    qmax = (1 << bits) - 1
    if symmetric:
        zero = np.full(g.shape[:2], 1 << (bits - 1), dtype=np.float32)
        scales = np.abs(g).max(axis=-1) / ((1 << (bits - 1)) - 1)
    else:
        lo = np.minimum(g.min(axis=-1), 0.0)
        hi = np.maximum(g.max(axis=-1), 0.0)
        scales = (hi - lo) / qmax
        zero = np.round(-lo / np.where(scales == 0, 1.0, scales))
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)  # an all-zero group stays exact
    q = np.clip(np.round(g / scales[..., None]) + zero[..., None], 0, qmax)
    return q.astype(np.uint8), scales, zero.astype(np.uint8)


def dequantize(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """Inverse of `quantize`: [N, K/group, group] codes back to a float32 [N, K] weight."""
    w = (q.astype(np.float32) - zero_points[..., None].astype(np.float32)) * scales[..., None]
    return w.reshape(q.shape[0], -1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes pairwise along the last axis, element 2i in the low nibble."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of `pack_nibbles`, keeping the first `count` codes of the last axis."""
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return q[..., :count]


def quantize_weight(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True) -> QuantizedWeight:
    """Quantize a [N, K] weight and pack it for MatMulNBits."""
    q, scales, zero = quantize(w, bits, group_size, symmetric)
    packed = pack_nibbles(q) if bits == 4 else q
    zp = None
    if not symmetric:
        zp = pack_nibbles(zero) if bits == 4 else zero
    return QuantizedWeight(packed, scales, zp, bits, group_size, tuple(w.shape))


def dequantize_weight(qw: QuantizedWeight) -> np.ndarray:
    """The float32 [N, K] weight that a QuantizedWeight stands for (what MatMulNBits computes with)."""
    n_groups = qw.scales.shape[1]
    q = unpack_nibbles(qw.packed, qw.group_size) if qw.bits == 4 else qw.packed
    if qw.zero_points is None:
        zero = np.full(qw.scales.shape, 1 << (qw.bits - 1), dtype=np.uint8)
    elif qw.bits == 4:
        zero = unpack_nibbles(qw.zero_points, n_groups)
    else:
        zero = qw.zero_points
    return dequantize(q, qw.scales, zero)


@dataclass(frozen=True)
class QuantSpec:
    """How an export stores its matrices: bits 4 or 8 (MatMulNBits), or 32 (float32, the reference)."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0  # MatMulNBits: 0 = exact fp32 compute, 4 = int8 activations (faster on CPU)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS + (32,):
            raise ArgumentError(f"--bits {self.bits}: expected 4, 8 or 32")
        if self.bits != 32:
            check_group_size(self.group_size)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ArgumentError(f"--accuracy-level {self.accuracy_level}: expected 0 to 4")

    @property
    def quantized(self) -> bool:
        return self.bits != 32
