"""A small value-returning ONNX graph builder and the one external weights file that graphs share.

    g = Graph("decode", weights)
    x = g.input("input_ids", INT64, ["batch", 1])
    y = g.op("Gather", g.weight("model.embed_tokens.weight", table), x)

Every op returns the name of its output value, generated from the current scope, so no caller invents
intermediate names; `out=` names a value the outside world sees (a graph output). Weights go to
`WeightFile`, written once however many graphs use them; small constants are stored inline.
"""
import contextlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # ONNX default domain
MS_OPSET = 1  # com.microsoft contrib ops
IR_VERSION = 10  # onnxruntime 1.2x-1.3x refuse the IR 14 that onnx 1.23 writes by default
INT64, INT32, FLOAT, BOOL = TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT, TensorProto.BOOL
FLOAT16 = TensorProto.FLOAT16
INT4, UINT4, INT8, UINT8 = TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8

_BIG = 1 << 20  # tensors from 1 MiB up start on a 64 KiB boundary so ORT can memory-map them
_BIG_ALIGN, _SMALL_ALIGN = 1 << 16, 64


class WeightFile:
    """One external-data file; each named tensor is written once and referenced by every graph."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._offset = 0
        self._protos: dict[str, TensorProto] = {}
        self.nbytes: dict[str, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._protos

    def add(self, name: str, array: np.ndarray, shape: tuple | None = None, elem_type: int | None = None) -> TensorProto:
        """Append `array` (once) and return an initializer that points at it. `shape` and `elem_type`
        declare another logical tensor over the same bytes (4-bit types: two values per byte)."""
        shape = tuple(array.shape) if shape is None else tuple(shape)
        if name in self._protos:
            proto = self._protos[name]
            assert tuple(proto.dims) == shape, f"{name} added twice with different shapes"
            return proto
        return self.add_chunks(name, [array], shape, elem_type or helper.np_dtype_to_tensor_dtype(array.dtype))

    def add_chunks(self, name: str, chunks, shape: tuple, elem_type: int) -> TensorProto:
        """Write one tensor from an iterable of arrays whose bytes, in order, are the tensor's (row blocks of
        a large matrix): only one block is ever in memory. Returns its initializer."""
        assert name not in self._protos, f"{name} written twice"
        nbytes = helper.tensor_dtype_to_np_dtype(elem_type).itemsize * int(np.prod(shape))
        if elem_type in (TensorProto.INT4, TensorProto.UINT4):
            nbytes = (int(np.prod(shape)) + 1) // 2
        align = _BIG_ALIGN if nbytes >= _BIG else _SMALL_ALIGN
        pad = -self._offset % align
        self._f.write(b"\0" * pad)
        self._offset += pad
        start = self._offset
        for chunk in chunks:
            self._f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            self._offset = self._f.tell()
        if self._offset - start != nbytes:
            raise ValueError(f"{name}: wrote {self._offset - start} bytes, its shape {list(shape)} needs {nbytes}")
        proto = self._external(name, shape, elem_type, start, nbytes)
        self._protos[name] = proto
        self.nbytes[name] = nbytes
        return proto

    def get(self, name: str) -> TensorProto:
        return self._protos[name]

    def view(self, name: str, source: str, shape: tuple, dtype) -> TensorProto:
        """A second initializer over the bytes of `source`, with another shape (stored once on disk)."""
        if name in self._protos:
            return self._protos[name]
        src = self._protos[source]
        offset = int(next(e.value for e in src.external_data if e.key == "offset"))
        proto = self._external(name, shape, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                               offset, self.nbytes[source])
        self._protos[name] = proto
        return proto

    def _external(self, name, shape, elem_type, offset, length) -> TensorProto:
        t = TensorProto(name=name, data_type=elem_type, dims=list(shape),
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", offset), ("length", length)):
            t.external_data.add(key=key, value=str(value))
        return t

    def close(self) -> None:
        """Flush the file to disk (the export renames its folder into place only after this)."""
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class Graph:
    """Collects nodes, inputs, outputs and initializers; `op` returns the name of the new value."""

    def __init__(self, name: str, weights: WeightFile):
        self.name = name
        self.weights = weights
        self.nodes, self.inputs, self.outputs = [], [], []
        self.initializers: dict[str, TensorProto] = {}
        self._consts: dict[tuple, str] = {}
        self._scope: list[str] = []
        self._count = 0

    @contextlib.contextmanager
    def scope(self, name: str):
        """Prefix the names of nodes and values made inside the block with `name/`."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _fresh(self, op_type: str) -> str:
        self._count += 1
        return "/".join(self._scope + [f"{op_type}_{self._count}"])

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, elem_type: int, shape: list) -> None:
        """Declare `value` (which must already carry its public name, see `op(out=...)`) as a graph output."""
        self.outputs.append(helper.make_tensor_value_info(value, elem_type, shape))

    def op(self, op_type: str, *inputs: str | None, out: str | None = None, domain: str = "", **attrs) -> str:
        """Add one node; `None` inputs become the empty name ONNX uses for a skipped optional input."""
        return self.op_multi(op_type, *inputs, n_out=1, outs=[out] if out else None, domain=domain, **attrs)[0]

    def op_multi(self, op_type: str, *inputs: str | None, n_out: int, outs: list | None = None,
                 domain: str = "", **attrs) -> list[str]:
        node_name = self._fresh(op_type)
        outs = [o or f"{node_name}:{i}" for i, o in enumerate(outs or [None] * n_out)]  # None: a fresh name
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":  # skipped optional inputs at the end are simply left out
            ins.pop()
        self.nodes.append(helper.make_node(op_type, ins, outs, name=node_name, domain=domain or None, **attrs))
        return outs

    def weight(self, name: str, array: np.ndarray | None = None) -> str:
        """An initializer in the shared external weights file: `array` is stored if given, else the
        tensor already stored under `name` (by this graph or another) is referenced."""
        self.initializers[name] = self.weights.add(name, array) if array is not None else self.weights.get(name)
        return name

    def weight_view(self, name: str, source: str, shape: tuple, dtype) -> str:
        """An initializer reading the bytes of weight `source` with another shape."""
        self.initializers[name] = self.weights.view(name, source, shape, dtype)
        return name

    def const(self, value, dtype=None) -> str:
        """A small constant stored inside the graph (deduplicated by value)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"const.{len(self._consts)}"
            self.initializers[name] = numpy_helper.from_array(array, name)
            self._consts[key] = name
        return self._consts[key]

    def to_model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  list(self.initializers.values()))
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            opsets.append(helper.make_opsetid("com.microsoft", MS_OPSET))
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="qwen-edge")
