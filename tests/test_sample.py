"""The real model: Qwen2.5-Coder-0.5B-Instruct from the sample (models/get_sample.py), exported at int4.

Skipped, with the reason printed, only when the sample cannot be fetched."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import toolkit

QUESTION = "Write a Python function that reverses a string."


@pytest.mark.sample
def test_int4_answers_the_reversal_question_with_working_code(sample_int4, tmp_path):
    model = toolkit.load(sample_int4, max_length=1024)
    answer = model.generate([{"role": "user", "content": QUESTION}], max_new_tokens=200, temperature=0)
    print(answer)
    code = re.search(r"```(?:python)?\n(.*?)```", answer, re.S)
    assert code and "def " in code.group(1), answer
    script = tmp_path / "answer.py"
    script.write_text(code.group(1) + "\nimport inspect as _i\n"
                      "_f = [v for k, v in list(globals().items()) if _i.isfunction(v) and not k.startswith('_')][0]\n"
                      "print(_f('hello, world'))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip().splitlines()[-1] == "dlrow ,olleh", run.stdout + run.stderr


@pytest.mark.sample
def test_ctrl_c_stops_an_answer_not_the_chat(sample_int4):
    """In a terminal, as a person would: Ctrl-C while the answer streams stops it; the chat goes on."""
    pexpect = pytest.importorskip("pexpect")
    exe = str(Path(sys.executable).parent / "qwen-edge")
    child = pexpect.spawn(exe, ["chat", str(sample_int4), "--temperature", "0", "--max-new-tokens", "400"],
                          encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("Write a long essay about the history of computing.")
    child.expect("history of computing.\r\n")  # the terminal's echo of the line
    child.expect(r"\w")  # the answer is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"turns 1, tokens generated \d+")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.sample
def test_int4_manifest_describes_the_sample(sample_int4):
    man = toolkit.load(sample_int4).manifest
    assert man["model"]["num_hidden_layers"] == 24 and man["model"]["vocab_size"] == 151936
    assert {151643, 151645} <= set(man["eos_token_ids"])  # <|endoftext|> and <|im_end|>
    q = man["quantization"]
    assert len(q["quantized_tensors"]) == 24 * 7 + 2  # every projection, lm_head and the embedding
    assert q["weights_bytes"] < 420 * 2**20


TEXTS = ["The quick brown fox jumps over the lazy dog, and then it rests.", "你好，世界！今天天气很好，我们去公园散步吧。",
         "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    p, *rest = xs\n"
         "    return quicksort([x for x in rest if x < p]) + [p] + quicksort([x for x in rest if x >= p])\n",
         "Emoji: 🙂🚀👍🏽🇯🇵 — naïve café, Straße, Ελληνικά, русский."]


@pytest.mark.sample
def test_gguf_export_equals_the_hf_folder_export(sample_hf, sample_int4, tmp_path):
    """The native GGUF path against the Hugging Face folder transformers made from the same file: every tensor
    read back the same, then the two int4 exports (tokenizer, logits, end-of-turn ids) equal."""
    import numpy as np

    from export import QuantSpec, export, qwen2
    from export.checkpoint import open_checkpoint

    gguf = sample_hf.parent / "qwen2.5-coder-0.5b-instruct.gguf"
    hf, gg = open_checkpoint(sample_hf), open_checkpoint(gguf)
    names = qwen2.expected_tensors(qwen2.Qwen2Config.from_dict(hf.config, str(sample_hf / "config.json")))
    assert len(names) > 200
    for name, shape in names.items():
        np.testing.assert_array_equal(gg.tensor(name, shape), hf.tensor(name, shape), err_msg=name)
    # int4 as sample_int4 (the HF folder's export), not float32: ~0.4 GB more on disk, not ~4.8 GB
    a = toolkit.load(export(gguf, tmp_path / "gguf", QuantSpec(bits=4, group_size=32), log=lambda m: None),
                     preload=False)
    b = toolkit.load(sample_int4, preload=False)
    for text in TEXTS:
        assert a.tokenizer.encode(text) == b.tokenizer.encode(text), text
    ids = np.array([a.tokenizer.encode(" ".join(TEXTS))])
    la = a.forward("prefill", ids, np.ones_like(ids), a.new_cache(), num_logits=ids.shape[1])
    lb = b.forward("prefill", ids, np.ones_like(ids), b.new_cache(), num_logits=ids.shape[1])
    assert np.abs(la - lb).max() <= 1e-4
    assert set(a.manifest["eos_token_ids"]) >= {151643, 151645}


@pytest.mark.sample
def test_float16_export_agrees_with_the_float32_one_except_at_near_ties(sample_hf, sample_int4, tmp_path):
    """The --device cuda export (float16), run on the CPU provider's float16 kernels, against the float32-
    activation export of the same recipe: teacher-forced on the latter's greedy answers, the same top token
    wherever the float32 top-2 margin exceeds 0.25 (float16 moves these logits by ~0.1), and mean KL < 0.005."""
    import numpy as np

    from export import QuantSpec, export

    half = toolkit.load(export(sample_hf, tmp_path / "int4-cuda",
                               QuantSpec(bits=4, group_size=32), log=lambda m: None, device="cuda"), threads=2)
    full = toolkit.load(sample_int4, threads=2)
    kls, checked = [], 0
    for question in (QUESTION, "用Python写一个快速排序函数。", "Explain what a hash map is in two sentences."):
        done = full.complete([[{"role": "user", "content": question}]], max_new_tokens=48, temperature=0)[0]
        ids = np.array([done.prompt_ids + done.token_ids], np.int64)
        n = len(done.token_ids)
        a = full.forward("prefill", ids, np.ones_like(ids), full.new_cache(1), num_logits=n + 1)[0]
        b = half.forward("prefill", ids, np.ones_like(ids), half.new_cache(1), num_logits=n + 1)[0]
        top2 = np.sort(a, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.25
        assert (a.argmax(-1) == b.argmax(-1))[clear].all()
        checked += int(clear.sum())
        pa, pb = (np.exp(x - x.max(-1, keepdims=True)) for x in (a, b))
        pa, pb = pa / pa.sum(-1, keepdims=True), pb / pb.sum(-1, keepdims=True)
        kls.append(float((pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30))).sum(-1).mean()))
    assert checked > 100 and max(kls) < 0.005, kls
