"""Pre-quantized GPTQ / AWQ checkpoints: their integers reach MatMulNBits unchanged (export/prequantized.py),
against packers written from the published layouts (tests/prequant_checkpoint.py) and onnxruntime."""
import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from export.checkpoint import Checkpoint
from export.prequantized import (PrequantizedFormat, add_to_each, awq_packed, gptq_packed, unpack_columns,
                                 with_zero_points)
from export.quantize import dequantize_weight, unpack_nibbles
from prequant_checkpoint import (AWQ_ORDER, PROJECTIONS, choose_integers, contiguous, dequantize, gptq_v1_words,
                                 known_integers, make_prequantized_checkpoint, pack_along_columns, pack_along_rows,
                                 packed_tensors, quantization_config)
from toolkit.errors import ModelFolderError

# (method, bits, group_size, sym, checkpoint_format, n, k)
CASES = [("gptq", 4, 32, True, "gptq", 64, 256), ("gptq", 4, 64, False, "gptq", 48, 256),
         ("gptq", 4, 128, False, "gptq_v2", 64, 256), ("gptq", 4, -1, True, "gptq", 40, 192),
         ("gptq", 4, 1024, False, "gptq", 32, 2048), ("gptq", 8, 32, True, "gptq", 64, 128),
         ("gptq", 8, 64, False, "gptq", 48, 256), ("awq", 4, 32, False, "gptq", 64, 256),
         ("awq", 4, 128, False, "gptq", 40, 384), ("awq", 4, -1, False, "gptq", 32, 256)]
IDS = [f"{m}{b}-g{g}-{'sym' if s else 'asym'}-{f}" if m == "gptq" else f"awq-g{g}" for m, b, g, s, f, _, _ in CASES]


def linear_checkpoint(folder, method, bits, group_size, sym, checkpoint_format, n, k, seed=0, desc_act=False,
                      static_groups=False, act_order=False):
    """A one-Linear checkpoint "lin" [n, k] with known integers: (Checkpoint, format, known integers)."""
    rng = np.random.default_rng(seed)
    known = choose_integers(rng, rng.standard_normal((n, k)).astype(np.float32) * 0.05, bits, group_size,
                            sym and method == "gptq", act_order)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = contiguous(packed_tensors("lin", known, method, bits, checkpoint_format))
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"quantization_config": quantization_config(method, bits, group_size, sym, checkpoint_format,
                                                         desc_act, static_groups)}
    (folder / "config.json").write_text(json.dumps(config))
    return Checkpoint(folder), PrequantizedFormat.from_config(config, str(folder / "config.json")), known


def codes_of(qw) -> np.ndarray:
    """The [N, K] codes of a QuantizedWeight."""
    q = unpack_nibbles(qw.packed, qw.group_size) if qw.bits == 4 else qw.packed
    return q.reshape(qw.shape)


def zeros_of(qw) -> np.ndarray | None:
    """The [N, K/block] zero points of a QuantizedWeight, None when implicit."""
    if qw.zero_points is None:
        return None
    return unpack_nibbles(qw.zero_points, qw.scales.shape[1]) if qw.bits == 4 else qw.zero_points


def per_block(values: np.ndarray, qw) -> np.ndarray:
    """Per-group values [G, N] repeated to MatMulNBits' [N, K/block]."""
    return np.repeat(values, qw.scales.shape[1] // values.shape[0], axis=0).T


# --- the published word layouts, and packing round trips ---------------------------------------------------

def test_published_word_layouts():
    gptq = pack_along_rows(np.arange(1, 9, dtype=np.uint8).reshape(8, 1), 4)  # q[n=0, k=0..7] = 1..8
    assert gptq.view(np.uint32).tolist() == [[0x87654321]]
    assert gptq_packed(gptq, 4, 8).tolist() == [[[0x21, 0x43, 0x65, 0x87]]]  # low nibble first
    awq = pack_along_columns(np.arange(8, dtype=np.uint8).reshape(1, 8), 4, AWQ_ORDER)  # q[n=0..7, k=0]
    assert awq.view(np.uint32).tolist() == [[0x75316420]]
    assert unpack_columns(awq, 4, AWQ_ORDER).tolist() == [list(range(8))]
    zeros = pack_along_columns(np.full((1, 8), 8, np.uint8), 4)
    assert gptq_v1_words(zeros, 4).view(np.uint32).tolist() == [[0x77777777]]  # symmetric v1 stores 8 - 1
    assert unpack_columns(add_to_each(gptq_v1_words(zeros, 4), 1, 4), 4).tolist() == [[8] * 8]


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(24, 256), dtype=np.uint8)  # [N, K]
    qw_packed = gptq_packed(pack_along_rows(codes.T, bits), bits, 64)
    q = unpack_nibbles(qw_packed, 64) if bits == 4 else qw_packed
    np.testing.assert_array_equal(q.reshape(24, 256), codes)
    zeros = rng.integers(0, 1 << bits, size=(8, 24), dtype=np.uint8)  # [G, N], every value incl. 0 and max
    zeros[0, :8] = np.arange(8) % 2 * ((1 << bits) - 1)
    np.testing.assert_array_equal(unpack_columns(pack_along_columns(zeros, bits), bits), zeros)
    v1 = gptq_v1_words(pack_along_columns(zeros, bits), bits)
    np.testing.assert_array_equal(unpack_columns(add_to_each(v1, 1, bits), bits), zeros)


@pytest.mark.parametrize("k,n", [(256, 64), (4096, 800)])  # the second spans several output slices
def test_awq_packing_round_trips(k, n):
    rng = np.random.default_rng(k)
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    packed = awq_packed(pack_along_columns(codes.T, 4, AWQ_ORDER), 128)
    assert packed.shape == (n, k // 128, 64)
    np.testing.assert_array_equal(unpack_nibbles(packed, 128).reshape(n, k), codes)
    zeros = rng.integers(0, 16, size=(k // 128, n), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_columns(pack_along_columns(zeros, 4, AWQ_ORDER), 4, AWQ_ORDER), zeros)


# --- fmt.weight: the checkpoint's integers, bit for bit --------------------------------------------------

@pytest.mark.parametrize("method,bits,group_size,sym,checkpoint_format,n,k", CASES, ids=IDS)
def test_weight_carries_the_checkpoint_integers(tmp_path, method, bits, group_size, sym, checkpoint_format, n, k):
    ckpt, fmt, known = linear_checkpoint(tmp_path, method, bits, group_size, sym, checkpoint_format, n, k)
    qw = fmt.weight(ckpt, "lin", n, k)
    block = {-1: {192: 64, 256: 256}.get(k), 1024: 128}.get(group_size, group_size)  # largest up to 128 past 256
    assert qw.bits == bits and qw.shape == (n, k) and qw.group_size == fmt.block_size(k) == block
    assert qw.packed.dtype == np.uint8 and qw.packed.shape == (n, k // qw.group_size, qw.group_size * bits // 8)
    np.testing.assert_array_equal(codes_of(qw), known["codes"])
    assert qw.scales.dtype == np.float32
    np.testing.assert_array_equal(qw.scales, per_block(known["scales"], qw).astype(np.float32))
    if sym and method == "gptq":
        assert qw.zero_points is None  # every zero is the implicit 2^(bits-1)
    else:
        np.testing.assert_array_equal(zeros_of(qw), per_block(known["zeros"], qw))
    np.testing.assert_array_equal(dequantize_weight(qw), dequantize(known))  # the numpy reference, exactly


def run_matmul_nbits(qw, x):
    inits = [numpy_helper.from_array(qw.packed, "b"), numpy_helper.from_array(qw.scales, "s")]
    names = ["x", "b", "s"]
    if qw.zero_points is not None:
        inits.append(numpy_helper.from_array(qw.zero_points, "z"))
        names.append("z")
    n, k = qw.shape
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n, bits=qw.bits,
                            block_size=qw.group_size, accuracy_level=0)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("method,bits,group_size,sym,checkpoint_format,n,k", CASES, ids=IDS)
def test_ort_matmulnbits_computes_with_the_checkpoint_weights(tmp_path, method, bits, group_size, sym,
                                                              checkpoint_format, n, k):
    ckpt, fmt, known = linear_checkpoint(tmp_path, method, bits, group_size, sym, checkpoint_format, n, k, seed=1)
    qw = fmt.weight(ckpt, "lin", n, k)
    x = np.random.default_rng(2).standard_normal((3, k)).astype(np.float32)
    expected = x @ dequantize(known).T
    np.testing.assert_allclose(run_matmul_nbits(qw, x), expected, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(run_matmul_nbits(with_zero_points(qw), x), expected, atol=1e-4, rtol=1e-5)


# --- GPTQ v1 / v2 zero points, act-order ----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_v1_and_v2_store_the_same_weight_differently(tmp_path, bits):
    v1_ckpt, v1, known = linear_checkpoint(tmp_path / "v1", "gptq", bits, 32, False, "gptq", 64, 128, seed=5)
    v2_ckpt, v2, _ = linear_checkpoint(tmp_path / "v2", "gptq", bits, 32, False, "gptq_v2", 64, 128, seed=5)
    assert (v1.zero_offset, v2.zero_offset) == (1, 0)
    assert not np.array_equal(v1_ckpt.raw("lin.qzeros"), v2_ckpt.raw("lin.qzeros"))
    assert (known["zeros"] == 0).any() and (known["zeros"] == (1 << bits) - 1).any()  # the borrow case too
    a, b = v1.weight(v1_ckpt, "lin", 64, 128), v2.weight(v2_ckpt, "lin", 64, 128)
    for field in ("packed", "scales", "zero_points"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(zeros_of(a), per_block(known["zeros"], a))


def test_symmetric_v2_needs_no_zero_points_and_v1_sevens_are_eights(tmp_path):
    ckpt, fmt, _ = linear_checkpoint(tmp_path / "v2", "gptq", 4, 32, True, "gptq_v2", 32, 64)
    assert fmt.weight(ckpt, "lin", 32, 64).zero_points is None
    ckpt, fmt, _ = linear_checkpoint(tmp_path / "v1", "gptq", 4, 32, True, "gptq", 32, 64)
    assert (ckpt.raw("lin.qzeros").view(np.uint32) == 0x77777777).all()
    assert fmt.weight(ckpt, "lin", 32, 64).zero_points is None


def test_desc_act_with_in_order_groups_is_imported(tmp_path):
    ckpt, fmt, known = linear_checkpoint(tmp_path, "gptq", 4, 32, True, "gptq", 32, 128, desc_act=True,
                                         static_groups=True)
    np.testing.assert_array_equal(dequantize_weight(fmt.weight(ckpt, "lin", 32, 128)), dequantize(known))


def test_act_order_g_idx_is_refused_naming_the_tensor(tmp_path):
    ckpt, fmt, known = linear_checkpoint(tmp_path, "gptq", 4, 32, True, "gptq", 32, 128, desc_act=True,
                                         act_order=True)
    assert not np.array_equal(known["g_idx"], np.arange(128) // 32)
    with pytest.raises(ModelFolderError) as e:
        fmt.weight(ckpt, "lin", 32, 128)
    message = str(e.value)
    assert "\n" not in message and "lin.g_idx" in message and "desc_act" in message and str(tmp_path) in message


def test_missing_or_misshaped_tensors_are_named(tmp_path):
    ckpt, fmt, _ = linear_checkpoint(tmp_path, "awq", 4, 32, False, "gptq", 32, 128)
    with pytest.raises(ModelFolderError, match=r"lin\.qweight has shape \[128, 4\], expected \[128, 8\]"):
        fmt.weight(ckpt, "lin", 64, 128)
    with pytest.raises(ModelFolderError, match=r"other\.qweight is missing"):
        fmt.weight(ckpt, "other", 32, 128)
    with pytest.raises(ModelFolderError, match="group_size 32 does not divide 48"):
        fmt.expected_tensors("lin", 32, 48)


# --- config.json: what is imported, what is refused ---------------------------------------------------------

def gptq_config(**changes):
    return {"quantization_config": quantization_config("gptq", 4, 128, True, "gptq", False, False) | changes}


def awq_config(**changes):
    return {"quantization_config": quantization_config("awq", 4, 128, False, "gptq", False, False) | changes}


def test_formats_read_from_qwens_configs():
    assert PrequantizedFormat.from_config({"model_type": "qwen2"}, "config.json") is None
    assert PrequantizedFormat.from_config(gptq_config(), "c.json") == PrequantizedFormat("gptq", 4, 128, True, 1,
                                                                                          "c.json")
    assert PrequantizedFormat.from_config(gptq_config(checkpoint_format="gptq_v2", sym=False, bits=8),
                                          "c.json") == PrequantizedFormat("gptq", 8, 128, False, 0, "c.json")
    no_format = gptq_config()
    del no_format["quantization_config"]["checkpoint_format"]
    assert PrequantizedFormat.from_config(no_format, "c.json").zero_offset == 1  # v1 when absent
    assert PrequantizedFormat.from_config(awq_config(version="GEMM"), "c.json") == PrequantizedFormat(
        "awq", 4, 128, False, 0, "c.json")
    assert PrequantizedFormat.from_config(gptq_config(group_size=-1), "c.json").block_size(3584) == 128


def test_older_gptq_folders_with_quantize_config_json(tmp_path):
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64, "desc_act": False,
                                                               "sym": True}))
    fmt = PrequantizedFormat.from_folder(tmp_path, {"model_type": "qwen2"})
    assert fmt == PrequantizedFormat("gptq", 4, 64, True, 1, str(tmp_path / "quantize_config.json"))
    assert PrequantizedFormat.from_folder(tmp_path / "none", {}) is None


REFUSED = [
    (gptq_config(bits=3), "quantization_config.bits 3"),
    (gptq_config(bits=2), "quantization_config.bits 2"),
    (awq_config(bits=8), "quantization_config.bits 8 is not supported for awq"),
    (gptq_config(quant_method="bitsandbytes"), "quant_method 'bitsandbytes'"),
    (gptq_config(quant_method="fp8"), "quant_method 'fp8'"),
    (awq_config(version="gemv"), "version 'gemv'"),
    (awq_config(version="marlin"), "version 'marlin'"),
    (awq_config(zero_point=False), "zero_point False"),
    (awq_config(backend="llm-awq"), "backend 'llm-awq'"),
    (gptq_config(group_size=100), "group_size 100"),
    (gptq_config(group_size=8), "group_size 8"),
    (gptq_config(group_size=0), "group_size 0"),
    (gptq_config(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
    (gptq_config(pack_dtype="int16"), "pack_dtype 'int16'"),
    (gptq_config(dynamic={"-:.*down_proj": {}}), "dynamic"),
    ({"quantization_config": "gptq"}, "quantization_config is a str"),
]


@pytest.mark.parametrize("config,expected", REFUSED, ids=[e for _, e in REFUSED])
def test_unsupported_configs_are_refused_in_one_line(config, expected):
    with pytest.raises(ModelFolderError) as e:
        PrequantizedFormat.from_config(config, "/m/config.json")
    message = str(e.value)
    assert message.startswith("/m/config.json: ") and expected in message and "expected" in message
    assert "\n" not in message


def test_group_minus_one_over_an_odd_width_is_refused():
    fmt = PrequantizedFormat.from_config(gptq_config(group_size=-1), "c.json")
    with pytest.raises(ModelFolderError, match="c.json: group_size -1 over an input dimension of 40"):
        fmt.block_size(40)


# --- whole tiny checkpoints ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    from tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("prequant_base"), tied=False)


VARIANTS = {  # name -> make_prequantized_checkpoint keywords
    "gptq-sym-g32": dict(method="gptq", sym=True, group_size=32),
    "gptq-asym-g64-v2": dict(method="gptq", sym=False, group_size=64, checkpoint_format="gptq_v2"),
    "gptq-asym-g32-v1": dict(method="gptq", sym=False, group_size=32),
    "gptq8-sym-g32": dict(method="gptq", sym=True, group_size=32, bits=8),
    "awq-g32": dict(method="awq", group_size=32),
    "awq-g-1": dict(method="awq", group_size=-1),
}


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory, base_checkpoint):
    """prequantized(variant) -> (folder, quantized folder, dequantized folder), written once per module."""
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            made[name] = (folder, *make_prequantized_checkpoint(folder, base_checkpoint, **VARIANTS[name]))
        return made[name]

    return get


def linears(config: dict) -> list[tuple[str, int, int]]:
    """(prefix, n, k) of every projection of the tiny Qwen2."""
    h, i = config["hidden_size"], config["intermediate_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    shapes = dict(zip(PROJECTIONS, [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]))
    return [(f"model.layers.{layer}.{p}", *shapes[p]) for layer in range(config["num_hidden_layers"])
            for p in PROJECTIONS]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_checkpoint_imports_bit_exactly(variant, prequantized):
    folder, q_folder, d_folder = prequantized(variant)
    ckpt, float_ckpt = Checkpoint(q_folder), Checkpoint(d_folder)
    fmt = PrequantizedFormat.from_config(ckpt.config, str(q_folder / "config.json"))
    assert fmt.method == VARIANTS[variant]["method"]
    known = known_integers(folder)
    for prefix, n, k in linears(ckpt.config):
        assert fmt.provides(ckpt, prefix) and not ckpt.has(f"{prefix}.weight")
        for name, shape in fmt.expected_tensors(prefix, n, k).items():
            ckpt.check(name, shape)
        qw = fmt.weight(ckpt, prefix, n, k)
        np.testing.assert_array_equal(codes_of(qw), known[prefix]["codes"])
        np.testing.assert_array_equal(qw.scales, per_block(known[prefix]["scales"], qw).astype(np.float32))
        np.testing.assert_array_equal(dequantize_weight(qw), float_ckpt.tensor(f"{prefix}.weight", (n, k)))
    assert not fmt.provides(ckpt, "lm_head") and ckpt.raw("lm_head.weight").dtype == np.float16
    bias = fmt.bias(ckpt, "model.layers.0.self_attn.q_proj", 64)
    np.testing.assert_array_equal(bias, float_ckpt.tensor("model.layers.0.self_attn.q_proj.bias", (64,)))
    assert fmt.bias(ckpt, "model.layers.0.self_attn.o_proj", 64) is None


def test_dequantized_folder_loads_in_transformers(prequantized):
    import torch

    from tiny import oracle

    _, _, d_folder = prequantized("gptq-asym-g32-v1")
    ref = oracle(d_folder)
    expected = Checkpoint(d_folder).tensor("model.layers.1.mlp.down_proj.weight", (64, 128))
    np.testing.assert_array_equal(ref.model.layers[1].mlp.down_proj.weight.detach().numpy(), expected)
    with torch.no_grad():
        assert torch.isfinite(ref(torch.tensor([[1, 2, 3]])).logits).all()


def converter_imports_prequantized() -> bool:
    import export.convert

    return bool(getattr(export.convert, "PREQUANTIZED_SUPPORTED", False))


@pytest.mark.skipif(not converter_imports_prequantized(),
                    reason="export.convert does not import pre-quantized checkpoints yet (PREQUANTIZED_SUPPORTED)")
@pytest.mark.parametrize("variant", ["gptq-sym-g32", "gptq-asym-g64-v2", "awq-g32", "gptq8-sym-g32"])
def test_exported_prequantized_model_matches_oracle_on_dequantized_weights(variant, prequantized, tmp_path):
    """The layers keep the checkpoint's integers; embedding and lm_head follow the usual recipe (here rtn),
    so the oracle gets those two dequantized the same way. Accuracy level 0: float32 math throughout."""
    import torch

    import toolkit
    from export import QuantSpec, export
    from export.quantize import quantize_weight
    from tiny import oracle

    _, q_folder, d_folder = prequantized(variant)
    spec = QuantSpec.recommended(4, method="rtn", accuracy_level=0, int8_accuracy_level=0)
    out = export(q_folder, tmp_path / "out", spec, log=lambda m: None)
    ref = oracle(d_folder)
    fitted = spec.fit(ref.config.hidden_size)
    with torch.no_grad():
        for name, module in (("model.embed_tokens", ref.model.embed_tokens), ("lm_head", ref.lm_head)):
            w = module.weight.detach().numpy()
            qw = quantize_weight(w, fitted.bits_for(name, False), fitted.group_for(name, False), fitted.symmetric,
                                 "rtn")
            module.weight.copy_(torch.from_numpy(dequantize_weight(qw)))
    model = toolkit.load(out)
    ids = model.tokenizer.encode("def reverse(s):\n    return s[::-1]")
    ours = model.forward("prefill", np.array([ids]), np.ones((1, len(ids)), np.int64), model.new_cache(),
                         num_logits=len(ids))[0]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - expected).max() <= 1e-4


@pytest.mark.parametrize("variant", ["gptq-asym-g64-v2", "awq-g32"])
def test_exported_weights_file_holds_the_checkpoints_integers(variant, prequantized, tmp_path):
    """Bit-exact where it is stored: the exported folder's MatMulNBits blobs (q/k/v stacked, gate/up stacked,
    o, down), unpacked, are the integers and scales the checkpoint was packed from — with the default recipe
    (calibrated through the dequantized layers) for the float embedding and lm_head."""
    import json

    import onnx
    from onnx import numpy_helper

    from export import QuantSpec, export
    from export.quantize import unpack_nibbles
    from prequant_checkpoint import known_integers

    folder, q_folder, _ = prequantized(variant)
    out = export(q_folder, tmp_path / "out", QuantSpec.recommended(4), log=lambda m: None)
    graph = onnx.load(out / "prefill.onnx", load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(graph, str(out))
    stored = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    known = known_integers(folder)
    for i in range(2):
        for stack, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
                             ("self_attn.o_proj", ("self_attn.o_proj",)), ("mlp.down_proj", ("mlp.down_proj",))):
            p = f"model.layers.{i}"
            want = [known[f"{p}.{part}"] for part in parts]
            data = stored[f"{p}.{stack}.weight.qdata"]
            codes = unpack_nibbles(data, data.shape[-1] * 2).reshape(data.shape[0], -1)
            np.testing.assert_array_equal(codes, np.concatenate([w["codes"] for w in want]))
            scales = stored[f"{p}.{stack}.weight.scales"]
            np.testing.assert_array_equal(scales, np.concatenate([w["scales"].T.astype(np.float32) for w in want]))
            zeros = unpack_nibbles(stored[f"{p}.{stack}.weight.zero_points"], scales.shape[1])
            np.testing.assert_array_equal(zeros, np.concatenate([w["zeros"].T for w in want]))
    manifest = json.loads((out / "qwen-edge.json").read_text())
    assert manifest["quantization"]["imported"]["method"] == variant.split("-")[0]
