"""Runtime behaviour: sampling, streaming text, stop conditions, chat templates, manifest safety."""
import json
import shutil

import numpy as np
import pytest

import toolkit
from toolkit.chat_template import ChatTemplate
from toolkit.errors import ArgumentError, ContextOverflowError, ModelFolderError
from toolkit.sampling import SamplingParams, apply_repetition_penalty, apply_top_p, make_sampler
from toolkit.tokenizer import TextStream


def test_greedy_is_argmax_and_seeded_sampling_reproducible():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert make_sampler(SamplingParams(temperature=0))(logits, np.array([], np.int64)) == int(np.argmax(logits))
    draw = lambda seed: [make_sampler(SamplingParams(temperature=1.0, top_k=50, seed=seed))(logits, np.array([]))
                         for _ in range(1)]
    a = make_sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=7))
    b = make_sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=7))
    seq_a = [a(logits, np.array([], np.int64)) for _ in range(20)]
    assert seq_a == [b(logits, np.array([], np.int64)) for _ in range(20)]
    assert len(set(seq_a)) > 1
    assert draw(1) == draw(1)


def test_top_k_and_top_p_keep_only_the_head():
    logits = np.array([5.0, 4.0, 3.0, -10.0, -10.0], np.float32)
    picks = {make_sampler(SamplingParams(temperature=1.0, top_k=2, seed=s))(logits, np.array([], np.int64))
             for s in range(40)}
    assert picks <= {0, 1}
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    assert apply_top_p(probs, 0.75).tolist() == pytest.approx([0.625, 0.375, 0, 0])


def test_repetition_penalty_matches_transformers_rule():
    out = apply_repetition_penalty(np.array([2.0, -2.0, 1.0], np.float32), np.array([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("params,field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"), (dict(seed=-3), "seed")])
def test_bad_sampling_values_are_refused(params, field):
    with pytest.raises(ArgumentError, match=field):
        SamplingParams(**params).check()


class ByteTokenizer:
    """Each token is one UTF-8 byte: the worst case for splitting characters."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_never_emits_a_broken_character_and_holds_back_stop_prefixes():
    text = "héllo 🙂 wörld STOP never"
    stream = TextStream(ByteTokenizer(), stop=("STOP",))
    pieces = []
    for b in text.encode():
        pieces.append(stream.push(b))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    assert stream.stopped
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "héllo 🙂 wörld "
    assert not any("S" in p for p in pieces)


def test_chat_template_runs_in_a_sandbox():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ArgumentError, match="chat template"):
        ChatTemplate(evil, {}).render([{"role": "user", "content": "hi"}])
    with pytest.raises(ArgumentError, match="messages"):
        ChatTemplate("{{ messages }}", {}).render([{"role": "user"}])


def test_generation_stops_at_either_end_token(exported):
    model = toolkit.load(exported("tied_fp32", bits=32))
    ends = model.manifest["eos_token_ids"]
    names = {model.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert names <= set(ends)
    first = model.complete(["x"], max_new_tokens=1, temperature=0)[0].token_ids[0]
    model.eos_ids = frozenset([first])  # the greedy first token ends the answer at once
    done = model.complete(["x"], max_new_tokens=5, temperature=0)[0]
    assert done.finish_reason == "stop" and done.text == "" and done.token_ids == [first]


def test_stop_string_cuts_the_text(exported):
    model = toolkit.load(exported("tied_fp32", bits=32))
    full = model.generate("def", max_new_tokens=12, temperature=0)
    stop = full[3:5]
    assert len(stop) == 2
    done = model.complete(["def"], max_new_tokens=12, temperature=0, stop=[stop])[0]
    assert (done.text, done.finish_reason) == (full[:full.index(stop)], "stop")


def test_stream_pieces_join_to_generate(exported):
    model = toolkit.load(exported("tied_fp32", bits=32))
    chat = [{"role": "user", "content": "hi 🙂"}]
    assert "".join(model.stream(chat, max_new_tokens=16, temperature=0)) == model.generate(chat, max_new_tokens=16,
                                                                                           temperature=0)


def test_over_long_prompt_raises_context_overflow(exported):
    model = toolkit.load(exported("tied_fp32", bits=32), max_length=16)
    with pytest.raises(ContextOverflowError, match="max_length 16"):
        model.generate("word " * 40)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["graphs"]["decode"].update(file="../outside.onnx"), "leaves the model folder"),
    (lambda m: m.pop("graphs"), "missing graphs"),
    (lambda m: m.update(format_version=99), "format_version 99"),
])
def test_bad_manifest_is_refused(edit, match, exported, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(exported("tied_fp32", bits=32), folder)
    manifest = json.loads((folder / "qwen-edge.json").read_text())
    edit(manifest)
    (folder / "qwen-edge.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=match):
        toolkit.load(folder)


def test_damaged_weights_are_caught_by_verify(exported, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(exported("tied_fp32", bits=4), folder)
    with open(folder / "model.weights", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(ModelFolderError, match="sha256"):
        toolkit.load(folder, verify=True)
