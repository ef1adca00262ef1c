"""export --untie: a checkpoint with tied embeddings exported with an lm_head of its own (export/checkpoint.Untied),
so that GPTQ quantizes the lm_head as a matrix (a tied table gets the calibrated search: it is also the
embedding)."""
from pathlib import Path

import numpy as np
import pytest

import toolkit
from export import QuantSpec, export
from test_cli import assert_bad_input, cli
from test_compensate import kl_to_oracle

TEXT = (Path(__file__).parent / "data" / "prose.txt").read_text(encoding="utf-8")


def test_float_untied_export_computes_what_the_tied_one_does(checkpoint, exported, tmp_path):
    src = checkpoint("tied_fp32")
    tied = toolkit.load(exported("tied_fp32"))
    untied = toolkit.load(export(src, tmp_path / "m", QuantSpec(bits=32), untie=True, log=lambda m: None))
    assert tied.manifest["quantization"]["untied"] is False and tied.manifest["quantization"]["tied_embeddings"]
    q = untied.manifest["quantization"]
    assert q["untied"] is True and q["tied_embeddings"] is False
    ids = np.array([tied.tokenizer.encode(TEXT)[:64]])
    a = tied.forward("prefill", ids, np.ones_like(ids), tied.new_cache(1), num_logits=64)
    b = untied.forward("prefill", ids, np.ones_like(ids), untied.new_cache(1), num_logits=64)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_untied_compensated_export_quantizes_the_lm_head_apart_and_tracks_the_oracle_better(checkpoint, tmp_path):
    """Tied: one blob for both, searched; untied: the lm_head by GPTQ, the embedding on its own (8-bit here);
    the untied logits are closer to transformers' float model on held-out prose."""
    src = checkpoint("tied_fp32")
    spec = QuantSpec(bits=4, group_size=16, symmetric=False, method="compensated", lm_head_bits=4, embed_bits=8,
                     int8_accuracy_level=0)
    kl = {}
    for untie in (False, True):
        folder = export(src, tmp_path / str(untie), spec, untie=untie, log=lambda m: None, calibration_sequences=16)
        model = toolkit.load(folder)
        stored = model.manifest["quantization"]["quantized_tensors"]
        if untie:
            assert stored["lm_head.weight"] == 4 and stored["model.embed_tokens.weight"] == 8
        else:
            assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"] == 4
        kl[untie] = kl_to_oracle(folder, src, model.tokenizer.encode(TEXT)[:400])
    assert kl[True] < kl[False], kl


def test_untie_refuses_a_checkpoint_that_is_untied_already(checkpoint, tmp_path):
    out = tmp_path / "m"
    assert_bad_input(cli("export", checkpoint("untied_bf16"), out, "--bits", "4", "--untie"), "--untie",
                     "tie_word_embeddings")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("untie", [False, True])
def test_cli_untie_flag(checkpoint, tmp_path, untie):
    out = tmp_path / "m"
    r = cli("export", checkpoint("tied_fp32"), out, "--bits", "4", "--method", "rtn", *(["--untie"] if untie else []))
    assert r.returncode == 0, r.stderr
    assert toolkit.load(out).manifest["quantization"]["untied"] is untie
