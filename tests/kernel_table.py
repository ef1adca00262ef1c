"""Check an ONNX graph against the committed snapshot of onnxruntime's kernel table.

missing_kernels(model, "CUDAExecutionProvider") lists the nodes that provider has no kernel for,
at the model's opset and with the node's actual element types. The snapshot is
tests/data/ort_kernels.json, written by scripts/ort_kernel_table.py.
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto, helper

TABLE = Path(__file__).parent / "data" / "ort_kernels.json"
INT64_OUT = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}
BOOL_OUT = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}


def type_name(elem_type: int) -> str | None:
    """ONNX element type int -> kernel-table name: 1 -> 'float', 10 -> 'float16', 7 -> 'int64'."""
    return TensorProto.DataType.Name(elem_type).lower() if elem_type else None


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE)) -> dict:
    """The snapshot as written by scripts/ort_kernel_table.py."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _domain(domain: str) -> str:
    """'' and 'ai.onnx' are the same domain; the table calls it 'ai.onnx'."""
    return "ai.onnx" if domain in ("", "ai.onnx") else domain


@functools.lru_cache(maxsize=None)
def _ort_schemas() -> dict:
    """onnxruntime's registered schemas (com.microsoft and its extra ai.onnx ops), newest per op."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    schemas: dict = {}
    for s in get_all_operator_schema():
        key = (_domain(s.domain), s.name)
        if key not in schemas or s.since_version > schemas[key].since_version:
            schemas[key] = s
    return schemas


def _schema(domain: str, op: str, opset: int):
    """The op's schema at this opset: ONNX's own for the standard domains, else onnxruntime's."""
    if domain in ("ai.onnx", "ai.onnx.ml"):
        try:
            return onnx.defs.get_schema(op, opset, "" if domain == "ai.onnx" else domain)
        except onnx.defs.SchemaError:
            pass
    return _ort_schemas().get((domain, op))


def _type_str(param) -> str:
    """A formal parameter's type string ('T', 'tensor(int64)'); onnx and onnxruntime spell it differently."""
    return param.type_str if hasattr(param, "type_str") else param.typeStr


def _bindings(schema, node) -> dict:
    """Constraint name (and formal parameter name) -> the node's non-empty inputs/outputs bound to it."""
    bound = defaultdict(list)
    for params, names in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, name in enumerate(names):
            if i < len(params):
                param = params[i]
            elif params and "Variadic" in str(params[-1].option):
                param = params[-1]
            else:
                continue
            if name:
                bound[_type_str(param)].append(name)
                bound[param.name].append(name)
    return bound


def _attr(node, name: str):
    """The value of the node's attribute, or None."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _onnx_infer(node, types: dict, opset: int) -> list | None:
    """Output types by onnx's own inference for a standard-domain node, or None if it can't."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
        given = {n: helper.make_tensor_type_proto(TensorProto.DataType.Value(types[n].upper()), None)
                 for n in node.input if n in types}
        out = onnx.shape_inference.infer_node_outputs(schema, node, given, opset_imports=[helper.make_opsetid("", opset)])
    except Exception:
        return None
    found = [type_name(out[n].tensor_type.elem_type) if n in out else None for n in node.output]
    return found if any(found) else None


def _infer(node, types: dict, opsets: dict) -> list:
    """Output element types of one node from its input types (None where unknown)."""
    ins = [types.get(n) if n else None for n in node.input]
    first = ins[0] if ins else None
    n_out, op = len(node.output), node.op_type
    if _domain(node.domain) == "ai.onnx" and (found := _onnx_infer(node, types, opsets.get("ai.onnx", 1))):
        return found
    if op == "Cast":
        return [type_name(_attr(node, "to"))]
    if op == "CastLike":
        return [ins[1]]
    if op in INT64_OUT:
        return ["int64"] * n_out
    if op in BOOL_OUT:
        return ["bool"] * n_out
    if op in ("Constant", "ConstantOfShape"):
        value = _attr(node, "value")
        return [type_name(value.data_type) if value is not None else "float"]
    if op == "DequantizeLinear":
        return [ins[1]]
    if op == "GatherBlockQuantized":
        return [ins[2]]
    if op == "GroupQueryAttention":
        cache = ins[3] if len(ins) > 3 and ins[3] else first
        return [first, cache, cache, first][:n_out]
    if op in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization"):
        return [first, "float", "float", first][:n_out]
    if op in ("SimplifiedLayerNormalization", "LayerNormalization"):
        return [first] + ["float"] * (n_out - 1)
    return [first] * n_out  # MatMulNBits, Range, CumSum, Add, ...: the type of input 0


def element_types(model: onnx.ModelProto) -> dict:
    """Element type name of every tensor: graph inputs/outputs, value_info, initializers, node outputs."""
    g = model.graph
    types = {vi.name: type_name(vi.type.tensor_type.elem_type) for vi in [*g.input, *g.value_info, *g.output]
             if vi.type.tensor_type.elem_type}
    types.update({t.name: type_name(t.data_type) for t in g.initializer})
    opsets = {_domain(o.domain): o.version for o in model.opset_import}
    for node in g.node:  # ONNX keeps nodes in topological order
        for name, t in zip(node.output, _infer(node, types, opsets)):
            if name and t and name not in types:
                types[name] = t
    return types


def _in_range(row: dict, version: int) -> bool:
    """Whether a kernel row's [first, last] range holds version."""
    first, last = row["since"]
    return first <= version and (last is None or version <= last)


def missing_kernels(model: onnx.ModelProto | str | Path, provider: str, table_path: str | Path = TABLE) -> list[str]:
    """One line per node that provider has no kernel for (op, opset and element types); [] if all have one."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = load_table(str(table_path))["providers"][provider]
    opsets = {_domain(o.domain): o.version for o in model.opset_import}
    types = element_types(model)
    problems = []
    for node in model.graph.node:
        domain = _domain(node.domain)
        key, opset = f"{domain}:{node.op_type}", opsets.get(domain, 1)
        label = node.name or f"{node.op_type}->{node.output[0]}"
        schema = _schema(domain, node.op_type, opset)
        version = schema.since_version if schema is not None else opset
        rows = [r for r in table.get(key, []) if _in_range(r, version)]
        if not rows:
            have = ", ".join(f"{r['since'][0]}-{r['since'][1] or ''}" for r in table.get(key, []))
            problems.append(f"{label}: {key} opset {opset} has no {provider} kernel" + (f" (has opsets {have})" if have else ""))
            continue
        bound = _bindings(schema, node) if schema is not None else {}
        actual = {c: sorted({types[n] for n in names if types.get(n)}) for c, names in bound.items()}
        failures = []
        for row in rows:
            bad = [(c, t, allowed) for c, allowed in row["types"].items() for t in actual.get(c, []) if t not in allowed]
            if not bad:
                break
            failures = failures or bad
        else:
            what = ", ".join(f"{c}={t}" for c, t, _ in failures)
            has = "; ".join(f"{c}: {', '.join(a)}" if len(failures) > 1 else ", ".join(a) for c, _, a in failures)
            problems.append(f"{label}: {key} {what} has no {provider} kernel (has: {has})")
    return problems
