"""The onnxruntime kernel-table snapshot and the missing_kernels checker, on tiny hand-built graphs."""
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from kernel_table import load_table, missing_kernels

CPU, CUDA, DML = "CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider"
NP = {TP.FLOAT: np.float32, TP.FLOAT16: np.float16}


def model(nodes, inputs, outputs, inits=(), opset=21):
    """A model of one graph importing ai.onnx at opset and com.microsoft 1."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", opset),
                                                                  helper.make_opsetid("com.microsoft", 1)])


def matmul_nbits(dtype, k=32, n=8):
    """Y = A @ dequant(B): 4-bit weights, one block of 32 per row."""
    b = numpy_helper.from_array(np.random.default_rng(0).integers(0, 255, (n, 1, 16), dtype=np.uint8), "B")
    scales = numpy_helper.from_array(np.full(n, 0.01, NP[dtype]), "scales")
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], "mm", domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=32)
    return model([node], [helper.make_tensor_value_info("A", dtype, [1, k])],
                 [helper.make_tensor_value_info("Y", dtype, [1, n])], [b, scales])


def gather_block_quantized(dtype):
    """Embedding lookup from a 4-bit table with per-block scales."""
    data = numpy_helper.from_array(np.zeros((16, 16), np.uint8), "data")
    scales = numpy_helper.from_array(np.ones((16, 1), NP[dtype]), "scales")
    node = helper.make_node("GatherBlockQuantized", ["data", "ids", "scales"], ["emb"], "embed",
                            domain="com.microsoft", bits=4, block_size=32)
    return model([node], [helper.make_tensor_value_info("ids", TP.INT64, [1, 3])],
                 [helper.make_tensor_value_info("emb", dtype, [1, 3, 32])], [data, scales])


def group_query_attention(dtype):
    """One GQA node with a KV cache; built, never run."""
    io = helper.make_tensor_value_info
    node = helper.make_node(
        "GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total_len"],
        ["out", "present_k", "present_v"], "layers.0/attn/GroupQueryAttention", domain="com.microsoft",
        num_heads=4, kv_num_heads=2)
    inputs = [io(n, dtype, s) for n, s in [("q", [1, 1, 64]), ("k", [1, 1, 32]), ("v", [1, 1, 32]),
                                            ("past_k", [1, 2, 8, 16]), ("past_v", [1, 2, 8, 16])]]
    inputs += [io("seqlens_k", TP.INT32, [1]), io("total_len", TP.INT32, [])]
    return model([node], inputs, [io("out", dtype, [1, 1, 64])])


def test_matmul_nbits_float_and_float16():
    for provider in (CPU, CUDA):
        assert missing_kernels(matmul_nbits(TP.FLOAT), provider) == []
    for provider in (CPU, CUDA, DML):
        assert missing_kernels(matmul_nbits(TP.FLOAT16), provider) == []


def test_gather_block_quantized_has_no_dml_kernel():
    assert missing_kernels(gather_block_quantized(TP.FLOAT16), CPU) == []
    assert missing_kernels(gather_block_quantized(TP.FLOAT16), CUDA) == []
    [problem] = missing_kernels(gather_block_quantized(TP.FLOAT16), DML)
    assert problem.startswith("embed: com.microsoft:GatherBlockQuantized opset 1 has no DmlExecutionProvider")


def test_group_query_attention_float_only_on_cpu():
    assert missing_kernels(group_query_attention(TP.FLOAT), CPU) == []
    [problem] = missing_kernels(group_query_attention(TP.FLOAT), CUDA)
    assert problem == ("layers.0/attn/GroupQueryAttention: com.microsoft:GroupQueryAttention T=float, T_CACHE=float "
                       "has no CUDAExecutionProvider kernel (has: T: bfloat16, float16; "
                       "T_CACHE: bfloat16, float16, float8e4m3fn, int8)")
    assert missing_kernels(group_query_attention(TP.FLOAT16), CUDA) == []


def test_type_propagation_reaches_downstream_nodes(tmp_path):
    """An int64 Shape feeding a Cast to float16 then Neg: Neg's T is float16, known only by propagation."""
    io = helper.make_tensor_value_info
    nodes = [helper.make_node("Shape", ["x"], ["s"], "shape"),
             helper.make_node("Cast", ["s"], ["h"], "cast", to=TP.FLOAT16),
             helper.make_node("Neg", ["h"], ["y"], "neg")]
    m = model(nodes, [io("x", TP.FLOAT, [2, 3])], [io("y", TP.FLOAT16, [2])])
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    assert missing_kernels(path, CUDA) == []
    assert missing_kernels(path, CPU) == [
        "neg: ai.onnx:Neg T=float16 has no CPUExecutionProvider kernel (has: double, float, int16, int32, int64, int8)"]


def test_snapshot_matches_installed_onnxruntime():
    snapshot = load_table()["onnxruntime"].split(".")[:2]
    installed = ort.__version__.split(".")[:2]
    assert snapshot == installed, (
        f"tests/data/ort_kernels.json describes onnxruntime {'.'.join(snapshot)}, but {ort.__version__} is installed: "
        "refresh its CPU rows with `python scripts/ort_kernel_table.py --refresh-cpu` (and the pin in "
        "scripts/constraints.txt), or regenerate it from that release's docs/OperatorKernels.md with "
        "`python scripts/ort_kernel_table.py OperatorKernels.md --cpu-from-installed --source '<repo and commit>'`")


def test_cpu_table_agrees_with_a_real_session():
    """What the table says of CPU holds for the installed onnxruntime, both ways."""
    m = matmul_nbits(TP.FLOAT16)
    assert missing_kernels(m, CPU) == []
    session = ort.InferenceSession(m.SerializeToString(), providers=[CPU])
    [y] = session.run(None, {"A": np.ones((1, 32), np.float16)})
    assert y.shape == (1, 8) and y.dtype == np.float16

    io = helper.make_tensor_value_info
    neg = model([helper.make_node("Neg", ["x"], ["y"], "neg")], [io("x", TP.BFLOAT16, [2])], [io("y", TP.BFLOAT16, [2])])
    assert missing_kernels(neg, CPU) == [
        "neg: ai.onnx:Neg T=bfloat16 has no CPUExecutionProvider kernel (has: double, float, int16, int32, int64, int8)"]
    with pytest.raises(Exception, match="Could not find an implementation for Neg"):
        ort.InferenceSession(neg.SerializeToString(), providers=[CPU])


def test_parser_reads_the_docs_format():
    """scripts/ort_kernel_table.py on rows copied from OperatorKernels.md (CUDA and DML)."""
    spec = importlib.util.spec_from_file_location("ort_kernel_table", Path(__file__).parent.parent / "scripts" / "ort_kernel_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = "\n".join([
        "## Operators implemented by CUDAExecutionProvider", "",
        "| Op Name | Parameters | OpSet Version | Types Supported |",
        "|---------|------------|---------------|-----------------|",
        "|**Operator Domain:** *ai.onnx*||||",
        "|CumSum|*in* x:**T**<br> *in* axis:**T2**<br> *out* y:**T**|14+|**T** = tensor(double), tensor(float), "
        "tensor(float16), tensor(int32), tensor(int64), tensor(uint32), tensor(uint64)<br/> **T2** = tensor(int32), tensor(int64)|",
        "|||[11, 13]|**T** = tensor(double), tensor(float), tensor(int32), tensor(int64), tensor(uint32), tensor(uint64)"
        "<br/> **T2** = tensor(int32), tensor(int64)|",
        "| |", "| |",
        "## Operators implemented by DmlExecutionProvider", "",
        "|**Operator Domain:** *ai.onnx*||||",
        "|Sub|*in* A:**T**<br> *in* B:**T**<br> *out* C:**T**|14+|**T** = tensor(float), tensor(float16)|",
        "|||7+|**T** = tensor(float), tensor(float16), tensor(int64)|",
        "|ConcatFromSequence|*in* input_sequence:**S**<br> *out* concat_result:**T**|11+|**T** = seq(tensor(bool)), tensor(bool)|",
    ])
    table = tool.parse_markdown(text)
    assert table["CUDAExecutionProvider"]["ai.onnx:CumSum"] == [
        {"since": [14, None], "types": {"T": ["double", "float", "float16", "int32", "int64", "uint32", "uint64"],
                                        "T2": ["int32", "int64"]}},
        {"since": [11, 13], "types": {"T": ["double", "float", "int32", "int64", "uint32", "uint64"], "T2": ["int32", "int64"]}}]
    assert [r["since"] for r in table["DmlExecutionProvider"]["ai.onnx:Sub"]] == [[14, None], [7, 13]]
    assert table["DmlExecutionProvider"]["ai.onnx:ConcatFromSequence"][0]["types"] == {"T": ["bool", "seq(bool)"]}
