"""The installed `qwen-edge` command, as a user runs it: the happy path and every bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


EXE = str(Path(sys.executable).parent / "qwen-edge")


def cli(*args, timeout=300):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def assert_bad_input(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_export_generate_inspect(checkpoint, tmp_path):
    out = tmp_path / "int4"
    r = cli("export", checkpoint("untied_bf16"), out, "--bits", "4", "--group-size", "16", "--asymmetric")
    assert r.returncode == 0, r.stderr
    r = cli("generate", out, "Write a Python function that reverses a string.", "--max-new-tokens", "8",
            "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["prompt_ids"][0] == 1  # <|im_start|>: the chat template was applied
    assert 1 <= len(answer["token_ids"]) <= 8 and isinstance(answer["text"], str)
    raw = json.loads(cli("generate", out, "def", "--raw", "--json", "--max-new-tokens", "4", "--temperature", "0").stdout)
    assert raw["prompt_ids"][0] != 1
    r = cli("inspect", out, "--verify")
    assert r.returncode == 0, r.stderr
    assert "int4 asymmetric, group 16" in r.stdout and "match their sha256" in r.stdout
    assert json.loads(cli("inspect", out, "--json").stdout)["quantization"]["bits"] == 4
    streamed = cli("generate", out, "hi", "--max-new-tokens", "6", "--temperature", "0")
    assert streamed.returncode == 0 and streamed.stdout.endswith("\n")


def broken_checkpoint(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    if how == "no-config":
        (dst / "config.json").unlink()
    elif how == "no-weights":
        (dst / "model.safetensors").unlink()
    elif how == "model-type":
        (dst / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    elif how == "missing-tensor" or how == "bad-shape":
        from safetensors.numpy import load_file, save_file
        tensors = load_file(dst / "model.safetensors")
        name = "model.layers.1.mlp.up_proj.weight"
        if how == "missing-tensor":
            del tensors[name]
        else:
            tensors[name] = tensors[name][:, :32].copy()
        save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("how,needles", [
    ("no-config", ["config.json", "not found"]),
    ("no-weights", ["no model.safetensors"]),
    ("model-type", ["model_type 'llama'", "expected 'qwen2'"]),
    ("missing-tensor", ["model.layers.1.mlp.up_proj.weight is missing"]),
    ("bad-shape", ["model.layers.1.mlp.up_proj.weight has shape [128, 32]", "expected [128, 64]"]),
])
def test_bad_checkpoint_fails_cleanly_and_writes_nothing(how, needles, checkpoint, tmp_path):
    src = broken_checkpoint(checkpoint("tied_fp32"), tmp_path / "src", how)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    assert_bad_input(cli("export", src, out_parent / "model", "--bits", "4"), *needles)
    assert os.listdir(out_parent) == []  # no partial folder left behind


@pytest.mark.parametrize("args,needles", [
    (["--group-size", "128"], ["--group-size 128 does not divide", "hidden_size = 64"]),
    (["--group-size", "48"], ["--group-size 48", "power of two"]),
    (["--bits", "3"], ["--bits"]),
])
def test_bad_export_options(args, needles, checkpoint, tmp_path):
    assert_bad_input(cli("export", checkpoint("tied_fp32"), tmp_path / "m", *args), *needles)
    assert not (tmp_path / "m").exists()


def test_existing_output_needs_force(checkpoint, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    assert_bad_input(cli("export", checkpoint("tied_fp32"), out, "--bits", "32"), str(out), "--force")
    assert cli("export", checkpoint("tied_fp32"), out, "--bits", "32", "--force").returncode == 0
    assert (out / "qwen-edge.json").exists()


@pytest.mark.parametrize("args,needles", [
    (["--temperature", "-1"], ["temperature -1.0", ">= 0"]),
    (["--top-p", "0"], ["top_p 0.0", "(0, 1]"]),
    (["--top-p", "1.5"], ["top_p 1.5"]),
    (["--top-k", "-2"], ["top_k -2"]),
    (["--min-p", "1.5"], ["min_p 1.5", "[0, 1]"]),
    (["--max-length", "8"], ["prompt:", "max_length 8"]),
    (["--max-new-tokens", "0"], ["max_new_tokens 0"]),
    (["--lookup", "4", "--temperature", "0.5"], ["lookup: needs one prompt and greedy decoding"]),
    (["--lookup", "100", "--temperature", "0"], ["lookup 100"]),
])
def test_bad_generate_options(args, needles, exported):
    assert_bad_input(cli("generate", exported("tied_fp32", bits=32), "a long enough prompt to overflow", *args),
                     *needles)


def test_folder_without_manifest(checkpoint, tmp_path):
    assert_bad_input(cli("generate", checkpoint("tied_fp32"), "hi"), "qwen-edge.json", "not found")
    assert_bad_input(cli("inspect", tmp_path / "nothing"), "expected a model folder")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "qwen-edge.json").write_text("{not json")
    assert_bad_input(cli("inspect", tmp_path / "bad"), "not valid JSON")


def test_chat_in_a_terminal(exported):
    """A person's session: two turns (the second reuses the first's cache), a continued line, a system
    prompt, /stats, /reset, /exit. (Ctrl-C during an answer: tests/test_sample.py, where answers take
    long enough to be interrupted.)"""
    pexpect = pytest.importorskip("pexpect")
    folder = str(exported("tied_fp32", bits=32))
    child = pexpect.spawn(EXE, ["chat", folder, "--temperature", "0", "--max-new-tokens", "8"], encoding="utf-8",
                          timeout=60)
    child.expect(">>> ")
    child.sendline("hello there")
    child.expect(r"\[prefill \d+ tok \(0 reused\) in .* tok/s · decode \d+ tok, .* tok/s · context \d+/512\]")
    child.expect(">>> ")
    child.sendline("a second message that goes on \\")
    child.expect(r"\.\.\. ")
    child.sendline("over two lines")
    child.expect(r"\[prefill \d+ tok \(([1-9]\d*) reused\)")
    child.expect(">>> ")
    child.sendline("/system You are terse.")
    child.expect("system prompt set")
    child.sendline("/stats")
    child.expect(r"turns 2, tokens generated \d+, context \d+/512 tokens")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

