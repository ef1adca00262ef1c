"""The exported graphs against transformers' Qwen2ForCausalLM (float32) as the oracle."""
import numpy as np
import pytest
import torch

import toolkit
from export.quantize import dequantize_weight, quantize_weight
from tiny import oracle

NAMES = ["tied_fp32", "untied_bf16"]
PROMPT = "def reverse(s):\n    return"


def run(model, ids_rows, masks, cache, graph):
    """Logits [B, V] of the last position of one call of graph "prefill" or "decode"."""
    out = model._step(graph, np.array(ids_rows, dtype=np.int64), np.array(masks, dtype=np.int64), cache)
    return out[:, -1] if graph == "prefill" else out


def assert_greedy_follows_logits(model, prompt: str = "def", new_tokens: int = 4) -> None:
    """A model folder generates: greedy decoding gives new_tokens tokens (or ends at an end token), the first
    is the argmax of the prefill graph's own logits for the prompt, and the text is their decoding."""
    done = model.complete([prompt], max_new_tokens=new_tokens, temperature=0)[0]
    ids = np.array([done.prompt_ids], dtype=np.int64)
    logits = model.forward("prefill", ids, np.ones_like(ids), model.new_cache(1))
    assert done.token_ids and done.token_ids[0] == int(np.argmax(logits[0, -1]))
    ended = done.finish_reason == "stop" and done.token_ids[-1] in model.eos_ids
    assert len(done.token_ids) == new_tokens or ended
    # the text is the tokens' decoding, less an incomplete character at the end (held back, never emitted)
    assert done.text == model.tokenizer.decode(done.token_ids).rstrip("\ufffd")


def dequantized_oracle(folder, bits, group_size, symmetric, method="rtn", bits_for=None):
    """The oracle with every matrix the export quantizes replaced by its dequantized value
    (`bits_for`: matrix name -> bits where they differ from `bits`)."""
    ref = oracle(folder)

    def q(w, name):
        b = (bits_for or {}).get(name, bits)
        return torch.from_numpy(dequantize_weight(quantize_weight(w.detach().numpy(), b, group_size, symmetric,
                                                                  method)))
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(q(module.weight, name))
        if not ref.config.tie_word_embeddings:  # tied: lm_head above already rewrote the shared table
            ref.model.embed_tokens.weight.copy_(q(ref.model.embed_tokens.weight, "model.embed_tokens"))
    return ref


def step_logits(folder, ids, steps):
    """Prefill on `ids`, then `steps` greedy calls of decode.onnx: logits of every call and the tokens chosen."""
    model = toolkit.load(folder, decode_graph=True)
    cache = model.new_cache(1)
    out = [run(model, [ids], [[1] * len(ids)], cache, "prefill")[0]]
    tokens = list(ids)
    for _ in range(steps):
        tokens.append(int(np.argmax(out[-1])))
        out.append(run(model, [[tokens[-1]]], [[1] * len(tokens)], cache, "decode")[0])
    return np.stack(out), tokens


def oracle_logits(ref, tokens, n_prompt):
    with torch.no_grad():
        logits = ref(torch.tensor([tokens])).logits[0].numpy()
    return logits[n_prompt - 1:]


@pytest.mark.parametrize("name", NAMES)
def test_float_export_matches_oracle_at_every_step(name, checkpoint, exported):
    folder = exported(name, bits=32)
    ids = toolkit.load(folder).tokenizer.encode(PROMPT)
    ours, tokens = step_logits(folder, ids, steps=8)
    ref = oracle_logits(oracle(checkpoint(name)), tokens, len(ids))
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_float_export_greedy_32_tokens_identical(name, checkpoint, exported):
    model = toolkit.load(exported(name, bits=32))
    ids = model.tokenizer.encode(PROMPT)
    done = model.complete([PROMPT], max_new_tokens=32, temperature=0, repetition_penalty=1.0)[0]
    eos = model.manifest["eos_token_ids"]
    ref = oracle(checkpoint(name)).generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                            max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=0,
                                            repetition_penalty=1.0)
    assert done.prompt_ids == ids
    assert done.token_ids == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, 16, False), (8, 32, True), (8, 64, False)])
def test_quantized_export_matches_oracle_on_dequantized_weights(name, bits, group_size, symmetric, checkpoint, exported):
    folder = exported(name, bits=bits, group_size=group_size, symmetric=symmetric)
    ids = toolkit.load(folder).tokenizer.encode(PROMPT)
    ours, tokens = step_logits(folder, ids, steps=4)
    ref = oracle_logits(dequantized_oracle(checkpoint(name), bits, group_size, symmetric), tokens, len(ids))
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("bits,decode_graph", [(32, True), (4, True), (4, False)])
def test_prefill_equals_prefix_prefill_plus_decode(bits, decode_graph, exported):
    """decode_graph=False: the single-token steps go through the prefill graph (the default runtime path)."""
    model = toolkit.load(exported("tied_fp32", bits=bits), decode_graph=decode_graph)
    ids = model.tokenizer.encode(PROMPT + " s[::-1]")
    whole = run(model, [ids], [[1] * len(ids)], model.new_cache(1), "prefill")
    cache = model.new_cache(1)
    split = 5
    run(model, [ids[:split]], [[1] * split], cache, "prefill")
    for t in range(split, len(ids)):  # the rest one token at a time through the decode graph
        last = run(model, [[ids[t]]], [[1] * (t + 1)], cache, "decode")
    np.testing.assert_allclose(last, whole, atol=1e-4)
    # and a second prefill chunk on top of a non-empty past
    cache = model.new_cache(1)
    run(model, [ids[:split]], [[1] * split], cache, "prefill")
    chunk = run(model, [ids[split:]], [[1] * len(ids)], cache, "prefill")
    np.testing.assert_allclose(chunk, whole, atol=1e-4)
    assert cache.length == len(ids)
    # num_logits: the last N positions' logits, each what a prefill ending there would give
    tail = model.forward("prefill", np.array([ids]), np.ones((1, len(ids)), np.int64), model.new_cache(), num_logits=3)
    assert tail.shape == (1, 3, model.config["vocab_size"])
    for j, end in enumerate(range(len(ids) - 2, len(ids) + 1)):
        alone = run(model, [ids[:end]], [[1] * end], model.new_cache(), "prefill")
        np.testing.assert_allclose(tail[0, j], alone[0], atol=1e-4)


@pytest.mark.parametrize("bits", [32, 8])
def test_one_session_generates_what_two_sessions_do(bits, exported):
    one = toolkit.load(exported("untied_bf16", bits=bits))
    two = toolkit.load(exported("untied_bf16", bits=bits), decode_graph=True)
    assert set(one._sessions) == {"prefill"} and set(two._sessions) == {"prefill", "decode"}
    prompts = ["def reverse(s):", "Héllo wörld 🙂"]
    a = one.complete(prompts, max_new_tokens=16, temperature=0)
    b = two.complete(prompts, max_new_tokens=16, temperature=0)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


@pytest.mark.parametrize("bits", [32, 8])
def test_batch_equals_prompts_one_by_one(bits, exported):
    model = toolkit.load(exported("untied_bf16", bits=bits))
    prompts = ["def reverse(s):", "Héllo wörld 🙂", "The quick brown fox jumps over the lazy dog."]
    batch = model.complete(prompts, max_new_tokens=12, temperature=0)
    for prompt, got in zip(prompts, batch):
        alone = model.complete([prompt], max_new_tokens=12, temperature=0)[0]
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text
    assert len({len(p.prompt_ids) for p in batch}) > 1  # the batch really was padded


def test_quantized_folder_is_smaller_and_stores_each_tensor_once(exported):
    float_folder, int4_folder = exported("tied_fp32", bits=32), exported("tied_fp32", bits=4)
    f32 = toolkit.load(float_folder).manifest["quantization"]["weights_bytes"]
    man = toolkit.load(int4_folder).manifest
    q = man["quantization"]
    assert q["weights_bytes"] < f32 / 3
    assert "model.embed_tokens.weight" in q["quantized_tensors"]  # tied: one blob for embedding and lm_head
    assert "lm_head.weight" not in q["quantized_tensors"]
    assert all(f"model.layers.0.{p}.weight" in q["quantized_tensors"] for p in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert (int4_folder / "model.weights").stat().st_size < (float_folder / "model.weights").stat().st_size / 3


def test_cache_grows_in_place_and_rewinds(exported):
    """The KV buffers start at 256 positions and double when a call needs more; the graph writes into them
    (no per-step copy), and cutting the cache back only lowers its length."""
    model = toolkit.load(exported("tied_fp32", bits=32), max_length=512)
    ids = (model.tokenizer.encode(PROMPT + " s[::-1]\n") * 40)[:300]
    whole = run(model, [ids], [[1] * len(ids)], model.new_cache(), "prefill")
    cache = model.new_cache()
    assert cache.capacity == 256
    run(model, [ids[:250]], [[1] * 250], cache, "prefill")
    buffer = cache.arrays[0]
    for t in range(250, 256):
        run(model, [[ids[t]]], [[1] * (t + 1)], cache, "decode")
    assert cache.arrays[0] is buffer  # written in place
    for t in range(256, len(ids)):  # crosses the first capacity: one copy into a 512-position buffer
        last = run(model, [[ids[t]]], [[1] * (t + 1)], cache, "decode")
    assert cache.capacity == 512 and cache.length == len(ids)
    np.testing.assert_allclose(last, whole, atol=1e-4)
    cache.truncate(200)  # rewind: the next call overwrites positions 200..
    again = run(model, [ids[200:]], [[1] * len(ids)], cache, "prefill")
    np.testing.assert_allclose(again, whole, atol=1e-4)
    with pytest.raises(toolkit.ContextOverflowError, match="do not fit max_length 512"):
        cache.reserve(513)
