"""Error-compensating quantization (GPTQ, Frantar et al. 2022) as pure numpy, for `--method compensated`.

For a weight W [N, K] whose input x has the Gram matrix H = Σ xᵀx [K, K] over the calibration tokens, the
output error of a quantized Ŵ over those tokens is tr((W - Ŵ) H (W - Ŵ)ᵀ). GPTQ quantizes the columns in
order and pushes each column's rounding error onto the columns not yet quantized, weighted by the upper
Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), so that later columns absorb what earlier ones lost:

    for each column j:   q_j = quant(w_j);   e = (w_j - q_j) / U[j, j];   w_{j+1:} -= e ⊗ U[j, j+1:]

in blocks of 128 columns with lazy batch updates (the columns after a block get the block's errors in one
matrix product). A group's scale and zero point are chosen when the loop reaches the group's first column,
on the error-updated weights, with the least-squares search of export/quantize.py weighted by diag(H); the
group layout stays the static one MatMulNBits reads (no g_idx). Rows are independent given H, so W is
processed in row chunks (ROW_ELEMENTS floats at a time: a 152k-row lm_head never sits whole in float32).

The model-level pass (export/calibrate.py `sequential_pass`) hands each layer's H here; `Compensator`
quantizes the matrices, spills their codes to .npy files in the export's partial folder (a 7B's int4
codes are ~4 GB: they do not stay in RAM) and gives the calibration the dequantized weights back, so the
next matrix sees the quantized model's activations. The store pass then streams the spilled codes
(`Spill.blocks`) instead of quantizing again.
"""
from pathlib import Path
from typing import NamedTuple

import numpy as np

from export.quantize import QuantizedWeight, dequantize_weight, pack, quantize, quantize_weight

BLOCK = 128  # columns per lazy batch update (at least one group)
ROW_ELEMENTS = 1 << 23  # floats of W in one row chunk (32 MiB in float32), bounding the loop's memory
DAMP = 0.01  # damping added to H's diagonal, as a fraction of its mean
ACT_ORDER = False  # columns by descending activation with static groups (see `factor`)


def inverse_factor(h: np.ndarray, damp: float = DAMP, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of the damped H⁻¹ (float32 [K, K]) and the mask of dead input
    channels (diag 0: never active in the calibration; their weights are zeroed). The damping is raised
    tenfold until the Cholesky factorization succeeds.

    Three LAPACK calls (scipy) in one float64 K×K buffer, in place: H = LLᵀ (potrf), H⁻¹ from L (potri),
    H⁻¹ = L'L'ᵀ (potrf), so U = L'ᵀ. They read and write the lower triangle only, so a failed factorization
    is undone from the untouched upper one. With `overwrite` that buffer is `h` itself (symmetric: its
    transpose is the Fortran-order array LAPACK wants), and a 7B's down_proj (K 18944) needs no second
    2.9 GB matrix; else the caller's H is left as it was."""
    from scipy.linalg import lapack

    h = h if overwrite and h.dtype == np.float64 else np.array(h, dtype=np.float64)
    a = h.T  # Fortran order, the same symmetric matrix
    k = len(a)
    idx = np.arange(k)
    diag = a[idx, idx].copy()
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(np.mean(diag)) if k else 1.0
    step = damp * mean
    while True:
        a[idx, idx] = diag + step
        c, info = lapack.dpotrf(a, lower=1, clean=0, overwrite_a=1)
        if info == 0:
            break
        if info < 0 or step > 1e6 * mean:
            raise np.linalg.LinAlgError(f"Cholesky factorization of H failed (LAPACK info {info})")
        mirror_upper_to_lower(a)  # undo the partial factorization
        step = max(step * 10, 1e-6 * mean)
    c, info = lapack.dpotri(c, lower=1, overwrite_c=1)
    if info == 0:
        c, info = lapack.dpotrf(c, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"Cholesky factorization of H⁻¹ failed (LAPACK info {info})")
    u = c.T.astype(np.float32)  # upper, C order
    del a, c, h
    return u, dead


def mirror_upper_to_lower(a: np.ndarray, block: int = 1024) -> None:
    """Copy the strict upper triangle of square `a` onto its lower one, a block of columns at a time (index
    arrays of a whole triangle would take 2 × 8 bytes per element)."""
    k = len(a)
    for j in range(0, k, block):
        e = min(k, j + block)
        a[e:, j:e] = a[j:e, e:].T
        tile = a[j:e, j:e]
        lower = np.tril_indices(e - j, -1)
        tile[lower] = tile.T[lower]


class Factor(NamedTuple):
    """What GPTQ needs from one input's H, computed once for every matrix (and row chunk) reading it."""

    u: np.ndarray  # float32 [K, K]: upper Cholesky factor of the damped H⁻¹, in processing order
    importance: np.ndarray  # float32 [K]: diag(H), weighing the group search
    dead: np.ndarray  # bool [K]: channels never active (diag 0): their weights are zeroed
    order: np.ndarray | None  # act order: the columns by descending diag(H); None: in order


def factor(h: np.ndarray, act_order: bool = False, overwrite: bool = False) -> Factor:
    """The Factor of H = Σ xᵀx [K, K] (float64). act_order processes the columns of largest activation first
    (while the most columns remain to absorb their error) with "static groups": every group's scale and
    zero point chosen up front on the weights as given, so the group layout stays MatMulNBits' (no g_idx)."""
    diag = np.diagonal(h).copy()
    order = np.argsort(-diag, kind="stable") if act_order else None
    u, _ = inverse_factor(h if order is None else h[np.ix_(order, order)], overwrite=overwrite or order is not None)
    return Factor(u, diag.astype(np.float32), diag <= 0, order)


def gptq(w: np.ndarray, f: Factor, bits: int, group_size: int, symmetric: bool, method: str = "calibrated",
         out: np.ndarray | None = None) -> QuantizedWeight:
    """GPTQ of the rows `w` [R, K] given the Factor of its input's H: a QuantizedWeight packed for
    MatMulNBits. `method` picks each group's scale and zero point ("calibrated": the least-squares search
    weighted by diag(H); "rtn"), from the error-updated weights when the loop reaches the group's first
    column (or, with f.order, from the weights as given). `w` is not modified; `out` [R, K], when given,
    receives the dequantized weights as the loop computes them. All of `w` at once: see `compensate` for
    row chunks."""
    n, k = w.shape
    w = np.array(w, dtype=np.float32)
    if f.dead.any():
        w[:, f.dead] = 0.0
    qmax = (1 << bits) - 1
    groups = k // group_size
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, groups), np.float32)
    zeros = np.empty((n, groups), np.uint8)
    order = f.order
    if order is not None:  # static groups
        _, scales[:], zeros[:] = quantize(w, bits, group_size, symmetric, method, f.importance)
        w = w[:, order]
    u = f.u
    block = max(BLOCK, group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2]  # a view: updated in place
        err1 = np.empty((n, i2 - i1), np.float32)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if order is not None:
                col = int(order[col])
                s_col, z_col = scales[:, col // group_size], zeros[:, col // group_size].astype(np.float32)
            elif col % group_size == 0:
                g = col // group_size
                _, s, z = quantize(w1[:, i:i + group_size], bits, group_size, symmetric, method,
                                   f.importance[col:col + group_size])
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                s_col, z_col = scales[:, g], zeros[:, g].astype(np.float32)
            x = w1[:, i]
            q = np.clip(np.round(x / s_col) + z_col, 0, qmax)
            codes[:, col] = q
            dq = (q - z_col) * s_col
            if out is not None:
                out[:, col] = dq
            e = (x - dq) / u1[i, i]
            err1[:, i] = e
            w1[:, i + 1:] -= np.outer(e, u1[i, i + 1:])
        if i2 < k:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return pack(codes.reshape(n, groups, group_size), scales, zeros, bits, symmetric)


def row_chunk(k: int) -> int:
    """Rows of a [N, k] weight processed at once (ROW_ELEMENTS floats)."""
    return max(1, ROW_ELEMENTS // k)


def compensate(w: np.ndarray, h: np.ndarray, bits: int, group_size: int, symmetric: bool,
               method: str = "calibrated", act_order: bool = False) -> QuantizedWeight:
    """GPTQ of a whole weight `w` [N, K] (any array supporting row slices, e.g. a memory map) given its
    input's H = Σ xᵀx [K, K], in row chunks of `row_chunk(K)` rows."""
    f = factor(h, act_order)
    step = row_chunk(w.shape[1])
    return QuantizedWeight.concatenate([gptq(w[r:r + step], f, bits, group_size, symmetric, method)
                                        for r in range(0, w.shape[0], step)])


class Spill:
    """The codes, scales and zero points of compensated matrices in .npy files under `folder` (inside the
    export's partial folder), written in row blocks and read back memory-mapped in row blocks."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, tuple] = {}  # part -> (bits, group, symmetric, (N, K))

    def _path(self, part: str, what: str) -> Path:
        return self.folder / f"{part}.{what}.npy"

    def __contains__(self, part: str) -> bool:
        return part in self.meta

    def writer(self, part: str, n: int, k: int, bits: int, group: int, symmetric: bool):
        """A function write(row, QuantizedWeight) filling rows row… of part's files."""
        groups = k // group
        open_ = np.lib.format.open_memmap
        packed = open_(self._path(part, "packed"), "w+", np.uint8, (n, groups, group * bits // 8))
        scales = open_(self._path(part, "scales"), "w+", np.float32, (n, groups))
        zp_width = -(-groups * bits // 8)
        zeros = None if symmetric else open_(self._path(part, "zero_points"), "w+", np.uint8, (n, zp_width))
        self.meta[part] = (bits, group, symmetric, (n, k))

        def write(row: int, qw: QuantizedWeight) -> None:
            end = row + qw.shape[0]
            packed[row:end], scales[row:end] = qw.packed, qw.scales
            if zeros is not None:
                zeros[row:end] = qw.zero_points
            if end == n:
                for a in (packed, scales, zeros):
                    if a is not None:
                        a.flush()
        return write

    def blocks(self, part: str, step: int):
        """QuantizedWeights of rows [r, r + step) of `part`, in order."""
        bits, group, symmetric, (n, k) = self.meta[part]
        packed = np.load(self._path(part, "packed"), mmap_mode="r")
        scales = np.load(self._path(part, "scales"), mmap_mode="r")
        zeros = None if symmetric else np.load(self._path(part, "zero_points"), mmap_mode="r")
        for r in range(0, n, step):
            e = min(n, r + step)
            yield QuantizedWeight(np.array(packed[r:e]), np.array(scales[r:e]),
                                  None if zeros is None else np.array(zeros[r:e]), bits, group, (e - r, k))


class Compensator:
    """What `calibrate.sequential_pass` calls with each Gram matrix: quantizes the matrices that read that
    input, spills them, and swaps the float weights in the layer's dict for the dequantized ones.

    A matrix the checkpoint already stores quantized (GPTQ / AWQ: `ckpt.imported`) is left as it is (the
    calibration already runs on its dequantized weights; the store imports its codes). A tied embedding
    table is also the lm_head: it gets the activation-weighted search ("calibrated") rather than GPTQ, whose
    error pushed across a row's columns would land on the embedding lookups, where no H says it may."""

    def __init__(self, ckpt, cfg, spec, spill: Spill, report=None, act_order: bool | None = None):
        self.ckpt, self.cfg, self.spec, self.spill = ckpt, cfg, spec, spill
        self.act_order = ACT_ORDER if act_order is None else act_order
        self.tied = cfg.tie_word_embeddings
        self.report = report or (lambda name: None)
        self.count = 0

    def _imported(self, part: str, n: int, k: int) -> bool:
        return hasattr(self.ckpt, "imported") and self.ckpt.imported(part, n, k) is not None

    def __call__(self, parts: list[str], h: np.ndarray, weights: dict | None, tokens: int) -> None:
        """Quantize matrices `parts` (checkpoint names without .weight), whose input's Gram matrix over
        `tokens` tokens is `h`; their float weights are in `weights` (a layer's dict), or, when None, read
        from the checkpoint in row chunks (the lm_head). `h` is consumed: factored in place."""
        k = h.shape[0]
        f = None
        imp = np.diagonal(h).astype(np.float32)
        for part in parts:
            name = f"{part}.weight"
            n = weights[name].shape[0] if weights is not None else self.cfg.vocab_size
            if self._imported(part, n, k):
                continue
            bits, group = self.spec.bits_for(part, self.tied), self.spec.group_for(part, self.tied)
            symmetric = self.spec.symmetric
            write = self.spill.writer(part, n, k, bits, group, symmetric)
            step = row_chunk(k)
            for r in range(0, n, step):
                rows = slice(r, min(n, r + step))
                w = weights[name][rows] if weights is not None else self.ckpt.tensor(name, (n, k), rows)
                if self.tied and part == "model.embed_tokens":
                    qw = quantize_weight(w, bits, group, symmetric, "calibrated", imp / max(tokens, 1))
                else:
                    if f is None:
                        f = factor(h, self.act_order, overwrite=True)  # H is not needed after this
                    qw = gptq(w, f, bits, group, symmetric, "calibrated")
                write(r, qw)
                if weights is not None:
                    weights[name][rows] = dequantize_weight(qw)
            self.count += 1
            self.report(part)
