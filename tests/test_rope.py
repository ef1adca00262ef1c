"""export/rope.py: RoPE and YaRN tables against transformers' Qwen2RotaryEmbedding, the rope_scaling
refusals, a YaRN checkpoint exported and run end to end, and the calibration forward on it."""
import json

import numpy as np
import pytest
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from export import rope
from tiny import make_checkpoint, oracle
from toolkit.errors import ModelFolderError

SOURCE = "ckpt/config.json"
QWEN25 = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}  # the model cards' snippet

# (head_dim, rope_theta, max_position_embeddings, rope_scaling, positions)
CASES = {
    "default": (64, 10000.0, 128, None, np.arange(300)),
    "default_type": (128, 1e6, 32768, {"rope_type": "default"}, [0, 1, 7, 4095, 32767, 40000]),
    "qwen2.5_card": (128, 1e6, 32768, QWEN25, [0, 1, 2, 100, 32767, 32768, 65536, 131071]),
    "post_yarn_max": (64, 10000.0, 128, {"rope_type": "yarn", "factor": 2.0,
                                          "original_max_position_embeddings": 64}, np.arange(300)),
    "no_original": (16, 10000.0, 64, {"type": "yarn", "factor": 4}, np.arange(300)),
    "betas_untruncated": (64, 1e6, 4096, {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0,
                                          "beta_slow": 2.0, "truncate": False}, [0, 5, 4096, 20000, 32767]),
    "mscale_pair": (128, 10000.0, 4096, {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                                         "mscale_all_dim": 1.0}, [0, 3, 4095, 100000, 163839]),
    "mscale_alone": (64, 10000.0, 256, {"rope_type": "yarn", "factor": 4.0, "mscale": 0.5}, np.arange(0, 1024, 7)),
    "attention_factor": (64, 10000.0, 256, {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.0,
                                            "mscale": 2.0, "mscale_all_dim": 1.0}, np.arange(0, 1024, 7)),
    "ramp_collapses": (16, 10000.0, 6, {"rope_type": "yarn", "factor": 2.0}, np.arange(40)),  # lo == hi == 0
}


def transformers_rope(head_dim, theta, max_positions, rope_scaling, positions):
    """(inv_freq, attention_scaling, cos, sin) of transformers' Qwen2RotaryEmbedding, tables half-width."""
    cfg = HFQwen2Config(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2,
                        rope_theta=theta, max_position_embeddings=max_positions,
                        rope_scaling=dict(rope_scaling) if rope_scaling else None)
    emb = Qwen2RotaryEmbedding(cfg)
    cos, sin = emb(torch.zeros(1), torch.tensor([list(positions)]))
    half = head_dim // 2
    return (emb.inv_freq.double().numpy(), emb.attention_scaling,
            cos[0, :, :half].double().numpy(), sin[0, :, :half].double().numpy())


def scaling_of(max_positions, rope_scaling):
    return rope.RopeScaling.from_config({"max_position_embeddings": max_positions, "rope_scaling": rope_scaling},
                                        SOURCE)


@pytest.mark.parametrize("name", CASES)
def test_tables_match_transformers(name):
    head_dim, theta, max_positions, rope_scaling, positions = CASES[name]
    scaling = scaling_of(max_positions, rope_scaling)
    assert (scaling is None) == (name.startswith("default"))
    ref_inv_freq, ref_m, ref_cos, ref_sin = transformers_rope(head_dim, theta, max_positions, rope_scaling, positions)
    ours = rope.inv_freq(head_dim, theta, scaling)
    assert ours.dtype == np.float64 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, ref_inv_freq, rtol=1e-6)  # transformers works in float32
    assert rope.attention_factor(scaling) == pytest.approx(ref_m, rel=1e-12)
    cos, sin = rope.tables(head_dim, theta, np.asarray(positions), scaling)
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == sin.shape == (len(positions), head_dim // 2)
    # transformers multiplies position by inv_freq in float32: its angle is off by a few ulps of the angle
    # (1e-2 rad at position 131071), so the tolerance grows with the angle; ours is float64 throughout
    angle = np.outer(np.asarray(positions, np.float64), ours)
    tol = ref_m * (1e-6 + 2.0 ** -20 * angle)
    assert np.all(np.abs(cos - ref_cos) <= tol) and np.all(np.abs(sin - ref_sin) <= tol)
    small = angle < 1.0  # where float32 angles are exact enough: ~1e-6 relative
    np.testing.assert_allclose(cos[small], ref_cos[small], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sin[small], ref_sin[small], rtol=1e-6, atol=1e-7)


def test_tables_take_a_count_or_positions():
    scaling = scaling_of(32768, QWEN25)
    cos, sin = rope.tables(128, 1e6, 300, scaling)
    again = rope.tables(128, 1e6, np.arange(300), scaling)
    assert cos.shape == (300, 64)
    np.testing.assert_array_equal(cos, again[0])
    np.testing.assert_array_equal(sin, again[1])
    m = rope.attention_factor(scaling)
    np.testing.assert_allclose(cos[0], m, rtol=1e-7)  # position 0: cos = m, sin = 0
    np.testing.assert_array_equal(sin[0], 0)
    np.testing.assert_allclose(cos.astype(np.float64) ** 2 + sin.astype(np.float64) ** 2, m * m, rtol=1e-6)


def test_from_config_reads_qwen25_card():
    scaling = scaling_of(32768, QWEN25)
    assert scaling == rope.RopeScaling(factor=4.0, original_max_position_embeddings=32768)
    assert scaling.type == "yarn" and scaling.beta_fast == 32.0 and scaling.beta_slow == 1.0
    assert scaling.truncate is True and scaling.attention_factor is None
    assert rope.attention_factor(scaling) == pytest.approx(0.1 * np.log(4.0) + 1)
    # newer configs: "rope_type"; both keys agreeing; an int factor; no original -> max_position_embeddings
    assert scaling_of(32768, {**QWEN25, "rope_type": "yarn"}) == scaling
    assert scaling_of(32768, {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}) == scaling
    assert scaling_of(32768, {"rope_type": "yarn", "factor": 4.0}) == scaling
    assert scaling_of(32768, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": None}) == scaling
    assert rope.RopeScaling.from_config({"rope_scaling": {"type": "yarn", "factor": 4.0}}, SOURCE) == scaling


@pytest.mark.parametrize("rope_scaling", ["absent", None, {}, {"type": "default"},
                                          {"rope_type": "default", "factor": 1.0}])
def test_plain_rope_is_none(rope_scaling):
    config = {"max_position_embeddings": 32768}
    if rope_scaling != "absent":
        config["rope_scaling"] = rope_scaling
    assert rope.RopeScaling.from_config(config, SOURCE) is None
    assert rope.context_length(32768, None) == 32768
    assert rope.attention_factor(None) == 1.0


def test_context_length():
    assert rope.context_length(32768, scaling_of(32768, QWEN25)) == 131072  # Qwen2.5: the card's promise
    assert rope.context_length(131072, scaling_of(131072, QWEN25)) == 131072  # post-yarn max, as transformers asks
    assert rope.context_length(64, scaling_of(64, {"type": "yarn", "factor": 4.0})) == 256  # no original
    assert rope.context_length(4096, scaling_of(4096, {**QWEN25, "original_max_position_embeddings": 512,
                                                       "factor": 2.5})) == 4096
    assert rope.context_length(100, scaling_of(100, {"type": "yarn", "factor": 1.55})) == 155


REFUSALS = [  # (rope_scaling, the field the message names, more of the message)
    ("yarn", "rope_scaling 'yarn'", "expected an object or null"),
    ([4.0], "rope_scaling [4.0]", "expected an object or null"),
    ({"factor": 4.0}, "rope_type", "expected one of 'yarn'"),
    ({"type": "linear", "factor": 2.0}, "rope_scaling.type 'linear'", "expected one of 'yarn'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type 'dynamic'", "expected one of 'yarn'"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "rope_scaling.rope_type 'longrope'",
     "not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_scaling.rope_type 'llama3'", "not supported"),
    ({"rope_type": 3, "factor": 2.0}, "rope_scaling.rope_type 3", "not supported"),
    ({"rope_type": "yarn", "type": "linear", "factor": 2.0}, "rope_scaling.rope_type 'yarn'", "disagree"),
    ({"type": "yarn"}, "rope_scaling.factor", "expected a number > 1"),
    ({"type": "yarn", "factor": None}, "rope_scaling.factor", "expected a number > 1"),
    ({"type": "yarn", "factor": 1.0}, "rope_scaling.factor 1.0", "expected a number > 1"),
    ({"type": "yarn", "factor": 0.5}, "rope_scaling.factor 0.5", "expected a number > 1"),
    ({"type": "yarn", "factor": "4"}, "rope_scaling.factor '4'", "expected a number > 1"),
    ({"type": "yarn", "factor": True}, "rope_scaling.factor True", "expected a number > 1"),
    ({"type": "yarn", "factor": float("nan")}, "rope_scaling.factor nan", "expected a number > 1"),
    ({"type": "yarn", "factor": float("inf")}, "rope_scaling.factor inf", "expected a number > 1"),
    ({**QWEN25, "original_max_position_embeddings": 0}, "rope_scaling.original_max_position_embeddings 0",
     "expected a positive integer"),
    ({**QWEN25, "original_max_position_embeddings": -5}, "rope_scaling.original_max_position_embeddings -5",
     "expected a positive integer"),
    ({**QWEN25, "original_max_position_embeddings": 100.5}, "rope_scaling.original_max_position_embeddings 100.5",
     "expected a positive integer"),
    ({**QWEN25, "original_max_position_embeddings": "32768"}, "rope_scaling.original_max_position_embeddings",
     "expected a positive integer"),
    ({**QWEN25, "beta_fast": 0}, "rope_scaling.beta_fast 0", "expected a number > 0"),
    ({**QWEN25, "beta_fast": "32"}, "rope_scaling.beta_fast '32'", "expected a number > 0"),
    ({**QWEN25, "beta_slow": -1.0}, "rope_scaling.beta_slow -1.0", "expected a number > 0"),
    ({**QWEN25, "beta_fast": 1.0, "beta_slow": 2.0}, "rope_scaling.beta_fast 1", "expected beta_fast >= beta_slow"),
    ({**QWEN25, "beta_slow": 40.0}, "rope_scaling.beta_fast 32", "expected beta_fast >= beta_slow"),
    ({**QWEN25, "mscale": -1.0}, "rope_scaling.mscale -1.0", "expected a number >= 0"),
    ({**QWEN25, "mscale_all_dim": "1"}, "rope_scaling.mscale_all_dim '1'", "expected a number >= 0"),
    ({**QWEN25, "attention_factor": 0.0}, "rope_scaling.attention_factor 0.0", "expected a number > 0"),
    ({**QWEN25, "attention_factor": [1.0]}, "rope_scaling.attention_factor [1.0]", "expected a number > 0"),
    ({**QWEN25, "truncate": "yes"}, "rope_scaling.truncate 'yes'", "expected true or false"),
    ({**QWEN25, "truncate": 1}, "rope_scaling.truncate 1", "expected true or false"),
]


@pytest.mark.parametrize("rope_scaling,field,expected", REFUSALS, ids=[str(r[0])[:60] for r in REFUSALS])
def test_refusals_are_one_line_naming_the_field(rope_scaling, field, expected):
    with pytest.raises(ModelFolderError) as e:
        scaling_of(32768, rope_scaling)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{SOURCE}: ")
    assert field in message and expected in message


@pytest.mark.parametrize("max_positions", ["32768", 0, True])
def test_fallback_max_position_embeddings_is_checked(max_positions):
    with pytest.raises(ModelFolderError, match=r"^ckpt/config.json: max_position_embeddings .*expected a positive "
                                               r"integer \(rope_scaling gives no original_max_position_embeddings\)$"):
        scaling_of(max_positions, {"rope_type": "yarn", "factor": 4.0})


# End to end: a tiny checkpoint whose 64 pre-training positions YaRN stretches to 256.
YARN = {"factor": 4.0, "original_max_position_embeddings": 64, "type": "yarn"}


def make_yarn_checkpoint(folder):
    """tests/tiny.py's checkpoint with max_position_embeddings 64 and YaRN factor 4 in config.json (the
    weights do not depend on either)."""
    make_checkpoint(folder, tied=True)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(max_position_embeddings=64, rope_scaling=YARN)
    path.write_text(json.dumps(config, indent=2))
    return folder


def run_graph(session, ids, past, num_kv_heads, head_dim, layers):
    """One call of an exported graph on batch 1 with no padding: (logits [S, V] of every new position, presents)."""
    total = (past[0].shape[2] if past else 0) + len(ids)
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, total), np.int64)}
    if "num_logits" in {i.name for i in session.get_inputs()}:
        feed["num_logits"] = np.array([len(ids)], np.int64)
    empty = np.zeros((1, num_kv_heads, 0, head_dim), np.float32)
    for i in range(layers):
        feed[f"past_key_values.{i}.key"] = past[2 * i] if past else empty
        feed[f"past_key_values.{i}.value"] = past[2 * i + 1] if past else empty
    names = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    logits, *presents = session.run(names, feed)
    return logits.reshape(len(ids), -1), presents


@pytest.mark.parametrize("ops", ["fast", "portable"])
def test_yarn_checkpoint_exports_and_matches_oracle(ops, tmp_path):
    import onnxruntime as ort

    from export import QuantSpec, export

    folder = make_yarn_checkpoint(tmp_path / "ckpt")
    out = export(folder, tmp_path / "out", QuantSpec(32), log=lambda m: None, ops=ops)
    config = json.loads((folder / "config.json").read_text())
    kvh, layers = config["num_key_value_heads"], config["num_hidden_layers"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], 152).tolist()
    prompt = 150  # positions 64 … 149 lie beyond the original context; 150 and 151 go through decode

    prefill = ort.InferenceSession(str(out / "prefill.onnx"), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(out / "decode.onnx"), providers=["CPUExecutionProvider"])
    ours, past = run_graph(prefill, ids[:prompt], None, kvh, head_dim, layers)
    steps = [ours]
    for t in range(prompt, len(ids)):
        logits, past = run_graph(decode, ids[t:t + 1], past, kvh, head_dim, layers)
        steps.append(logits)
    ours = np.concatenate(steps)

    with torch.no_grad():
        ref = oracle(folder)
        assert ref.config.rope_scaling["factor"] == 4.0
        expected = ref(torch.tensor([ids])).logits[0].numpy()
        plain = Qwen2ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager",
                                                 rope_scaling=None).eval()  # the same weights, plain RoPE
        unscaled = plain(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - expected).max() <= 1e-4
    assert np.abs(unscaled - expected).max() > 1e-2  # the scaling really shows in the logits
    manifest = json.loads((out / "qwen-edge.json").read_text())
    assert manifest.get("context_length") == 256


def test_calibration_forward_uses_the_yarn_tables(tmp_path):
    """The calibration pass's numpy forward (export/calibrate.py) sees the same linear inputs as transformers
    on a YaRN checkpoint, over positions beyond the original context."""
    from export.calibrate import activation_stats
    from export.checkpoint import Checkpoint
    from export.qwen2 import Qwen2Config

    folder = make_yarn_checkpoint(tmp_path / "ckpt")
    ckpt = Checkpoint(folder)
    cfg = Qwen2Config.from_dict(ckpt.config)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 160))
    ours = activation_stats(ckpt, cfg, tokens)
    ref, seen = oracle(folder), {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0]))
             for name, m in ref.named_modules() if name.endswith("o_proj")]
    with torch.no_grad():
        ref(torch.from_numpy(tokens))
    for h in hooks:
        h.remove()
    assert seen
    for name, x in seen.items():  # o_proj's input is attention's output: it carries the RoPE tables
        expected = x.reshape(-1, x.shape[-1]).square().mean(0).numpy()
        np.testing.assert_allclose(ours[name], expected, rtol=2e-3, atol=1e-6, err_msg=name)
