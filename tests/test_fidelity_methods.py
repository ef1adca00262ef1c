"""Quantization methods beyond round-to-nearest, calibration statistics, and mixed precision."""
import numpy as np
import pytest
import torch

import toolkit
from export import QuantSpec, export
from export.calibrate import activation_stats, token_batches
from export.checkpoint import Checkpoint
from export.qwen2 import Qwen2Config
from export.quantize import dequantize, quantize
from test_graph import PROMPT, assert_greedy_follows_logits, dequantized_oracle, oracle_logits, step_logits
from test_quantize import run_one_node, weight
from tiny import CORPUS, oracle


def weighted_error(w, q, s, z, importance):
    return float((np.square(w - dequantize(q, s, z)) * importance).sum())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_search_never_loses_to_rtn_and_calibrated_wins_on_its_own_weighting(bits, symmetric):
    w = weight(n=64, k=256, seed=5)
    importance = np.random.default_rng(2).gamma(0.5, 2.0, 256).astype(np.float32)  # skewed, like activations
    flat = np.ones(256, np.float32)
    rtn = quantize(w, bits, 32, symmetric, "rtn")
    search = quantize(w, bits, 32, symmetric, "search")
    calibrated = quantize(w, bits, 32, symmetric, "calibrated", importance)
    assert weighted_error(w, *search, flat) < weighted_error(w, *rtn, flat)
    assert weighted_error(w, *calibrated, importance) <= weighted_error(w, *search, importance)
    for q, _, z in (search, calibrated):
        assert q.max() <= 2**bits - 1 and z.max() <= 2**bits - 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_runs_searched_weights_exactly(symmetric):
    """The search may produce negative scales (symmetric): MatMulNBits must take them as they are."""
    from onnx import helper, numpy_helper

    from export.quantize import dequantize_weight, quantize_weight

    w = weight(n=40, k=128, seed=9)
    qw = quantize_weight(w, 4, 32, symmetric, "search")
    inits = [numpy_helper.from_array(qw.packed, "b"), numpy_helper.from_array(qw.scales, "s")]
    names = ["x", "b", "s"]
    if not symmetric:
        inits.append(numpy_helper.from_array(qw.zero_points, "z"))
        names.append("z")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=128, N=40, bits=4, block_size=32)
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(run_one_node(node, {"x": x}, inits), x @ dequantize_weight(qw).T, atol=1e-4)


def test_calibration_statistics_match_the_oracles_activations(checkpoint):
    folder = checkpoint("untied_bf16")
    ckpt = Checkpoint(folder)
    cfg = Qwen2Config.from_dict(ckpt.config)
    tokens = token_batches(folder / "tokenizer.json", "".join(CORPUS), seq_len=32, max_sequences=3)
    ours = activation_stats(ckpt, cfg, tokens)
    ref, seen = oracle(folder), {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0]))
             for name, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        ref(torch.from_numpy(tokens))
    for h in hooks:
        h.remove()
    ranges = {name for name in ours if name.endswith(("k_range", "v_range"))}  # the KV cache's (test_kv_int8)
    assert set(seen) == set(ours) - ranges
    for name, x in seen.items():
        expected = x.reshape(-1, x.shape[-1]).square().mean(0).numpy()
        np.testing.assert_allclose(ours[name], expected, rtol=2e-3, atol=1e-6, err_msg=name)


def test_mixed_precision_export_matches_the_oracle_and_says_so(checkpoint, tmp_path):
    spec = QuantSpec(bits=4, group_size=16, symmetric=False, method="search", lm_head_bits=8, embed_bits=8,
                     int8_accuracy_level=0)
    folder = export(checkpoint("untied_bf16"), tmp_path / "m", spec, log=lambda m: None)
    man = toolkit.load(folder).manifest
    q = man["quantization"]
    assert q["method"] == "search" and q["lm_head_bits"] == 8
    assert q["quantized_tensors"]["lm_head.weight"] == 8 and q["quantized_tensors"]["model.embed_tokens.weight"] == 8
    assert q["quantized_tensors"]["model.layers.0.mlp.up_proj.weight"] == 4
    assert set(q["quantized_bytes_by_bits"]) == {"4", "8"}
    ids = toolkit.load(folder).tokenizer.encode(PROMPT)
    ours, tokens = step_logits(folder, ids, steps=3)
    ref = dequantized_oracle(checkpoint("untied_bf16"), 4, 16, False, method="search",
                             bits_for={"lm_head": 8, "model.embed_tokens": 8})
    assert np.abs(ours - oracle_logits(ref, tokens, len(ids))).max() <= 1e-4


def test_calibrated_export_runs_on_a_given_text(checkpoint, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("".join(CORPUS) * 3, encoding="utf-8")
    folder = export(checkpoint("tied_fp32"), tmp_path / "m", QuantSpec(bits=4, method="calibrated"),
                    log=lambda m: None, calibration=text, calibration_sequences=4)
    model = toolkit.load(folder)
    assert model.manifest["quantization"]["method"] == "calibrated"
    assert_greedy_follows_logits(model)


def test_int8_matrices_default_to_the_fast_kernel(checkpoint, tmp_path):
    """onnxruntime's CPU MatMulNBits has a fast 8-bit kernel only at accuracy level 4; the int4 default
    runs there too (faster, KL within 0.4 % of level 0 on the sample)."""
    import onnx

    folder = export(checkpoint("tied_fp32"), tmp_path / "m", QuantSpec.recommended(4), log=lambda m: None)
    levels = {(a.i) for n in onnx.load(folder / "decode.onnx", load_external_data=False).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}  # int4 layers and the int8 lm_head on the int8-activation kernels
    assert toolkit.load(folder).manifest["quantization"]["accuracy_level_int8"] == 4


def test_lm_head_and_embedding_group_sizes(checkpoint, tmp_path):
    """The accurate preset asks for lm_head groups of 128 and embedding groups of 64; a model whose hidden
    size (64) they do not divide gets the largest power of two that does; explicit sizes are kept."""
    import onnx

    spec = QuantSpec.recommended(4, preset="accurate", method="rtn")
    assert (spec.lm_head_group_size, spec.embed_group_size) == (128, 64)
    folder = export(checkpoint("untied_bf16"), tmp_path / "d", spec, log=lambda m: None)
    q = toolkit.load(folder).manifest["quantization"]
    assert q["lm_head_group_size"] == 64 and q["group_sizes"]["model.embed_tokens.weight"] == 64
    assert q["group_sizes"]["model.layers.0.mlp.up_proj.weight"] == 32

    spec = QuantSpec(bits=4, group_size=16, method="rtn", lm_head_bits=8, lm_head_group_size=32, embed_group_size=64)
    folder = export(checkpoint("untied_bf16"), tmp_path / "e", spec, log=lambda m: None)
    nodes = onnx.load(folder / "decode.onnx", load_external_data=False).graph.node
    blocks = {(n.op_type, a.i) for n in nodes for a in n.attribute if a.name == "block_size"}
    assert blocks == {("MatMulNBits", 16), ("MatMulNBits", 32), ("GatherBlockQuantized", 64)}
    assert_greedy_follows_logits(toolkit.load(folder))


@pytest.mark.parametrize("args,needles", [
    (["--lm-head-group-size", "48"], ["--lm-head-group-size 48", "power of two"]),
    (["--lm-head-group-size", "128"], ["--lm-head-group-size 128 does not divide hidden_size = 64"]),
    (["--embed-group-size", "512"], ["--embed-group-size 512", "power of two"]),
    (["--calibration", "/nonexistent/cal.txt"], ["--calibration /nonexistent/cal.txt", "readable UTF-8"]),
])
def test_bad_mixed_precision_options(args, needles, checkpoint, tmp_path):
    from test_cli import assert_bad_input, cli

    assert_bad_input(cli("export", checkpoint("tied_fp32"), tmp_path / "m", *args), *needles)
    assert not (tmp_path / "m").exists()
