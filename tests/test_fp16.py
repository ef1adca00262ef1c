"""GPU exports (--device cuda|dml): float16 graphs validated on onnxruntime's CPU provider against the
transformers oracle, every node checked against onnxruntime's kernel table for its provider, and the
runtime's provider choice.

Tolerance: float16 keeps 11 significant bits (relative rounding 2^-11 ≈ 4.9e-4 per operation); through the
tiny model's two layers the logits (magnitude ~6) move by ~1e-2, so float16 graphs with float weights are
held to 3e-2 of the float32 oracle (0.5 % of the logits' range) and to the same greedy token at every
position; a quantized float16 export is held to its float32 twin (the same codes), not to the oracle."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import toolkit
from export import QuantSpec, export
from kernel_table import missing_kernels
from toolkit import device
from toolkit.errors import ArgumentError, ModelFolderError

IDS = np.array([[5, 17, 99, 3, 250, 8, 44, 61]], np.int64)
PROVIDER = {"cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider", "cpu": "CPUExecutionProvider"}


@pytest.fixture(scope="module")
def gpu_export(checkpoint, tmp_path_factory):
    made = {}

    def get(name: str, dev: str, bits: int) -> object:
        if (name, dev, bits) not in made:
            out = tmp_path_factory.mktemp("fp16") / f"{name}-{dev}-{bits}"
            made[name, dev, bits] = export(checkpoint(name), out, QuantSpec(bits, 32, True, int8_accuracy_level=0),
                                           log=lambda m: None, device=dev)
        return made[name, dev, bits]

    return get


def all_logits(model, ids=IDS):
    cache = model.new_cache(1)
    prefill = model.forward("prefill", ids, np.ones_like(ids), cache, num_logits=ids.shape[1])
    step = model.forward("decode", np.array([[7]], np.int64), np.ones((1, ids.shape[1] + 1), np.int64), cache)
    return prefill[0], step[0]


def oracle(folder, ids):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()[0]


@pytest.mark.parametrize("dev", ["cuda", "dml"])
@pytest.mark.parametrize("name", ["tied_fp32", "untied_bf16"])
def test_float16_graphs_match_the_oracle(gpu_export, checkpoint, name, dev):
    folder = gpu_export(name, dev, 32)
    model = toolkit.load(folder, threads=1)
    assert (model.manifest["device"], model.manifest["activation_dtype"]) == (dev, "float16")
    assert model.manifest["kv_cache"]["dtype"] == "float16" and model.new_cache(1).host(0).dtype == np.float16
    prefill, step = all_logits(model)
    assert prefill.dtype == np.float32  # cast at the graph's edge
    want = oracle(checkpoint(name), np.concatenate([IDS, [[7]]], axis=1))
    np.testing.assert_allclose(prefill, want[:-1], atol=3e-2)
    np.testing.assert_allclose(step, want[-1], atol=3e-2)
    assert (prefill.argmax(-1) == want[:-1].argmax(-1)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_float16_export_follows_its_float32_twin(gpu_export, exported, bits):
    half = toolkit.load(gpu_export("untied_bf16", "cuda", bits), threads=1)
    full = toolkit.load(exported("untied_bf16", bits=bits), threads=1)
    for a, b in zip(all_logits(half), all_logits(full)):
        np.testing.assert_allclose(a, b, atol=5e-2)
    prompts = ["hello there", "def f(x):"]
    assert half.generate(prompts, max_new_tokens=12, temperature=0) == \
        full.generate(prompts, max_new_tokens=12, temperature=0)


def test_dml_embedding_is_a_float16_table_and_rope_runs_outside_attention(gpu_export):
    folder = gpu_export("tied_fp32", "dml", 4)
    import onnx

    graph = onnx.load(folder / "decode.onnx", load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "GatherBlockQuantized" not in ops and "RotaryEmbedding" in ops
    model = toolkit.load(folder, threads=1)
    assert model.manifest["quantization"]["embedding"] == "Gather"
    assert all(np.isfinite(x).all() for x in all_logits(model))  # numerics: the float dml export vs the oracle


@pytest.mark.parametrize("dev", ["cuda", "dml"])
@pytest.mark.parametrize("bits", [4, 8, 32])
def test_every_node_has_a_kernel_on_its_provider(gpu_export, dev, bits):
    folder = gpu_export("untied_bf16", dev, bits)
    for graph in ("prefill", "decode"):
        assert missing_kernels(folder / f"{graph}.onnx", PROVIDER[dev]) == []


def test_the_cpu_export_is_refused_by_the_kernel_table_for_cuda(exported):
    missing = missing_kernels(exported("untied_bf16", bits=4) / "decode.onnx", "CUDAExecutionProvider")
    assert missing and all("GroupQueryAttention" in m for m in missing)


def test_provider_choice(gpu_export, exported, monkeypatch):
    cpu_folder, cuda_folder = exported("untied_bf16", bits=4), gpu_export("untied_bf16", "cuda", 4)
    assert toolkit.load(cuda_folder, provider="auto", threads=1).provider == "cpu"  # no GPU here
    assert toolkit.load(cpu_folder, provider="auto", threads=1).provider == "cpu"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert device.choose("auto", "cuda", cuda_folder) == "cuda"
    assert device.choose("auto", "cpu", cpu_folder) == "cpu"  # a float32 export never goes to CUDA
    assert device.choose("auto", "dml", cpu_folder) == "cpu"
    with pytest.raises(ModelFolderError, match="exported for cpu.*re-export it with --device cuda"):
        device.choose("cuda", "cpu", cpu_folder)
    with pytest.raises(ArgumentError, match="provider 'dml': this onnxruntime build has only"):
        device.choose("dml", "dml", cpu_folder)
    with pytest.raises(ArgumentError, match="provider 'tpu': expected auto or one of"):
        device.choose("tpu", "cpu", cpu_folder)


def test_bad_device_options_are_one_line_errors(checkpoint, tmp_path):
    src = checkpoint("tied_fp32")
    for kwargs, message in (({"device": "tpu"}, "--device tpu: expected one of cpu, cuda, dml"),
                            ({"device": "cuda", "ops": "portable"}, "--ops portable: builds float32 graphs"),
                            ({"device": "cuda", "kv_cache": "int8"}, "--kv-cache int8: a CPU feature")):
        with pytest.raises(ArgumentError, match=message):
            export(src, tmp_path / "x", QuantSpec(4), log=lambda m: None, **kwargs)
        assert not (tmp_path / "x").exists()
