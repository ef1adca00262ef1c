"""`--kv-cache int8`: GroupQueryAttention keeps the KV cache in int8 with per-channel scales calibrated on
the calibration text (keys: the RoPE pair's norm, so the range holds at every position; values: max |v|)."""
import json
from pathlib import Path

import numpy as np
import pytest

import toolkit
from export import QuantSpec, export
from export.calibrate import activation_stats, token_batches
from export.checkpoint import Checkpoint
from export.qwen2 import Qwen2Config
from tiny import CORPUS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("kv")
    text = base / "calibration.txt"
    text.write_text("".join(CORPUS) * 3)
    out = {kv: export(checkpoint("untied_bf16"), base / kv, QuantSpec.recommended(4, method="rtn"), kv_cache=kv,
                      calibration=text, log=lambda m: None) for kv in ("float32", "int8")}
    return out, text


def test_int8_cache_is_int8_everywhere_and_generates(exports):
    (folders, _) = exports
    manifest = json.loads((folders["int8"] / "qwen-edge.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "int8" and manifest["kv_cache"]["scales"] == "per_channel"
    past = [i for i in manifest["graphs"]["prefill"]["inputs"] if i["name"].startswith("past_key_values")]
    assert past and all(i["dtype"] == "int8" for i in past)
    model = toolkit.load(folders["int8"])
    cache = model.new_cache()
    assert all(a.dtype == np.int8 for a in cache.arrays)
    chat = model.chat_session(temperature=0, max_new_tokens=8)
    chat.send("hello")
    chat.send("and again")  # a second turn reuses (and so cuts back) the int8 cache
    assert chat.context_used > 0


def test_scales_are_the_calibrated_ranges_over_127(exports, checkpoint):
    """The graph's scales are the calibration's ranges / 127."""
    import onnx
    from onnx import numpy_helper

    (folders, text) = exports
    folder = checkpoint("untied_bf16")
    ckpt = Checkpoint(folder)
    cfg = Qwen2Config.from_dict(ckpt.config)
    stats = activation_stats(ckpt, cfg, token_batches(folder / "tokenizer.json", text.read_text(), max_sequences=16))
    graph = onnx.load(folders["int8"] / "prefill.onnx", load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(graph, str(folders["int8"]))
    stored = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for i in range(cfg.num_hidden_layers):
        for kv in ("k", "v"):
            np.testing.assert_allclose(stored[f"model.layers.{i}.self_attn.{kv}_scale"].reshape(-1),
                                       stats[f"model.layers.{i}.self_attn.{kv}_range"].reshape(-1) / 127, rtol=1e-6)


def test_key_range_holds_at_every_position(checkpoint):
    """A key channel's range after RoPE (what the cache holds) is its pair's norm before RoPE, whatever the
    position: the range calibrated on 256-token sequences also bounds position 100,000."""
    from export.calibrate import rope, rope_tables

    cfg = Qwen2Config.from_dict(Checkpoint(checkpoint("untied_bf16")).config)
    positions = 512
    k = np.random.default_rng(0).standard_normal((1, 1, 1, cfg.head_dim)).astype(np.float32)
    k = np.broadcast_to(k, (1, 1, positions, cfg.head_dim))
    cos, sin = rope_tables(positions, cfg)
    half = cfg.head_dim // 2
    pair = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2)[0, 0, 0]
    rotated = np.abs(rope(k, cos, sin))[0, 0]  # [positions, D]
    assert (rotated <= np.concatenate([pair, pair]) * (1 + 1e-5)).all()


def test_int8_cache_follows_the_float_cache(exports):
    """On text like the calibration's, the int8 cache gives nearly the float cache's predictions (the tiny
    random model's logits are far more sensitive than a trained model's: see the sample test for the KL)."""
    (folders, _) = exports
    m32, m8 = toolkit.load(folders["float32"]), toolkit.load(folders["int8"])
    ids = m32.tokenizer.encode("".join(CORPUS[:4]))

    def logits(m):
        return m.forward("prefill", np.array([ids]), np.ones((1, len(ids)), np.int64), m.new_cache(),
                         num_logits=len(ids))[0]

    a, b = logits(m32), logits(m8)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8


def test_int8_cache_needs_fast_ops(checkpoint, tmp_path):
    with pytest.raises(toolkit.ArgumentError, match="--kv-cache int8: needs --ops fast"):
        export(checkpoint("untied_bf16"), tmp_path / "x", QuantSpec(4), kv_cache="int8", ops="portable")
    with pytest.raises(toolkit.ArgumentError, match="--kv-cache int4: expected one of float32, int8"):
        export(checkpoint("untied_bf16"), tmp_path / "x", QuantSpec(4), kv_cache="int4")


@pytest.mark.sample
def test_sample_int8_cache_kl(sample_hf, sample_int4, tmp_path):
    """The real model: int8 cache against the float cache, same int4 weights, on prose the calibration has
    not seen: mean KL below 0.01 nats and top-1 agreement above 95 %."""
    from toolkit.evaluate import evaluate_text

    i8 = export(sample_hf, tmp_path / "i8", QuantSpec(bits=4, group_size=32), kv_cache="int8", log=lambda m: None)
    text = (ROOT / "tests" / "data" / "prose.txt").read_text()[:6000]
    report = evaluate_text(toolkit.load(i8, threads=2), text, toolkit.load(sample_int4, threads=2), 512, 256)
    print(report)
    assert report["kl_mean"] < 0.01 and report["top1"] > 0.95
