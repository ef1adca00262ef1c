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
from dataclasses import dataclass, replace

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

    @classmethod
    def concatenate(cls, parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Row blocks of one matrix (or matrices stacked along rows) as one QuantizedWeight."""
        first = parts[0]
        zp = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
        return cls(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]), zp,
                   first.bits, first.group_size, (sum(p.shape[0] for p in parts), first.shape[1]))

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp


def check_group_size(group_size: int, option: str = "--group-size") -> None:
    """Raise ArgumentError unless group_size is a power of two from 16 to 256."""
    if not isinstance(group_size, int) or group_size < 16 or group_size > 256 or group_size & (group_size - 1):
        raise ArgumentError(f"{option} {group_size}: expected a power of two from 16 to 256")


def check_divides(k: int, group_size: int, name: str = "K", role: str = "", option: str = "--group-size") -> None:
    """Raise ArgumentError unless group_size divides the input dimension k of `name`."""
    check_group_size(group_size, option)
    if k % group_size:
        raise ArgumentError(f"{option} {group_size} does not divide {name} = {k}{role}")


METHODS = ("rtn", "search", "calibrated", "compensated")


def quantize(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True, method: str = "rtn",
             importance: np.ndarray | None = None):
    """Group quantization of a [N, K] weight: round to nearest ("rtn"), or a per-group search for the
    scale (and zero point) with the least squared error ("search"; "calibrated" is the same search with
    each input column's error weighted by `importance`, the mean square of its activation; "compensated"
    is GPTQ over whole matrices, export/compensate.py, which picks each group's scale with this search).

    Returns (q, scales, zero_points): q uint8 [N, K/group, group] in [0, 2^bits-1], scales float32
    [N, K/group], zero_points uint8 [N, K/group] (the implicit 2^(bits-1) when symmetric).
    """
    if bits not in SUPPORTED_BITS:
        raise ArgumentError(f"--bits {bits}: expected one of {SUPPORTED_BITS} (or 32 for float)")
    n, k = w.shape
    check_divides(k, group_size)
    g = w.astype(np.float32, copy=False).reshape(n, k // group_size, group_size)
    if method != "rtn":
        weight = None if importance is None else importance.astype(np.float32).reshape(1, k // group_size, group_size)
        search = search_symmetric if symmetric else search_asymmetric
        return search(g, bits, weight)
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


def _refit_scale(g, c, weight):
    """Least-squares scale per group for fixed integer offsets c = q - zero: argmin_s Σ weight (g - s c)²."""
    wc = c if weight is None else c * weight
    num, den = (wc * g).sum(axis=-1), (wc * c).sum(axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)


def _error(g, s, c, weight):
    e = np.square(g - s[..., None] * c)
    return (e if weight is None else e * weight).sum(axis=-1)


def search_symmetric(g: np.ndarray, bits: int, weight=None):
    """Symmetric: try mapping each group's largest-magnitude value to levels from qmax-2 to the extra
    negative level -(qmax+1) (llama.cpp's make_qx_quants idea), refit the scale by least squares, keep the
    candidate with the least (weighted) squared error. The scale may be negative."""
    half = 1 << (bits - 1)
    amax = np.take_along_axis(g, np.abs(g).argmax(axis=-1)[..., None], axis=-1)[..., 0]  # signed
    safe = np.where(amax == 0, 1.0, amax)
    best_err = np.full(g.shape[:2], np.inf, dtype=np.float32)
    best_s = np.ones(g.shape[:2], dtype=np.float32)
    best_c = np.zeros(g.shape, dtype=np.int8)
    for level in np.arange(half - 2.5, half + 0.51, 0.5):  # e.g. 4-bit: 5.5, 6, … 8.5
        c = np.clip(np.round(g * (-level / safe)[..., None]), -half, half - 1)
        s = _refit_scale(g, c, weight)
        err = _error(g, s, c, weight)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_c = np.where(better[..., None], c, best_c)
    best_s = np.where(best_s == 0, 1.0, best_s).astype(np.float32)
    zero = np.full(g.shape[:2], half, dtype=np.uint8)
    return (best_c + half).astype(np.uint8), best_s, zero


def search_asymmetric(g: np.ndarray, bits: int, weight=None):
    """Asymmetric: shrink the [min, max] range by factors 1, 0.95, … 0.75, place an integer zero point,
    refit the scale by least squares, keep the candidate with the least (weighted) squared error."""
    qmax = (1 << bits) - 1
    lo0, hi0 = np.minimum(g.min(axis=-1), 0.0), np.maximum(g.max(axis=-1), 0.0)
    best_err = np.full(g.shape[:2], np.inf, dtype=np.float32)
    best = (np.ones(g.shape[:2], np.float32), np.zeros(g.shape[:2], np.float32), np.zeros(g.shape, np.uint8))
    for shrink in np.linspace(1.0, 0.75, 6):
        span = (hi0 - lo0) * shrink
        s0 = np.where(span > 0, span / qmax, 1.0)
        zero = np.clip(np.round(-lo0 * shrink / s0), 0, qmax)
        q = np.clip(np.round(g / s0[..., None]) + zero[..., None], 0, qmax)
        c = q - zero[..., None]
        s = _refit_scale(g, c, weight)
        err = _error(g, s, c, weight)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (np.where(better, s, best[0]), np.where(better, zero, best[1]), np.where(better[..., None], q, best[2]))
    s, zero, q = best
    return q.astype(np.uint8), np.where(s == 0, 1.0, s).astype(np.float32), zero.astype(np.uint8)


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


def quantize_weight(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True, method: str = "rtn",
                    importance: np.ndarray | None = None) -> QuantizedWeight:
    """Quantize a [N, K] weight and pack it for MatMulNBits (in row chunks, to bound the search's memory)."""
    rows = max(1, (1 << 22) // w.shape[1])
    parts = [quantize(w[r:r + rows], bits, group_size, symmetric, method, importance)
             for r in range(0, w.shape[0], rows)]
    q, scales, zero = (np.concatenate(p) for p in zip(*parts))
    return pack(q, scales, zero, bits, symmetric)


def pack(q: np.ndarray, scales: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool) -> QuantizedWeight:
    """`quantize`'s (q, scales, zero_points) packed for MatMulNBits (zero points dropped when symmetric)."""
    n, groups, group_size = q.shape
    packed = pack_nibbles(q) if bits == 4 else q
    zp = None
    if not symmetric:
        zp = pack_nibbles(zero) if bits == 4 else zero
    return QuantizedWeight(packed, scales, zp, bits, group_size, (n, groups * group_size))


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


# --preset: three points of the int4 front measured on the sample (README, "The int4 front"). Every one is
# asymmetric and GPTQ-compensated; they differ in group size and the lm_head's bits, i.e. in bytes read per
# decoded token. "balanced" is the default: the point that beats onnxruntime-genai's int4 on speed and KL at once.
PRESETS = {
    "fast": dict(method="compensated", symmetric=False, group_size=128, lm_head_bits=4, lm_head_group_size=128,
                 embed_group_size=64),
    "balanced": dict(method="compensated", symmetric=False, group_size=64, lm_head_bits=4, lm_head_group_size=64,
                     embed_group_size=64),
    "accurate": dict(method="compensated", symmetric=False, group_size=32, lm_head_bits=8, lm_head_group_size=128,
                     embed_group_size=64),
}
DEFAULT_PRESET = "balanced"


@dataclass(frozen=True)
class QuantSpec:
    """How an export stores its matrices: bits 4 or 8 (MatMulNBits), or 32 (float32, the reference).

    Mixed precision: the lm_head (and a tied embedding, which shares its blob) may use other bits than the
    layers, and so may an untied embedding."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0  # MatMulNBits: 0 = exact fp32 compute, 4 = int8 activations (faster on CPU)
    method: str = "rtn"  # see METHODS
    lm_head_bits: int | None = None  # None: same as bits
    embed_bits: int | None = None  # untied embedding; None: same as bits
    int8_accuracy_level: int = 4  # MatMulNBits level of 8-bit matrices: see accuracy_for
    lm_head_group_size: int | None = None  # lm_head (and a tied embedding); None: group_size
    embed_group_size: int | None = None  # untied embedding; None: group_size
    defaulted: tuple = ()  # names of the group size fields that `recommended` chose: `fit` may shrink them

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS + (32,):
            raise ArgumentError(f"--bits {self.bits}: expected 4, 8 or 32")
        for name, value in (("--lm-head-bits", self.lm_head_bits), ("--embed-bits", self.embed_bits)):
            if value is not None and (value not in SUPPORTED_BITS or self.bits == 32):
                raise ArgumentError(f"{name} {value}: expected 4 or 8, with --bits 4 or 8")
        if self.bits != 32:
            check_group_size(self.group_size)
            for name, value in (("--lm-head-group-size", self.lm_head_group_size),
                                ("--embed-group-size", self.embed_group_size)):
                if value is not None:
                    check_group_size(value, name)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ArgumentError(f"--accuracy-level {self.accuracy_level}: expected 0 to 4")
        if self.method not in METHODS:
            raise ArgumentError(f"--method {self.method}: expected one of {', '.join(METHODS)}")

    @classmethod
    def recommended(cls, bits: int, preset: str | None = None, **choices) -> "QuantSpec":
        """The defaults of `qwen-edge export`, where a choice given as None is left to them.

        int4: the `preset` (PRESETS; default DEFAULT_PRESET), all at MatMulNBits accuracy level 4 (int8
        activations: 1.4x the decode speed of level 0, KL +0.4 %). int8: plain symmetric round-to-nearest,
        within 0.002 nats of float. A preset names int4 recipes only."""
        if preset is not None and preset not in PRESETS:
            raise ArgumentError(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
        if preset is not None and bits != 4:
            raise ArgumentError(f"--preset {preset}: the presets are int4 recipes; expected --bits 4 (got {bits})")
        defaults = {4: PRESETS[preset or DEFAULT_PRESET] | dict(accuracy_level=4),
                    8: dict(method="rtn", symmetric=True, group_size=32)}.get(bits, {})
        given = {k: v for k, v in choices.items() if v is not None}
        if bits == 32:
            given.pop("group_size", None)
        defaulted = tuple(k for k in defaults if k.endswith("group_size") and k not in given)
        return cls(bits=bits, **(defaults | given), defaulted=defaulted)

    def fit(self, hidden: int, intermediate: int | None = None) -> "QuantSpec":
        """This spec with each defaulted group size halved until it fits a small model: the layers' group
        until it divides the hidden and intermediate sizes, the lm_head / embedding groups until they
        divide the hidden size (a tiny model's 64 is not a multiple of the default 128), never below the
        layers' group."""
        changes = {}
        if "group_size" in self.defaulted:
            group = self.group_size
            while group > 16 and (hidden % group or (intermediate or hidden) % group):
                group //= 2
            changes["group_size"] = group
        floor = changes.get("group_size", self.group_size)
        for name in self.defaulted:
            if name == "group_size":
                continue
            group = getattr(self, name)
            while group > floor and hidden % group:
                group //= 2
            changes[name] = group
        return replace(self, **changes) if changes else self

    @property
    def quantized(self) -> bool:
        return self.bits != 32

    def accuracy_for(self, bits: int) -> int:
        """MatMulNBits accuracy_level of a `bits`-wide matrix. onnxruntime 1.31's CPU kernel for 8-bit
        weights exists only at level 4 (int8 activations); at 0 it falls back to a path measured ~10x
        slower (an int8 lm_head took decode from 26 to 1.4 tok/s on the sample), so 8-bit uses 4 unless
        int8_accuracy_level says otherwise (the tests set 0 to compare with float math exactly)."""
        return self.int8_accuracy_level if bits == 8 else self.accuracy_level

    @staticmethod
    def role(name: str, tied: bool) -> str:
        """"lm_head" (a tied embedding is the lm_head's blob), "embedding" or "layer" for checkpoint matrix
        `name` (without .weight): what decides its bits and group size."""
        if name == "lm_head" or (tied and name == "model.embed_tokens"):
            return "lm_head"
        return "embedding" if name == "model.embed_tokens" else "layer"

    def group_for(self, name: str, tied: bool) -> int:
        """Group size of checkpoint matrix `name`."""
        chosen = {"lm_head": self.lm_head_group_size, "embedding": self.embed_group_size}.get(self.role(name, tied))
        return chosen or self.group_size

    def bits_for(self, name: str, tied: bool) -> int:
        """Bits of checkpoint matrix `name`."""
        return {"lm_head": self.lm_head_bits, "embedding": self.embed_bits}.get(self.role(name, tied)) or self.bits
