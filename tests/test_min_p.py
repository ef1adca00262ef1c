"""min-p sampling (toolkit/sampling.py) in the API, the CLI's options, and chat answers that run to their end."""
import numpy as np
import pytest

import toolkit
from toolkit.cli import cli
from toolkit.errors import ArgumentError
from toolkit.sampling import SamplingParams, apply_min_p, candidates, distribution


def test_min_p_keeps_the_tokens_at_least_that_likely_relative_to_the_top():
    ids, probs = apply_min_p(np.arange(5), np.array([0.5, 0.25, 0.15, 0.06, 0.04]), 0.29)
    assert ids.tolist() == [0, 1, 2] and np.allclose(probs, np.array([0.5, 0.25, 0.15]) / 0.9)
    assert apply_min_p(np.arange(3), np.array([0.2, 0.3, 0.5]), 0.0)[0].tolist() == [0, 1, 2]  # 0: off
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.06, 0.04], dtype=np.float32))
    # after the temperature: at 2.0 the distribution is flatter, so more tokens pass the same min_p
    cold = candidates(logits, np.array([], np.int64), SamplingParams(temperature=1.0, min_p=0.29))[0]
    warm = candidates(logits, np.array([], np.int64), SamplingParams(temperature=2.0, min_p=0.29))[0]
    assert sorted(cold.tolist()) == [0, 1, 2] and sorted(warm.tolist()) == [0, 1, 2, 3]  # sqrt(p): 0.245 >= 0.205
    p = distribution(logits, np.array([], np.int64), SamplingParams(temperature=1.0, min_p=0.29, top_p=0.6))
    assert np.flatnonzero(p).tolist() == [0, 1]  # top-p over the renormalised min-p set: 0.56 + 0.28 >= 0.6


@pytest.mark.parametrize("value", [-0.1, 1.01, "0.5", True, float("nan")])
def test_bad_min_p(value):
    with pytest.raises(ArgumentError, match="min_p .*: expected a number in \\[0, 1\\]"):
        SamplingParams(temperature=1.0, min_p=value).check()


@pytest.fixture(scope="module")
def model(exported):
    return toolkit.load(exported("tied_fp32", bits=32), max_length=400)


def test_min_p_one_is_greedy_and_min_p_narrows_sampling(model):
    greedy = model.generate("hello", temperature=0, max_new_tokens=12)
    assert model.generate("hello", temperature=1.5, min_p=1.0, seed=1, max_new_tokens=12) == greedy
    loose = {model.generate("hello", temperature=1.5, seed=s, max_new_tokens=6) for s in range(6)}
    tight = {model.generate("hello", temperature=1.5, min_p=0.9, seed=s, max_new_tokens=6) for s in range(6)}
    assert len(tight) < len(loose)
    with pytest.raises(ArgumentError, match="min_p 2: expected"):
        model.generate("hello", min_p=2)


def test_a_chat_answer_runs_to_the_end_of_the_context_without_a_cap(exported):
    model = toolkit.load(exported("tied_fp32", bits=32), max_length=400)
    model.eos_ids = frozenset()  # a model that never ends its turn
    chat = model.chat_session(temperature=0)
    chat.send("hello")
    assert chat.finish_reason == "length" and chat.last.generated_tokens > 256
    assert chat.last.prompt_tokens + chat.last.generated_tokens == 400
    chat.send("and again")  # the next turn drops the first to make room
    assert chat.dropped_turns == 1 and chat.last.generated_tokens >= 256
    capped = model.chat_session(temperature=0, max_new_tokens=20)
    capped.send("hello")
    assert capped.last.generated_tokens == 20 and model.generate("hello", temperature=0) is not None


def test_the_cli_chat_has_no_cap_by_default_and_generate_keeps_256():
    defaults = {cmd: {p.name: p.default for p in cli.commands[cmd].params} for cmd in ("chat", "generate")}
    assert defaults["chat"]["max_new_tokens"] is None and defaults["generate"]["max_new_tokens"] == 256
    assert defaults["chat"]["min_p"] is None and defaults["generate"]["min_p"] is None
