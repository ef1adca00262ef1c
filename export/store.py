"""The store pass: every tensor the graphs read is read from the checkpoint, quantized and written to the
one weights file, then released, before any graph is built. Graphs refer to the stored tensors by name
(export/layers.py); nothing is quantized while a graph is built.

    for each matrix of the plan (qwen2.matrices):        in file order, one at a time
        for each checkpoint part, in blocks of rows:     ≤ BLOCK_ELEMENTS floats in memory at once
            read (bf16/f16 widened) → quantize → append the codes to the file
        append the scales (and zero points): small, kept until the codes are written
    then the norms, biases and RoPE tables

Peak memory is one row block in float32 plus the quantizer's temporaries, and the scales of one matrix —
not the model, and not its largest matrix (a 7B's lm_head is 2.2 GB in float32). Rows are quantized
independently, so a block boundary changes nothing numerically.

How a matrix is laid out depends on its precision, its use and the backend (export/backend.py decides):
    layout   when                                   tensors (M = the matrix's graph name)
    nbits    bits 4/8, ops fast (any use)           M.weight.qdata [N, K/g, g·bits/8], .scales, .zero_points
    dq       bits 4/8, ops portable, matmul         M.weight.dq [K, N] int4/int8 (+ .scales, .zero_points)
    rows     bits 4/8, ops portable, embedding      M.weight.rows [V, H(/2)] (+ .scales, .zero_points)
    T        float, matmul                          M.weight.T [K, N] (MatMul reads it without a Transpose)
    table    float, embedding or lm_head            M.weight [N, K] (Gather; Gemm with transB); also the
             (and the DirectML embedding)           quantized export's embedding on DirectML
A tied embedding and lm_head share one blob when their layouts agree (nbits, table). Float tensors (scales,
biases, norm weights, float matrices) are stored in the activations' type: float32, or float16 for a GPU.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import portable
from export.backend import Fast
from export.onnx_builder import UINT8, WeightFile
from export.prequantized import with_zero_points
from export.quantize import QuantizedWeight, QuantSpec, quantize_weight
from toolkit.errors import ModelFolderError

BLOCK_ELEMENTS = 1 << 24  # floats read and quantized at once (64 MiB in float32)


@dataclass(frozen=True)
class Matrix:
    """A matrix the graphs multiply by (or gather from): checkpoint tensors `parts` stacked along rows."""

    name: str  # graph name: a checkpoint Linear ("…o_proj") or a stacked one ("…qkv_proj")
    parts: tuple  # ((checkpoint name without .weight, rows), …), stacked in this order
    k: int  # input features (columns)
    use: str = "matmul"  # "matmul", "lm_head" or "embedding": decides the float / portable layout
    bias: bool = False  # the parts have biases, stored stacked as `name`.bias

    @property
    def n(self) -> int:
        return sum(rows for _, rows in self.parts)


@dataclass(frozen=True)
class Stored:
    """How a matrix was stored: its layout (see the module docstring) and quantization."""

    layout: str
    bits: int = 32
    group_size: int | None = None
    symmetric: bool = True


@dataclass
class Store:
    """The weights file once written, and what the graphs and the manifest need to know about it."""

    file: WeightFile
    spec: QuantSpec
    backend: Fast  # export/backend.py: decides layouts and the float type of what is stored
    kv_cache: str = "float32"  # "int8": the graphs' GroupQueryAttention keeps an int8 cache (scales stored)
    matrices: dict = field(default_factory=dict)  # (graph name, use) -> Stored
    quantized: dict = field(default_factory=dict)  # checkpoint tensor -> bits (manifest)
    groups: dict = field(default_factory=dict)  # checkpoint tensor -> group size (manifest)
    float: list = field(default_factory=list)  # checkpoint tensors stored as float32 (manifest)

    def stored(self, name: str, use: str) -> Stored:
        return self.matrices[(name, use)]

    def summary(self) -> dict:
        return {"file": self.file.path.name, "quantized": self.quantized, "groups": self.groups,
                "float": self.float, "bytes": dict(self.file.nbytes)}


    def add_float(self, name: str, array: np.ndarray) -> None:
        """A float tensor (scales, bias, norm weight, table) in the activations' type."""
        self.file.add(name, np.asarray(array).astype(self.backend.dtype, copy=False))


class Progress:
    """Matrices done and time left, on one updating stderr line (at most twice a second)."""

    def __init__(self, total_elements: int, total_matrices: int, report):
        self.total, self.count = total_elements, total_matrices
        self.done = self.matrices = 0
        self.report = report  # callable(line: str, final: bool)
        self.start = self.last = time.time()

    def advance(self, elements: int = 0, matrices: int = 0) -> None:
        self.done += elements
        self.matrices += matrices
        now = time.time()
        if now - self.last >= 0.5 or self.matrices == self.count:
            self.last = now
            elapsed = now - self.start
            left = elapsed * (self.total - self.done) / self.done if self.done else 0.0
            self.report(f"quantizing: {self.matrices}/{self.count} matrices, {elapsed:.0f} s, "
                        f"~{left:.0f} s left", self.matrices == self.count)


def write_store(path: Path, ckpt, cfg, spec: QuantSpec, backend: Fast, plan: list[Matrix], vectors: dict,
                extra, importance: dict | None = None, report=None, kv_cache: str = "float32",
                spill=None) -> Store:
    """Write every tensor of `plan` (matrices), `vectors` ({checkpoint name: shape}, float32) and `extra`
    ((name, array) pairs, e.g. RoPE tables; may be a generator) to the weights file at `path`; returns the
    closed Store.

    A checkpoint that is already quantized (export/prequantized.py: its `imported`) supplies the codes and
    scales of its quantized Linears as they are; the rest follows the spec. `spill` (export/compensate.py's
    Spill, --method compensated) holds matrices already quantized: their codes are streamed from it."""
    store = Store(WeightFile(path), spec, backend, kv_cache)
    todo = {(m.name, backend.layout(spec.quantized, m.use)): m for m in reversed(plan)}.values()  # each blob once
    progress = Progress(sum(m.n * m.k for m in todo), sum(len(m.parts) for m in todo),
                        report or (lambda line, final: None))
    written: dict[tuple, Stored] = {}
    try:
        for m in plan:
            key = (m.name, backend.layout(spec.quantized, m.use))
            if key not in written:
                written[key] = _write_matrix(store, ckpt, cfg, m, key[1], importance or {}, progress, spill)
            store.matrices[(m.name, m.use)] = written[key]
            if m.bias and f"{m.name}.bias" not in store.file:
                store.add_float(f"{m.name}.bias", np.concatenate(
                    [_float(store, ckpt, f"{part}.bias", (rows,)) for part, rows in m.parts]))
        for name, shape in vectors.items():
            store.add_float(name, _float(store, ckpt, name, shape))
        for name, array in extra:
            store.file.add(name, array)  # as computed (RoPE tables in the activations' type, KV scales)
    finally:
        store.file.close()
    return store


def _float(store: Store, ckpt, name: str, shape: tuple, rows: slice = slice(None)) -> np.ndarray:
    if name not in store.float:
        store.float.append(name)
    return ckpt.tensor(name, shape, rows)


def _write_matrix(store: Store, ckpt, cfg, m: Matrix, kind: str, importance: dict, progress: Progress,
                  spill=None) -> Stored:
    if kind in ("T", "table"):
        return _write_float(store, ckpt, m, kind, progress)
    imported = _imported(ckpt, m)
    if imported is not None:  # as the checkpoint stores them
        first = next(iter(imported.values()))
        bits, group, symmetric = first.bits, first.group_size, first.zero_points is None

        def blocks(part: str, rows: int):
            yield imported[part]
            progress.advance(rows * m.k)
    else:
        spec = store.spec
        bits, group = spec.bits_for(m.parts[0][0], cfg.tie_word_embeddings), spec.group_for(m.parts[0][0],
                                                                                           cfg.tie_word_embeddings)
        symmetric = spec.symmetric

        def blocks(part: str, rows: int):
            """QuantizedWeights of row blocks of checkpoint matrix `part` [rows, k]."""
            method = spec.method
            step = max(1, BLOCK_ELEMENTS // m.k)
            if spill is not None and part in spill:  # compensated: quantized by the calibration pass
                for qw in spill.blocks(part, step):
                    yield qw
                    progress.advance(qw.shape[0] * m.k)
                return
            if method in ("calibrated", "compensated") and part not in importance:  # an untied embedding:
                method = "search"  # no matmul input
            for r in range(0, rows, step):
                w = ckpt.tensor(f"{part}.weight", (rows, m.k), slice(r, min(rows, r + step)))
                yield quantize_weight(w, bits, group, symmetric, method, importance.get(part))
                progress.advance(w.size)

    for part, _ in m.parts:
        store.quantized[f"{part}.weight"] = bits
        store.groups[f"{part}.weight"] = group
    if kind == "nbits":
        _write_nbits(store, m, bits, group, symmetric, blocks, progress)
    else:  # portable: the whole matrix's codes are rearranged (transposed, or unpacked), so kept at once
        qws = [QuantizedWeight.concatenate(list(blocks(part, rows))) for part, rows in m.parts]
        progress.advance(matrices=len(m.parts))
        if kind == "dq":
            portable.store_dequantized_matrix(store.file, m.name, qws)
        else:
            portable.store_embedding(store.file, m.name, qws[0])
    return Stored(kind, bits, group, symmetric)


def _imported(ckpt, m: Matrix) -> dict | None:
    """{part: QuantizedWeight} of `m` when the checkpoint stores its parts quantized (GPTQ / AWQ), else None.
    Parts stacked into one MatMulNBits must agree on bits and block size; zero points are written out for
    all when any part has them."""
    if not hasattr(ckpt, "imported"):
        return None
    qws = [ckpt.imported(part, rows, m.k) for part, rows in m.parts]
    if all(q is None for q in qws):
        return None
    if any(q is None for q in qws) or len({(q.bits, q.group_size) for q in qws}) != 1:
        raise ModelFolderError(f"{ckpt.folder}: {', '.join(p for p, _ in m.parts)} are stored with different "
                               "quantization; expected the same bits and group size for all")
    if any(q.zero_points is not None for q in qws):
        qws = [with_zero_points(q) for q in qws]
    return {part: q for (part, _), q in zip(m.parts, qws)}


def _write_nbits(store: Store, m: Matrix, bits: int, group: int, symmetric: bool, blocks, progress) -> None:
    """MatMulNBits' blob: the codes of every part's row blocks streamed in order, then scales and zeros."""
    scales, zeros = [], []

    def codes():
        for part, rows in m.parts:
            for qw in blocks(part, rows):
                if (qw.bits, qw.group_size, qw.zero_points is None) != (bits, group, symmetric):
                    raise ValueError(f"{m.name}: {part} is stored with other bits, group size or symmetry")
                scales.append(qw.scales)
                zeros.append(qw.zero_points)
                yield qw.packed
            progress.advance(matrices=1)

    store.file.add_chunks(f"{m.name}.weight.qdata", codes(), (m.n, m.k // group, group * bits // 8), UINT8)
    store.add_float(f"{m.name}.weight.scales", np.concatenate(scales))
    if not symmetric:
        store.file.add(f"{m.name}.weight.zero_points", np.concatenate(zeros))


def _write_float(store: Store, ckpt, m: Matrix, kind: str, progress: Progress) -> Stored:
    if kind == "table":  # [N, K] as stored: streamed in row blocks
        (part, rows), = m.parts
        step = max(1, BLOCK_ELEMENTS // m.k)

        def blocks():
            for r in range(0, rows, step):
                block = _float(store, ckpt, f"{part}.weight", (rows, m.k), slice(r, min(rows, r + step)))
                progress.advance(block.size)
                yield block
            progress.advance(matrices=1)

        store.file.add_chunks(f"{m.name}.weight", (b.astype(store.backend.dtype, copy=False) for b in blocks()),
                              (rows, m.k), store.backend.elem)
    else:  # [K, N]: the transpose needs the whole (stacked) matrix
        w = np.concatenate([_float(store, ckpt, f"{part}.weight", (rows, m.k)) for part, rows in m.parts])
        store.add_float(f"{m.name}.weight.T", w.T)
        progress.advance(w.size, len(m.parts))
    return Stored(kind)
