"""--method compensated: GPTQ (export/compensate.py) against the group search, its packing against ORT's
MatMulNBits, the sequential calibration pass end to end, and its bounded memory (row chunks, spill files)."""
import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper

import toolkit
from export import QuantSpec, export
from export import compensate as comp
from export.compensate import Compensator, Spill, compensate, factor, gptq, inverse_factor
from export.quantize import dequantize_weight, quantize_weight
from test_quantize import run_one_node
from tiny import oracle


def correlated(t=2048, k=256, n=64, seed=0):
    """Inputs X [t, k] with correlated channels and a few large-scale ones (as LLM activations have), a weight
    W [n, k], and H = XᵀX in float64."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k, dtype=np.float32) + 0.7 * rng.standard_normal((k, k)).astype(np.float32) / k ** 0.5
    x = rng.standard_normal((t, k)).astype(np.float32) @ mix
    x[:, rng.choice(k, 4, replace=False)] *= 20
    w = 0.05 * rng.standard_normal((n, k)).astype(np.float32)
    return x, w, x.T.astype(np.float64) @ x


def output_error(x, w, w_hat):
    return float(np.square(x @ (w - w_hat).T).sum())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_gptq_output_error_beats_the_calibrated_search_and_rtn(symmetric, group, act_order):
    x, w, h = correlated()
    ours = output_error(x, w, dequantize_weight(compensate(w, h, 4, group, symmetric, act_order=act_order)))
    calibrated = output_error(x, w, dequantize_weight(
        quantize_weight(w, 4, group, symmetric, "calibrated", np.diagonal(h).astype(np.float32))))
    rtn = output_error(x, w, dequantize_weight(quantize_weight(w, 4, group, symmetric, "rtn")))
    assert ours < 0.9 * calibrated and ours < rtn, (ours, calibrated, rtn)


def test_inverse_factor_is_the_upper_cholesky_of_the_damped_inverse_and_zeroes_dead_channels():
    x, w, h = correlated(t=512, k=64, n=8)
    h[5, :], h[:, 5] = 0.0, 0.0  # channel 5 never active
    u, dead = inverse_factor(h)
    assert dead.tolist() == [i == 5 for i in range(64)]
    assert np.allclose(u, np.triu(u)) and (np.diagonal(u) > 0).all()
    fixed = h.copy()
    fixed[5, 5] = 1.0
    damped = fixed + 0.01 * np.mean(np.diagonal(fixed)) * np.eye(64)
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.linalg.inv(damped), rtol=1e-3, atol=1e-7)
    w[:, 5] = 7.0
    assert (dequantize_weight(compensate(w, h, 4, 32, False))[:, 5] == 0).all()


def test_indefinite_h_gets_ten_times_the_damping_until_cholesky_succeeds():
    a = np.arange(10, 42, dtype=np.float64)
    mean = np.mean(a * a)
    h = np.outer(a, a) - 0.05 * mean * np.eye(32)  # eigenvalues -0.05 mean: 1 % damping is not enough, 10 % is
    u, dead = inverse_factor(h)
    assert not dead.any() and np.isfinite(u).all()
    damped = h + 0.1 * np.mean(np.diagonal(h)) * np.eye(32)
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.linalg.inv(damped), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bits,symmetric,group,act_order", [(4, True, 32, False), (4, False, 128, False),
                                                             (8, False, 32, False), (8, True, 64, False),
                                                             (4, False, 32, True), (4, True, 64, True)])
def test_packed_result_is_what_gptq_computed_and_what_matmulnbits_multiplies_by(bits, symmetric, group, act_order):
    x, w, h = correlated(t=512, k=128, n=40, seed=bits + group)
    computed = np.full(w.shape, np.nan, np.float32)
    qw = gptq(w, factor(h, act_order), bits, group, symmetric, out=computed)
    assert (qw.bits, qw.group_size, qw.shape, qw.zero_points is None) == (bits, group, w.shape, symmetric)
    np.testing.assert_array_equal(dequantize_weight(qw), computed)
    inits = [numpy_helper.from_array(qw.packed, "b"), numpy_helper.from_array(qw.scales, "s")]
    names = ["x", "b", "s"] + ([] if symmetric else ["z"])
    if not symmetric:
        inits.append(numpy_helper.from_array(qw.zero_points, "z"))
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=128, N=40, bits=bits,
                            block_size=group)
    xs = x[:3] / 20
    np.testing.assert_allclose(run_one_node(node, {"x": xs}, inits), xs @ computed.T, rtol=1e-4, atol=1e-4)


def test_rows_are_processed_in_bounded_chunks_with_the_same_result(monkeypatch):
    x, w, h = correlated(t=512, k=64, n=300)
    whole = compensate(w, h, 4, 32, False)
    seen = []
    real = comp.gptq

    def recording(rows, *args, **kwargs):
        seen.append(rows.shape[0])
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(comp, "ROW_ELEMENTS", 64 * 64)  # 64 rows of K = 64 at a time
    monkeypatch.setattr(comp, "gptq", recording)
    chunked = compensate(w, h, 4, 32, False)
    assert seen == [64, 64, 64, 64, 44]
    for a, b in ((whole.packed, chunked.packed), (whole.scales, chunked.scales),
                 (whole.zero_points, chunked.zero_points)):
        np.testing.assert_array_equal(a, b)


class FakeCheckpoint:
    """An lm_head read through Checkpoint.tensor's row slices, which it records."""

    def __init__(self, w):
        self.w, self.slices = w, []

    def tensor(self, name, shape, rows=slice(None)):
        assert name == "lm_head.weight" and shape == self.w.shape
        self.slices.append(rows)
        return self.w[rows]


def test_lm_head_is_read_compensated_and_spilled_in_row_chunks(monkeypatch, tmp_path):
    from types import SimpleNamespace

    x, w, h = correlated(t=512, k=64, n=300)
    monkeypatch.setattr(comp, "ROW_ELEMENTS", 100 * 64)
    ckpt = FakeCheckpoint(w)
    cfg = SimpleNamespace(tie_word_embeddings=False, vocab_size=300)
    spec = QuantSpec(bits=4, group_size=16, symmetric=False, method="compensated", lm_head_bits=8,
                     lm_head_group_size=32)
    spill = Spill(tmp_path / ".compensated")
    Compensator(ckpt, cfg, spec, spill)(["lm_head"], h.copy(), None, 512)  # it consumes its H
    assert [(s.start, s.stop) for s in ckpt.slices] == [(0, 100), (100, 200), (200, 300)]
    got = QuantizedWeightOf(spill.blocks("lm_head", 128))
    want = compensate(w, h, 8, 32, False)
    assert got.bits == 8 and got.group_size == 32 and got.shape == (300, 64)
    np.testing.assert_array_equal(dequantize_weight(got), dequantize_weight(want))
    assert sorted(p.name for p in spill.folder.iterdir()) == [
        "lm_head.packed.npy", "lm_head.scales.npy", "lm_head.zero_points.npy"]


def QuantizedWeightOf(blocks):
    from export.quantize import QuantizedWeight

    return QuantizedWeight.concatenate(list(blocks))


def kl_to_oracle(folder, src, text_ids):
    model = toolkit.load(folder)
    ids = np.array([text_ids], dtype=np.int64)
    ours = model.forward("prefill", ids, np.ones_like(ids), model.new_cache(1), num_logits=ids.shape[1])[0]
    with torch.no_grad():
        ref = oracle(src)(torch.from_numpy(ids)).logits[0].double()
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(torch.from_numpy(ours).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("name", ["tied_fp32", "untied_bf16"])
def test_compensated_export_tracks_the_oracle_better_than_calibrated(name, checkpoint, tmp_path):
    """The sequential GPTQ pass end to end: the manifest says so, no spill file survives, greedy decoding
    works, and the logits on held-out prose are closer to transformers' float model than calibrated's."""
    from pathlib import Path

    from export.calibrate import default_text, token_batches
    from test_graph import assert_greedy_follows_logits

    src = checkpoint(name)
    text = (Path(__file__).parent / "data" / "prose.txt").read_text(encoding="utf-8")
    kl = {}
    for method in ("calibrated", "compensated"):
        spec = QuantSpec(bits=4, group_size=16, symmetric=False, method=method, lm_head_bits=4, embed_bits=8,
                         int8_accuracy_level=0)
        logs = []
        folder = export(src, tmp_path / method, spec, log=logs.append)
        model = toolkit.load(folder)
        assert model.manifest["quantization"]["method"] == method
        # the shipped text, all of it that fits (compensated asks for 128 slices; calibrated for 16)
        calibration = model.manifest["quantization"]["calibration"]
        assert calibration["text"] is None and calibration["sequence_length"] == 256
        available = token_batches(folder / "tokenizer.json", default_text(), max_sequences=1 << 20).shape[0]
        assert calibration["sequences"] == min(available, {"calibrated": 16, "compensated": 128}[method])
        kl[method] = kl_to_oracle(folder, src, model.tokenizer.encode(text)[:400])
        if method == "compensated":
            assert any(line.startswith("compensated: ") and "peak RSS" in line for line in logs), logs
            assert not list(tmp_path.rglob("*.npy")) and not list(tmp_path.rglob(".compensated"))
            assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrated", "compensated"]  # no partial left
            assert_greedy_follows_logits(model)
    assert kl["compensated"] < 0.85 * kl["calibrated"], kl


def test_compensated_export_with_an_int8_kv_cache(checkpoint, tmp_path):
    """The sequential pass also supplies the KV cache's channel ranges (of the quantized model)."""
    from test_graph import assert_greedy_follows_logits

    folder = export(checkpoint("tied_fp32"), tmp_path / "m", QuantSpec(bits=4, method="compensated"),
                    log=lambda m: None, calibration_sequences=4, kv_cache="int8")
    model = toolkit.load(folder)
    assert model.manifest["quantization"]["calibration"] == {"text": None, "sequences": 4, "sequence_length": 256}
    assert_greedy_follows_logits(model)


def test_cli_offers_compensated_and_refuses_unknown_methods(checkpoint, tmp_path):
    from test_cli import assert_bad_input, cli

    result = cli("export", "--help")
    assert "compensated" in result.stdout
    assert_bad_input(cli("export", checkpoint("tied_fp32"), tmp_path / "m", "--method", "gptq"), "--method")
    with pytest.raises(Exception, match="--method gptq"):
        QuantSpec(bits=4, method="gptq")


@pytest.mark.parametrize("k", [64, 2500])
def test_gram_accumulates_x_transpose_x_over_chunks(k):
    """Wide inputs (down_proj) take the blocked lower triangle, mirrored: the same H."""
    from export.calibrate import gram

    rng = np.random.default_rng(k)
    chunks = [rng.standard_normal((2, 30, k)).astype(np.float32) for _ in range(3)]
    want = sum(c.reshape(-1, k).T.astype(np.float64) @ c.reshape(-1, k) for c in chunks)
    got = gram(iter(chunks))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
