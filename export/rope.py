"""RoPE frequency tables, plain and YaRN-scaled (Qwen2.5's long-context `rope_scaling`), in numpy.

Plain RoPE, head dimension d, base θ (rope_theta), pair i = 0 … d/2 - 1, position p:

    f_i = θ^(-2i/d)                      cos[p, i] = cos(p·f_i)      sin[p, i] = sin(p·f_i)

YaRN ("rope_scaling": {"type": "yarn", "factor": s, "original_max_position_embeddings": L, …}), exactly
as transformers' `_compute_yarn_parameters` (L falls back to max_position_embeddings):

    r(β)  = d · ln(L / (2π β)) / (2 ln θ)          the pair that turns β times over L positions
    lo    = max(floor(r(β_fast)), 0)               β_fast = 32, β_slow = 1 by default; floor/ceil only
    hi    = min(ceil(r(β_slow)), d - 1)            when `truncate` (default true); hi += 0.001 if lo == hi
    γ_i   = clip((i - lo) / (hi - lo), 0, 1)       0: fast pairs kept as they are, 1: slow pairs divided by s
    f'_i  = f_i · (1 - γ_i) + (f_i / s) · γ_i
    m     = attention_factor if given, else g(s, mscale) / g(s, mscale_all_dim) if both are non-zero,
            else g(s, 1), where g(s, μ) = 0.1 · μ · ln s + 1
    cos[p, i] = m · cos(p·f'_i)                    sin[p, i] = m · sin(p·f'_i)

m scales both the rotated queries and keys, so attention logits grow by m² (the paper's 1/t), at every
position, short prompts included. The tables are half-width, non-interleaved (rotate_half) as
GroupQueryAttention's cos_cache / sin_cache take them; computed in float64, stored as float32.
"""
import math
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ModelFolderError

SUPPORTED = ("yarn",)  # besides "default" (and rope_scaling null), which mean plain RoPE
DEFAULT_MAX_POSITIONS = 32768  # transformers' Qwen2Config default for max_position_embeddings
MAX_SCALE = 1000.0  # bound of mscale, mscale_all_dim, attention_factor (about 1 in practice): finite float32 tables


@dataclass(frozen=True)
class RopeScaling:
    """A validated `rope_scaling` of config.json (only YaRN so far), under its Hugging Face names."""

    factor: float  # s > 1
    original_max_position_embeddings: int  # L, the pre-training context (resolved: never absent)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0: absent (transformers uses the pair only when both are non-zero)
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # None: derived from factor (and the mscales)
    truncate: bool = True
    type: str = "yarn"

    @classmethod
    def from_config(cls, config: dict, source: str) -> "RopeScaling | None":
        """The scaling of a config.json dict; None for plain RoPE (rope_scaling absent, null, {} or of type
        "default"). Anything else unsupported or malformed raises a one-line ModelFolderError."""
        rs = config.get("rope_scaling")
        if rs is None or rs == {}:
            return None
        if not isinstance(rs, dict):
            raise ModelFolderError(f"{source}: rope_scaling {rs!r}: expected an object or null")
        kinds = {k: rs[k] for k in ("rope_type", "type") if k in rs}
        if not kinds:
            raise ModelFolderError(f"{source}: rope_scaling has no 'rope_type' (or 'type'); expected one of "
                                   f"{', '.join(map(repr, SUPPORTED))} or 'default'")
        if len(set(map(repr, kinds.values()))) > 1:
            raise ModelFolderError(f"{source}: rope_scaling.rope_type {rs['rope_type']!r} and rope_scaling.type "
                                   f"{rs['type']!r} disagree; expected one type")
        key, kind = next(iter(kinds.items()))
        if kind == "default":
            return None
        if kind not in SUPPORTED:
            raise ModelFolderError(f"{source}: rope_scaling.{key} {kind!r} is not supported; expected one of "
                                   f"{', '.join(map(repr, SUPPORTED))}, 'default' or rope_scaling null")

        def number(name, default, low, low_open=False, high=math.inf, what=None):
            v = rs.get(name)
            if v is None:
                return default
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or v < low or (low_open and v == low) or v > high):
                bound = ('> ' if low_open else '>= ') + repr(low) + (f" and <= {high:g}" if high < math.inf else "")
                raise ModelFolderError(f"{source}: rope_scaling.{name} {v!r}: expected {what or 'a number ' + bound}")
            return float(v)

        if rs.get("factor") is None:
            raise ModelFolderError(f"{source}: rope_scaling.factor is missing; expected a number > 1 for {kind!r}")
        factor = number("factor", None, 1, low_open=True)
        beta_slow = number("beta_slow", 1.0, 0, low_open=True)
        beta_fast = number("beta_fast", 32.0, 0, low_open=True)
        if beta_fast < beta_slow:
            raise ModelFolderError(f"{source}: rope_scaling.beta_fast {beta_fast:g} is below rope_scaling.beta_slow "
                                   f"{beta_slow:g}; expected beta_fast >= beta_slow")
        original = number("original_max_position_embeddings", None, 1, what="a positive integer")
        if original is None:  # transformers: the pre-scaling context is then max_position_embeddings
            original = config.get("max_position_embeddings")
            original = DEFAULT_MAX_POSITIONS if original is None else original  # null: the default, as absent
            if isinstance(original, bool) or not isinstance(original, int) or original < 1:
                raise ModelFolderError(f"{source}: max_position_embeddings {original!r}: expected a positive "
                                       "integer (rope_scaling gives no original_max_position_embeddings)")
        elif original != int(original):
            raise ModelFolderError(f"{source}: rope_scaling.original_max_position_embeddings "
                                   f"{rs['original_max_position_embeddings']!r}: expected a positive integer")
        truncate = rs.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ModelFolderError(f"{source}: rope_scaling.truncate {truncate!r}: expected true or false")
        return cls(factor=factor, original_max_position_embeddings=int(original), beta_fast=beta_fast,
                   beta_slow=beta_slow, mscale=number("mscale", 0.0, 0, high=MAX_SCALE),
                   mscale_all_dim=number("mscale_all_dim", 0.0, 0, high=MAX_SCALE),
                   attention_factor=number("attention_factor", None, 0, low_open=True, high=MAX_SCALE),
                   truncate=truncate)


def context_length(max_position_embeddings: int, scaling: RopeScaling | None) -> int:
    """Positions the exported tables must cover: max_position_embeddings, or for YaRN the larger of it and
    original × factor (Qwen2.5's configs keep max_position_embeddings 32768 while factor 4 promises 131072)."""
    if scaling is None:
        return max_position_embeddings
    return max(max_position_embeddings, round(scaling.original_max_position_embeddings * scaling.factor))


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """The rotation speed of each pair, float64 [head_dim / 2] (f or f' of the module docstring)."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim {head_dim}: expected a positive even number")
    f = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return f

    def pair(rotations):  # r(β): the (fractional) pair whose wavelength fits `rotations` turns in L
        L = scaling.original_max_position_embeddings
        return head_dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = pair(scaling.beta_fast), pair(scaling.beta_slow)
    if scaling.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)  # sic: head_dim - 1, not head_dim / 2 - 1 (as transformers)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return f * (1.0 - ramp) + f / scaling.factor * ramp


def attention_factor(scaling: RopeScaling | None) -> float:
    """m: the factor folded into cos and sin (1.0 for plain RoPE)."""
    if scaling is None:
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def g(mscale):
        return 0.1 * mscale * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return g(scaling.mscale) / g(scaling.mscale_all_dim)
    return g(1.0)


def tables(head_dim: int, theta: float, positions: int | np.ndarray,
           scaling: RopeScaling | None) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 [P, head_dim / 2] for positions 0 … positions - 1 (or the given positions), the
    attention factor folded in."""
    p = np.arange(positions, dtype=np.float64) if np.ndim(positions) == 0 else np.asarray(positions, np.float64)
    angles = np.outer(p, inv_freq(head_dim, theta, scaling))
    m = attention_factor(scaling)
    return (m * np.cos(angles)).astype(np.float32), (m * np.sin(angles)).astype(np.float32)
