"""Native GGUF input: a GGUF written from a tiny checkpoint exports to the same model as the checkpoint."""
import numpy as np
import pytest
import torch

import toolkit
from export import QuantSpec, export
from export.gguf_checkpoint import GGUFCheckpoint
from test_cli import assert_bad_input, cli
from test_graph import assert_greedy_follows_logits
from tiny import oracle, write_gguf

TEXTS = ["Hello, world! The quick brown fox.", "你好，世界！今天天气很好。", "def f(x):\n    return x ** 2  # sq\n",
         "emoji 🙂🚀👍🏽 and ñ é ü", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory):
    made = {}

    def get(matrix_type: str):
        if matrix_type not in made:
            made[matrix_type] = write_gguf(checkpoint("untied_bf16"), tmp_path_factory.mktemp("gguf") / "m.gguf",
                                           matrix_type)
        return made[matrix_type]

    return get


def all_logits(model, ids):
    return model.forward("prefill", np.array([ids]), np.ones((1, len(ids)), np.int64), model.new_cache(),
                         num_logits=len(ids))[0]


def test_float_gguf_exports_the_same_model_as_the_checkpoint(gguf_file, exported, tmp_path):
    from_gguf = toolkit.load(export(gguf_file("F32"), tmp_path / "g", QuantSpec(bits=32), log=lambda m: None))
    from_hf = toolkit.load(exported("untied_bf16", bits=32))
    for text in TEXTS:
        assert from_gguf.tokenizer.encode(text) == from_hf.tokenizer.encode(text), text
    ids = from_hf.tokenizer.encode(" ".join(TEXTS))
    assert np.abs(all_logits(from_gguf, ids) - all_logits(from_hf, ids)).max() <= 1e-5
    man = from_gguf.manifest
    assert man["chat_template"] == from_hf.manifest["chat_template"]
    assert set(man["eos_token_ids"]) == set(from_hf.manifest["eos_token_ids"])
    assert not man["model"]["tie_word_embeddings"]


@pytest.mark.parametrize("matrix_type", ["F16", "Q8_0", "Q4_0"])
def test_quantized_gguf_tensors_are_dequantized_faithfully(matrix_type, gguf_file, checkpoint, tmp_path):
    path = gguf_file(matrix_type)
    model = toolkit.load(export(path, tmp_path / "g", QuantSpec(bits=32), log=lambda m: None))
    ckpt = GGUFCheckpoint(path)
    ref = oracle(checkpoint("untied_bf16"))
    with torch.no_grad():  # the oracle on exactly the GGUF's (dequantized) weights
        for name, p in ref.named_parameters():
            p.copy_(torch.from_numpy(ckpt.tensor(name, tuple(p.shape)).copy()))
        ids = model.tokenizer.encode(TEXTS[2])
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(all_logits(model, ids) - expected).max() <= 1e-4


def test_gguf_can_be_exported_quantized(gguf_file, tmp_path):
    out = tmp_path / "q"
    assert cli("export", gguf_file("Q8_0"), out, "--bits", "4").returncode == 0
    model = toolkit.load(out)
    assert model.manifest["quantization"]["bits"] == 4
    assert_greedy_follows_logits(model)


def test_unsupported_tensor_type_is_named(checkpoint, tmp_path):
    bad = np.zeros((128, 64), dtype=np.int8)
    path = write_gguf(checkpoint("untied_bf16"), tmp_path / "bad.gguf", "F32", overrides={"blk.0.ffn_up.weight": bad})
    assert_bad_input(cli("export", path, tmp_path / "out"), "bad.gguf", "blk.0.ffn_up.weight", "type I8")
    assert not (tmp_path / "out").exists()


def test_non_qwen2_gguf_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_bad_input(cli("export", tmp_path / "llama.gguf", tmp_path / "out"), "general.architecture 'llama'",
                     "expected 'qwen2'")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a model")
    assert_bad_input(cli("export", tmp_path / "x.bin", tmp_path / "out"), "x.bin",
                     "expected a Hugging Face model folder or a GGUF file")
