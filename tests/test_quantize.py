"""Quantization primitives against a float reference, and ORT's kernels against a numpy dequant-matmul."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantize import (QuantSpec, dequantize, dequantize_weight, pack_nibbles, quantize, quantize_weight,
                             unpack_nibbles)
from toolkit.errors import ArgumentError

CASES = [(bits, sym, g) for bits in (4, 8) for sym in (True, False) for g in (16, 32, 64, 128)]


def weight(n=48, k=256, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero group
    w[1, :32] = np.abs(w[1, :32]) + 1  # an all-positive group (asymmetric must still reach zero)
    return w


@pytest.mark.parametrize("bits,sym,g", CASES)
def test_round_trip_error_within_half_a_step(bits, sym, g):
    w = weight()
    q, scales, zero = quantize(w, bits, g, sym)
    assert q.max() <= 2**bits - 1
    err = np.abs(w - dequantize(q, scales, zero)).reshape(w.shape[0], -1, g)
    assert np.all(err <= scales[..., None] / 2 * (1 + 1e-5) + 1e-7)
    assert np.all(dequantize(q, scales, zero)[0, :32] == 0)


@pytest.mark.parametrize("bits,sym,g", CASES)
def test_packed_weight_dequantizes_to_the_same_values(bits, sym, g):
    w = weight()
    q, scales, zero = quantize(w, bits, g, sym)
    np.testing.assert_array_equal(dequantize_weight(quantize_weight(w, bits, g, sym)), dequantize(q, scales, zero))


def test_nibble_packing_is_low_first_and_invertible():
    q = np.array([[1, 2, 3, 4, 5]], dtype=np.uint8)
    packed = pack_nibbles(q)
    assert packed.tolist() == [[0x21, 0x43, 0x05]]
    assert unpack_nibbles(packed, 5).tolist() == q.tolist()


@pytest.mark.parametrize("g", [8, 24, 512])
def test_bad_group_size_is_refused(g):
    with pytest.raises(ArgumentError, match="--group-size"):
        QuantSpec(bits=4, group_size=g)


def test_group_size_must_divide_k():
    with pytest.raises(ArgumentError, match="does not divide"):
        quantize(np.zeros((4, 96), np.float32), 4, 64)


def run_one_node(node, inputs: dict, initializers: list):
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                                            list(v.shape)) for k, v in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


@pytest.mark.parametrize("bits,sym,g", CASES)
def test_ort_matmulnbits_matches_numpy_dequant_matmul(bits, sym, g):
    w = weight(n=40, k=256, seed=bits + g)
    qw = quantize_weight(w, bits, g, sym)
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    inits = [numpy_helper.from_array(qw.packed, "b"), numpy_helper.from_array(qw.scales, "s")]
    names = ["x", "b", "s"]
    if not sym:
        inits.append(numpy_helper.from_array(qw.zero_points, "z"))
        names.append("z")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=256, N=40, bits=bits, block_size=g)
    y = run_one_node(node, {"x": x}, inits)
    np.testing.assert_allclose(y, x @ dequantize_weight(qw).T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bits,sym,g", [(4, True, 32), (4, False, 16), (8, True, 64), (8, False, 32)])
def test_ort_gather_block_quantized_reads_the_matmulnbits_blob(bits, sym, g):
    w = weight(n=40, k=256, seed=3)
    qw = quantize_weight(w, bits, g, sym)
    ids = np.array([[0, 5, 39, 1]], dtype=np.int64)
    rows = qw.packed.reshape(40, -1)  # the same bytes the embedding graph views
    inits = [numpy_helper.from_array(rows, "d"), numpy_helper.from_array(qw.scales, "s")]
    names = ["d", "ids", "s"]
    if not sym:
        inits.append(numpy_helper.from_array(qw.zero_points, "z"))
        names.append("z")
    node = helper.make_node("GatherBlockQuantized", names, ["y"], domain="com.microsoft", bits=bits, block_size=g,
                            gather_axis=0, quantize_axis=1)
    y = run_one_node(node, {"ids": ids}, inits)
    np.testing.assert_allclose(y, dequantize_weight(qw)[ids], atol=1e-6)
