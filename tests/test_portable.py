"""`--ops portable`: standard ONNX only, and the same model as the oracle (and as the fast graphs)."""
import numpy as np
import onnx
import pytest

import toolkit
from test_graph import PROMPT, dequantized_oracle, oracle_logits, step_logits
from tiny import oracle


@pytest.mark.parametrize("bits", [32, 4, 8])
def test_only_standard_ops(bits, exported):
    folder = exported("untied_bf16", bits=bits, ops="portable")
    for graph in ("prefill", "decode"):
        model = onnx.load(folder / f"{graph}.onnx", load_external_data=False)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 21)]
        onnx.checker.check_model(str(folder / f"{graph}.onnx"), full_check=True)
        for node in model.graph.node:
            assert node.domain in ("", "ai.onnx"), f"{node.op_type} is in domain {node.domain}"
            assert onnx.defs.has(node.op_type, ""), f"{node.op_type} is not a standard ONNX op"
    assert toolkit.load(folder).manifest["ops"] == "portable"


@pytest.mark.parametrize("name,bits,group_size,symmetric", [
    ("tied_fp32", 32, 32, True), ("untied_bf16", 32, 32, True), ("untied_bf16", 4, 32, True),
    ("untied_bf16", 4, 16, False), ("tied_fp32", 4, 32, False), ("untied_bf16", 8, 32, True),
    ("tied_fp32", 8, 64, False)])
def test_portable_matches_the_oracle(name, bits, group_size, symmetric, checkpoint, exported):
    folder = exported(name, bits=bits, group_size=group_size, symmetric=symmetric, ops="portable")
    ids = toolkit.load(folder).tokenizer.encode(PROMPT)
    ours, tokens = step_logits(folder, ids, steps=4)
    ref = oracle(checkpoint(name)) if bits == 32 else dequantized_oracle(checkpoint(name), bits, group_size, symmetric)
    assert np.abs(ours - oracle_logits(ref, tokens, len(ids))).max() <= 1e-4


def test_portable_runtime_paths(exported):
    """Batches, prompt lookup (which cuts the cache back) and chat turns on the concatenating KV cache."""
    model = toolkit.load(exported("untied_bf16", bits=4, ops="portable"), max_length=512)
    prompts = ["def reverse(s):", "Héllo wörld 🙂", "The quick brown fox jumps over the lazy dog."]
    batch = model.complete(prompts, max_new_tokens=12, temperature=0)
    assert [c.token_ids for c in batch] == [model.complete([p], max_new_tokens=12, temperature=0)[0].token_ids
                                           for p in prompts]
    prompt = [{"role": "user", "content": "Repeat: " + "def add(a, b):\n    return a + b\n" * 3}]
    plain = model.complete([prompt], temperature=0, max_new_tokens=40)[0]
    assert model.complete([prompt], temperature=0, max_new_tokens=40, lookup=8)[0].token_ids == plain.token_ids
    chat, ref = model.chat_session(temperature=0, max_new_tokens=16), model.chat_session(temperature=0, max_new_tokens=16)
    for turn in ("hello there", "and again"):
        assert chat.send(turn) == model.generate(ref.history + [{"role": "user", "content": turn}],
                                                 temperature=0, max_new_tokens=16)
        ref.send(turn)
