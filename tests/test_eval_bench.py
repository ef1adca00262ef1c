"""`qwen-edge eval` (perplexity, KL, top-1 over sliding windows) and `qwen-edge bench`."""
import json

import numpy as np
import pytest
import torch

import toolkit
from test_cli import assert_bad_input, cli
from tiny import CORPUS, oracle
from toolkit.errors import ArgumentError
from toolkit.evaluate import evaluate, windows

TEXT = "".join(CORPUS[:8])


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (11, 4, 4), (100, 32, 8), (5, 8, 4), (2, 2, 1)])
def test_windows_score_every_target_once_with_enough_context(n, window, stride):
    plan = windows(n, window, stride)
    targets = [t for start, end, first in plan for t in range(first, end)]
    assert targets == list(range(1, n))
    for start, end, first in plan[1:]:
        assert end - start <= window and first - start >= window - stride


def test_bad_window_is_refused():
    with pytest.raises(ArgumentError, match="stride"):
        windows(100, 16, 32)


def test_perplexity_matches_the_oracles_loss(checkpoint, exported):
    model = toolkit.load(exported("tied_fp32", bits=32))
    ids = model.tokenizer.encode(TEXT)[:60]
    scores = evaluate(model, ids, window=64, stride=32)  # one window: plain teacher forcing
    with torch.no_grad():
        loss = oracle(checkpoint("tied_fp32"))(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert scores.summary()["ppl"] == pytest.approx(np.exp(loss), rel=1e-4)


def test_a_model_against_itself_has_zero_kl(exported):
    model = toolkit.load(exported("tied_fp32", bits=4))
    ids = model.tokenizer.encode(TEXT)[:150]
    s = evaluate(model, ids, reference=model, window=64, stride=16).summary()
    assert s["kl_mean"] == pytest.approx(0, abs=1e-9) and s["top1"] == 1.0 and s["ppl_ratio"] == pytest.approx(1)
    assert s["tokens_scored"] == 149


def test_eval_cli_reports_kl_of_int4_against_float(exported, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    r = cli("eval", exported("untied_bf16", bits=4), "--text", text, "--reference",
            exported("untied_bf16", bits=32), "--window", "64", "--stride", "32", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["kl_mean"] > 0 and 0 < report["top1"] <= 1 and report["ppl"] > 1
    assert report["quantization"]["bits"] == 4 and report["quantization"]["method"] == "rtn"
    assert report["tokens_scored"] == report["tokens"] - 1
    plain = cli("eval", exported("untied_bf16", bits=4), "--text", text)
    assert plain.returncode == 0 and "ppl" in plain.stdout


def test_eval_bad_inputs(exported, tmp_path):
    folder = exported("tied_fp32", bits=32)
    assert_bad_input(cli("eval", folder, "--text", tmp_path / "missing.txt"), "--text", "missing.txt")
    (tmp_path / "t.txt").write_text("hello world, hello world")
    assert_bad_input(cli("eval", folder, "--text", tmp_path / "t.txt", "--window", "8", "--stride", "16"),
                     "stride 16")


def test_bench_cli_json(exported):
    r = cli("bench", exported("tied_fp32", bits=4), "--prompt-tokens", "16", "--new-tokens", "8", "--runs", "2",
            "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for key in ("load_s", "peak_rss_bytes", "weights_bytes"):
        assert report[key] > 0
    for key in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
        assert report[key]["min"] <= report[key]["median"] <= report[key]["max"]
    assert_bad_input(cli("bench", exported("tied_fp32", bits=4), "--runs", "0"), "--runs 0")
