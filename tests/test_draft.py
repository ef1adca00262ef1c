"""Speculative decoding with a draft model (toolkit/speculative.py): greedy identity with the target alone,
the output distribution of speculative sampling, both KV caches after truncation, refusals, and the
`--draft` option of generate / chat / serve."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import toolkit
from toolkit import speculative
from toolkit.errors import ArgumentError
from toolkit.generation import Row
from toolkit.sampling import SamplingParams, candidates, distribution, draw, make_sampler

from serving import cli_server
from tiny import make_checkpoint, make_tokenizer

EXE = str(Path(sys.executable).parent / "qwen-edge")
PROMPTS = ["Write a Python function that reverses a string.", "def reverse(s):", "The quick brown fox",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there 🙂"}]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, checkpoint, exported):
    """target: the tiny fp32 export; same: its int8 export (the same weights quantized: a draft that agrees
    often; the tiny model's int4 agrees only ~20 % of the time); other: a different random model with the
    target's tokenizer files (agrees rarely); alien: a model whose tokenizer has a different vocabulary."""
    from export import QuantSpec, export

    root = tmp_path_factory.mktemp("drafts")
    source = checkpoint("tied_fp32")
    other = make_checkpoint(root / "other-src", tied=True, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, other / name)
    alien = make_checkpoint(root / "alien-src", tied=True, seed=2)
    make_tokenizer(alien, vocab_size=290)
    quiet = dict(log=lambda m: None)
    return {"target": exported("tied_fp32", bits=32), "same": exported("tied_fp32", bits=8),
            "other": export(other, root / "other", QuantSpec(32, 32, True), **quiet),
            "alien": export(alien, root / "alien", QuantSpec(32, 32, True), **quiet)}


@pytest.fixture(scope="module")
def models(folders):
    return {name: toolkit.load(folder, max_length=512) for name, folder in folders.items()}


# -- greedy: token for token the target's answer ---------------------------------------------------------

@pytest.mark.parametrize("draft_name", ["same", "other"])
def test_greedy_with_a_draft_is_the_target_alone(models, draft_name):
    target, draft = models["target"], models[draft_name]
    for prompt in PROMPTS:
        for penalty in (1.0, 1.05, 1.5):  # 1.05: the checkpoint's; the penalty changes greedy's choices
            plain = target.complete([prompt], temperature=0, max_new_tokens=40, repetition_penalty=penalty)[0]
            for k in (1, 3, 16):
                fast = target.complete([prompt], temperature=0, max_new_tokens=40, repetition_penalty=penalty,
                                       draft=draft, draft_tokens=k)[0]
                assert (fast.token_ids, fast.text, fast.finish_reason) == (plain.token_ids, plain.text,
                                                                         plain.finish_reason), (prompt, penalty, k)
                assert 0 <= fast.stats.accepted_tokens <= fast.stats.drafted_tokens > 0
    rate = lambda name: target.complete([PROMPTS[1]], temperature=0, max_new_tokens=40,
                                        draft=models[name])[0].stats.acceptance_rate
    assert rate("same") > 0.5 > rate("other")  # the quantized twin agrees far more often than a stranger


def test_portable_graphs_whose_cache_is_not_in_place(exported, models):
    """--ops portable graphs return new present tensors (KVCache.in_place false): truncation copies."""
    target = toolkit.load(exported("tied_fp32", bits=32, ops="portable"), max_length=512)
    draft = toolkit.load(exported("tied_fp32", bits=8, ops="portable"), max_length=512)
    for prompt in PROMPTS[:2]:
        plain = target.complete([prompt], temperature=0, max_new_tokens=30)[0]
        fast = target.complete([prompt], temperature=0, max_new_tokens=30, draft=draft)[0]
        other = target.complete([prompt], temperature=0, max_new_tokens=30, draft=models["other"])[0]
        assert fast.token_ids == plain.token_ids == other.token_ids and fast.stats.accepted_tokens > 0


def test_end_tokens_and_stop_strings_inside_a_draft(folders):
    target = toolkit.load(folders["target"], max_length=512, draft=folders["same"])
    prompt = PROMPTS[1]
    plain = target.complete([prompt], temperature=0, max_new_tokens=30, draft=False)[0]
    assert len(plain.token_ids) == 30
    # an end token in the middle of what the draft proposes (its twin drafts it too)
    ends = target.eos_ids
    target.eos_ids = frozenset([plain.token_ids[7]])
    first = plain.token_ids.index(plain.token_ids[7])
    for k in (2, 5, 16):
        fast = target.complete([prompt], temperature=0, max_new_tokens=30, draft_tokens=k)[0]
        assert fast.token_ids == plain.token_ids[:first + 1] and fast.finish_reason == "stop"
        assert fast.text == target.complete([prompt], temperature=0, max_new_tokens=30, draft=False)[0].text
    target.eos_ids = ends
    # a stop string: text and finish_reason as without the draft
    stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 2]
    want = target.complete([prompt], temperature=0, max_new_tokens=30, stop=[stop], draft=False)[0]
    got = target.complete([prompt], temperature=0, max_new_tokens=30, stop=[stop])[0]
    assert (got.text, got.finish_reason) == (want.text, "stop") and want.finish_reason == "stop"
    assert got.token_ids == want.token_ids
    # every max_new_tokens: never one token more or less
    for n in range(1, 8):
        assert (target.complete([prompt], temperature=0, max_new_tokens=n)[0].token_ids == plain.token_ids[:n])


def test_both_caches_hold_exactly_the_sequence_after_the_rounds(models):
    """After a generation the target's and the draft's caches, cut back after every rejected draft, hold the
    keys and values a fresh prefill of the same tokens computes."""
    target, draft = models["target"], models["other"]
    ids = target.encode(PROMPTS[0])
    cache, draft_cache = target.new_cache(1), draft.new_cache(1)
    target.forward("prefill", np.array([ids[:3]]), np.ones((1, 3), np.int64), cache)  # as a chat's earlier turn
    done = [toolkit.Completion("", ids)]
    list(target.run([ids], temperature=0, max_new_tokens=30, draft=draft, draft_tokens=6, collect=done,
                    cache=cache, draft_cache=draft_cache))
    seq = ids + done[0].token_ids
    assert done[0].stats.drafted_tokens > done[0].stats.accepted_tokens  # some drafts were rejected
    for model, c in ((target, cache), (draft, draft_cache)):
        n = min(c.length, len(seq))
        assert n >= len(seq) - 2
        fresh = model.new_cache(1)
        model.forward("prefill", np.array([seq[:n]]), np.ones((1, n), np.int64), fresh)
        for a, b in zip(c.arrays, fresh.arrays):
            np.testing.assert_allclose(a[:, :, :n], b[:, :, :n], atol=1e-4)


def test_chat_session_reuses_the_draft_cache_between_turns(folders, models):
    target = toolkit.load(folders["target"], max_length=512, draft=folders["other"])
    chat = target.chat_session(temperature=0, max_new_tokens=20, draft_tokens=5)
    ref = models["target"].chat_session(temperature=0, max_new_tokens=20)
    for turn in ("hello there", "and again, please", "one more time"):
        assert chat.send(turn) == ref.send(turn)
        assert chat.last.drafted_tokens > 0
        held = chat._draft_prefix.ids
        assert held == chat._prefix.ids[:len(held)] and len(held) >= chat.last.prompt_tokens
    # the next turn starts the draft from the common prefix, not from scratch
    ids = target.encode(chat.history + [{"role": "user", "content": "last"}])
    assert chat._draft_prefix.reuse(ids).length > len(ids) // 2
    stream = chat.send("a stopped answer", stream=True)
    next(stream)
    stream.close()
    held = chat._draft_prefix.ids
    assert held == chat._prefix.ids[:len(held)]
    assert chat.send("go on") == models["target"].generate(chat.history[:-1], temperature=0, max_new_tokens=20)
    chat.reset()
    assert chat._draft_prefix is None


# -- sampling: the target's distribution ---------------------------------------------------------------

def critical_chi2(df: int, z: float = 3.09) -> float:
    """Chi-square quantile at 1 - 1e-3 (z = 3.09), Wilson-Hilferty (accurate to ~1 % for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs`, cells with expected < 5 pooled; (statistic, df)."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    if obs[~keep].sum():  # a token of probability 0 was drawn
        return math.inf, int(keep.sum()) - 1
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


class Dummy:
    def decode(self, ids):
        return ""


def test_speculative_sampling_rule_gives_the_target_distribution_at_every_position():
    """The acceptance rule alone (verify_sampled) on fixed logits over 12 tokens: target logits for 4 positions,
    draft distributions q for 3, with a repetition penalty so the target's p depends on the tokens before.
    Every kept token (accepted draft, correction or bonus) at position i must follow p(. | the tokens kept
    before it): the expected counts are the sum of those conditional distributions over the 30,000 seeded
    rounds (a sum of independent draws with varying probabilities: Pearson's test is conservative)."""
    rng = np.random.default_rng(0)
    vocab, k, rounds = 12, 3, 30000
    target_logits = rng.standard_normal((k + 1, vocab)) * 1.5
    draft_logits = target_logits[:k] + rng.standard_normal((k, vocab))  # close, but not equal
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.95, repetition_penalty=1.5, seed=1)
    row = Row([0], frozenset(), Dummy(), (), None, make_sampler(params))
    q = [candidates(draft_logits[i], np.array([0]), params) for i in range(k)]  # any q is valid if drawn from
    counts, expected = np.zeros((k + 1, vocab)), np.zeros((k + 1, vocab))
    for _ in range(rounds):
        drafts = [draw(*q[i], row.sampler.rng) for i in range(k)]
        accepted, token = speculative.verify_sampled(row, target_logits, drafts, q, row.sampler.rng)
        for i, t in enumerate(drafts[:accepted] + [token]):
            counts[i, t] += 1
            expected[i] += distribution(target_logits[i], np.array([0] + drafts[:i]), params)
    for i in range(k + 1):
        stat, df = chi2(counts[i], expected[i] / expected[i].sum())
        assert counts[i].sum() > 1000 and stat < critical_chi2(df), (i, stat, df)
    # the draft's own distribution is far from the target's here: the test would see an error of the rule
    p0 = distribution(target_logits[0], np.array([0]), params)
    stat, df = chi2(np.bincount([draw(*q[0], rng) for _ in range(5000)], minlength=vocab), p0)
    assert stat > 10 * critical_chi2(df)


def test_sampling_with_a_draft_follows_the_target_distribution(models):
    """End to end on two tiny models: the 2nd generated token (the first one a draft proposes) of 2,000
    seeded runs against its exact marginal under the target, sum over x1 of p(x1) p(x2 | x1), computed with
    the same processing (repetition penalty, temperature, top-k, top-p)."""
    target, draft = models["target"], models["other"]
    params = dict(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.1)
    ids = target.encode("The quick")
    sp = target.sampling_params(**params)
    vocab = target.config["vocab_size"]

    def next_distribution(model, seq):
        cache = model.new_cache(1)
        logits = model.forward("prefill", np.array([seq]), np.ones((1, len(seq)), np.int64), cache)[0, -1]
        return distribution(logits, np.array(seq), sp, vocab)

    def marginal(model):
        first = next_distribution(model, ids)
        return sum(first[x] * next_distribution(model, ids + [x]) for x in np.flatnonzero(first))

    exact, draft_only = marginal(target), marginal(draft)
    runs = 2000
    counts = np.zeros(vocab)
    drafted = accepted = 0
    for seed in range(runs):
        c = target.complete([ids], max_new_tokens=6, seed=seed, draft=draft, draft_tokens=4, **params)[0]
        counts[c.token_ids[1]] += 1
        drafted, accepted = drafted + c.stats.drafted_tokens, accepted + c.stats.accepted_tokens
    stat, df = chi2(counts, exact)
    assert stat < critical_chi2(df), (stat, df)
    assert chi2(counts, draft_only)[0] > critical_chi2(df)  # the draft's own marginal is told apart
    assert 0 < accepted < drafted  # both acceptances and rejections happened
    # and a seed reproduces a sampled answer exactly
    a = target.complete([ids], max_new_tokens=20, seed=7, draft=draft, **params)[0]
    assert a.token_ids == target.complete([ids], max_new_tokens=20, seed=7, draft=draft, **params)[0].token_ids


def test_distribution_is_what_the_sampler_draws_from():
    logits = np.random.default_rng(3).standard_normal(50).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3, seed=0)
    seen = np.array([1, 2, 3])
    p = distribution(logits, seen, params)
    assert p.sum() == pytest.approx(1) and (p > 0).sum() <= 10
    sampler = make_sampler(params)
    draws = np.bincount([sampler(logits, seen) for _ in range(4000)], minlength=50)
    stat, df = chi2(draws, p)
    assert stat < critical_chi2(max(df, 3))
    greedy = distribution(logits, seen, SamplingParams(temperature=0, repetition_penalty=1.3))
    assert greedy.max() == 1 and int(np.argmax(greedy)) == make_sampler(SamplingParams(repetition_penalty=1.3))(
        logits, seen)


def test_adaptive_k_schedule():
    k = speculative.AdaptiveK(16)
    assert k.k == 4
    k.update(4, 4)
    assert k.k == 6
    for _ in range(10):
        k.update(k.k, k.k)
    assert k.k == 16
    k.update(16, 3)
    assert k.k == 15
    for _ in range(30):
        k.update(k.k, 0)
    assert k.k == 1
    assert speculative.AdaptiveK(2).k == 2


# -- refusals ---------------------------------------------------------------------------------------

def test_refusals(folders, models):
    target = models["target"]
    with pytest.raises(ArgumentError, match=r"draft .*alien: its tokenizer differs from .*\(\d+ tokens against \d+\)"):
        toolkit.load(folders["target"], draft=folders["alien"])
    with pytest.raises(ArgumentError, match="tokenizer differs"):
        target.generate("hi", draft=models["alien"])
    with pytest.raises(toolkit.ModelFolderError, match="nowhere"):
        toolkit.load(folders["target"], draft=folders["target"].parent / "nowhere")
    with pytest.raises(ArgumentError, match="draft: needs one prompt, not a batch of 2"):
        target.generate(["a", "b"], draft=models["same"])
    with pytest.raises(ArgumentError, match="draft and lookup"):
        target.generate("a", temperature=0, lookup=4, draft=models["same"])
    with pytest.raises(ArgumentError, match="per call, expected a Model"):
        target.generate("a", draft=str(folders["same"]))
    for bad in (0, 17, "4"):
        with pytest.raises(ArgumentError, match=f"draft_tokens {bad}"):
            target.generate("a", draft=models["same"], draft_tokens=bad)
    with pytest.raises(ArgumentError, match="draft_tokens 0"):
        toolkit.load(folders["target"], draft_tokens=0)
    # a model loaded with a draft: draft=False turns it off for one call (a batch, lookup)
    with_draft = toolkit.load(folders["target"], max_length=512, draft=folders["same"])
    assert with_draft.draft.manifest.folder == folders["same"] and with_draft.draft.max_length == 512
    with pytest.raises(ArgumentError, match="draft: needs one prompt"):
        with_draft.generate(["a", "b"], max_new_tokens=4)
    assert with_draft.generate(["a", "b"], max_new_tokens=4, temperature=0, draft=False) == target.generate(
        ["a", "b"], max_new_tokens=4, temperature=0)
    assert with_draft.generate("a", max_new_tokens=8, temperature=0, lookup=3, draft=False) == target.generate(
        "a", max_new_tokens=8, temperature=0)
    with_draft.set_draft(None)
    assert with_draft.draft is None


# -- command line ------------------------------------------------------------------------------------

def cli(*args, timeout=300):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_cli_generate_with_draft(folders):
    args = ["generate", folders["target"], "Write a Python function that reverses a string.", "--temperature", "0",
            "--max-new-tokens", "24", "--json"]
    plain = json.loads(cli(*args).stdout)
    r = cli(*args, "--draft", folders["same"], "--draft-tokens", "6")
    assert r.returncode == 0, r.stderr
    fast = json.loads(r.stdout)
    assert fast["token_ids"] == plain["token_ids"] and fast["text"] == plain["text"]
    assert fast["draft"]["drafted_tokens"] >= fast["draft"]["accepted_tokens"] > 0
    sampled = cli("generate", folders["target"], "hi", "--max-new-tokens", "8", "--seed", "3", "--draft",
                  folders["same"])
    assert sampled.returncode == 0, sampled.stderr
    for extra, needle in ((["--draft", folders["alien"]], "tokenizer differs"),
                          (["--draft", folders["same"], "--lookup", "4"], "--draft and --lookup"),
                          (["--draft", folders["same"], "--draft-tokens", "17"], "--draft-tokens"),
                          (["--draft", folders["target"].parent / "nowhere"], "nowhere")):
        bad = cli("generate", folders["target"], "hi", "--temperature", "0", *extra)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
            bad.stderr


def test_cli_chat_with_draft_shows_acceptance(folders):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(EXE, ["chat", str(folders["target"]), "--temperature", "0", "--max-new-tokens", "12",
                                "--draft", str(folders["same"])], encoding="utf-8", timeout=60)
    child.expect(">>> ")
    child.sendline("hello there")
    child.expect(r"decode \d+ tok, .* tok/s · draft \d+/\d+ accepted \(\d+ %\) · context \d+/512\]")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"drafted tokens \d+, accepted \d+ \(\d+\.\d %\)")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_cli_serve_with_draft(folders, models):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    with cli_server(folders["target"], "--max-length", "512", "--threads", "1", "--draft", str(folders["same"]),
                "--draft-tokens", "8") as url:
        history = [{"role": "user", "content": "hello there"}]
        for turn in range(2):
            body = {"model": "x", "messages": history, "temperature": 0, "max_tokens": 16}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
            want = models["target"].complete([history], temperature=0, max_new_tokens=16)[0]
            assert r["choices"][0]["message"]["content"] == want.text
            details = r["usage"]["completion_tokens_details"]
            assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] >= 0
            history += [{"role": "assistant", "content": want.text}, {"role": "user", "content": "and again"}]
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        health = httpx.get(f"{url}/health").json()
        assert health["draft"]["model"] == folders["same"].name
        assert health["draft"]["drafted_tokens"] >= health["draft"]["accepted_tokens"] > 0
