"""Bad input to the converter, each case found by review: safetensors headers and shard indexes, config
values, GGUF metadata, side files, an OUT that would destroy the source or another folder, and exports that
are killed (SIGTERM / SIGINT, or outright: stale partial folders). Every refusal is a one-line
ModelFolderError / ArgumentError naming the file, field or option."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from export import QuantSpec, export
from export.checkpoint import Checkpoint, SafetensorsFile
from export.convert import check_output, remove_stale
from export.gguf_checkpoint import GGUFCheckpoint
from export.manifest import check_side_files
from export.qwen2 import Qwen2Config
from test_cli import assert_bad_input, cli
from toolkit.errors import ArgumentError, ModelFolderError

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header (a dict/list as JSON, or bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def refused(error, call, *needles):
    """`call()` raises `error` with a one-line message containing every needle; returns the message."""
    with pytest.raises(error) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# -- 1. safetensors headers: validated by the safetensors package before any offset is used

BAD_SAFETENSORS = {
    "length 2^62": (safetensors_bytes({}, length=1 << 62), "header too large"),
    "length past the end": (safetensors_bytes({}, length=100), "invalid header length"),
    "3 bytes": (b"abc", "header too small"),
    "header is a list": (safetensors_bytes([1, 2]), "invalid type: sequence"),
    "not JSON": (safetensors_bytes(b"{nope"), "invalid JSON"),
    "negative offset": (safetensors_bytes({"a": {**F32x2, "data_offsets": [-8, 0]}}, b"\0" * 8), "-8"),
    "offset past the end": (safetensors_bytes({"a": F32x2}, b"\0" * 4), "incomplete metadata"),
    "bytes after the last tensor": (safetensors_bytes({"a": F32x2}, b"\0" * 12), "incomplete metadata"),
    "overlapping": (safetensors_bytes({"a": F32x2, "b": F32x2}, b"\0" * 8), "invalid offset for tensor"),
    "gap": (safetensors_bytes({"a": {**F32x2, "shape": [1], "data_offsets": [0, 4]},
                               "b": {**F32x2, "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12), "invalid offset"),
    "size not shape x dtype": (safetensors_bytes({"a": {**F32x2, "shape": [3]}}, b"\0" * 8), "invalid shape"),
    "shape overflows": (safetensors_bytes({"a": {**F32x2, "shape": [1 << 40, 1 << 40]}}, b"\0" * 8), "overflow"),
    "float offset": (safetensors_bytes({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, b"\0" * 8), "floating point"),
    "unknown dtype": (safetensors_bytes({"a": {**F32x2, "dtype": "Q4"}}, b"\0" * 8), "unknown variant"),
    "metadata not strings": (safetensors_bytes({"__metadata__": {"k": 1}, "a": F32x2}, b"\0" * 8), "expected a string"),
    "a key twice": (safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                      b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8),
                    "key 'a' appears twice"),
}


@pytest.mark.parametrize("name", BAD_SAFETENSORS)
def test_bad_safetensors_is_refused_naming_the_file(name, tmp_path):
    content, needle = BAD_SAFETENSORS[name]
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        refused(ModelFolderError, lambda: SafetensorsFile(path), str(path), needle)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20  # refused before allocating anything like the length
    finally:
        tracemalloc.stop()


def test_good_safetensors_reads_bf16_f16_f32(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 0.0]], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    header = {"__metadata__": {"format": "pt"},
              "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
              "h": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]},
              "f": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, bf16.tobytes() + values.astype(np.float16).tobytes() + values.tobytes()))
    st = SafetensorsFile(path)
    assert sorted(st.keys()) == ["b", "f", "h"]
    for name in "bhf":
        assert np.array_equal(st.get(name), values) and np.array_equal(st.get(name, slice(1, 2)), values[1:])


def test_unsupported_dtype_is_named_when_read(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\0\1"))
    refused(ModelFolderError, lambda: SafetensorsFile(path).get("a"), str(path), "tensor a", "unsupported dtype BOOL")


def sharded(folder: Path, weight_map: dict, shards: dict | None = None) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name, content in (shards or {}).items():
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "", 7, None])
def test_shard_names_stay_in_the_folder(shard, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(safetensors_bytes({"a": F32x2}, b"\0" * 8))
    folder = sharded(tmp_path / "ckpt", {"a": shard})
    refused(ModelFolderError, lambda: Checkpoint(folder), "model.safetensors.index.json", "weight_map")


def test_shard_that_lacks_a_listed_tensor(tmp_path):
    folder = sharded(tmp_path / "ckpt", {"a": "s.safetensors", "b": "s.safetensors"},
                     {"s.safetensors": safetensors_bytes({"a": F32x2}, b"\0" * 8)})
    refused(ModelFolderError, lambda: Checkpoint(folder), "tensor b is listed in s.safetensors, which does not have it")


@pytest.mark.parametrize("text,needle", [("[1, 2]", "expected a JSON object, got list"), ("[" * 100000, "not valid"),
                                         ("\xff", "not valid JSON")])
def test_config_json_that_is_not_an_object(text, needle, tmp_path):
    (tmp_path / "config.json").write_text(text, encoding="latin-1")
    refused(ModelFolderError, lambda: Checkpoint(tmp_path), "config.json", needle)


# -- 2. config.json values (and GGUF metadata, which goes through the same Qwen2Config.from_dict)

CONFIG = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True, "eos_token_id": 0}

BAD_CONFIGS = [
    ({"num_key_value_heads": 0}, "num_key_value_heads 0: expected an integer in [1, 4096]"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"num_key_value_heads": 8}, "is not a multiple of num_key_value_heads 8"),
    ({"hidden_size": 64.5}, "hidden_size 64.5: expected an integer"),
    ({"hidden_size": 66}, "hidden_size 66 is not a multiple of num_attention_heads 4"),
    ({"hidden_size": 1 << 30}, "hidden_size 1073741824: expected an integer in [1, 1048576]"),
    ({"hidden_size": True}, "hidden_size True: expected an integer"),
    ({"hidden_size": None}, "hidden_size is missing"),
    ({"num_hidden_layers": -3}, "num_hidden_layers -3: expected an integer in [1, 1024]"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers '2'"),
    ({"intermediate_size": 0}, "intermediate_size 0"),
    ({"vocab_size": 1 << 25}, "vocab_size 33554432: expected an integer in [1, 16777216]"),
    ({"num_attention_heads": 0}, "num_attention_heads 0"),
    ({"head_dim": 15}, "head_dim 15"),
    ({"head_dim": 1024}, "head_dim 1024: expected an integer in [0, 512]"),
    ({"hidden_size": 4, "num_attention_heads": 4, "num_key_value_heads": 1}, "head_dim 1 (given or hidden_size"),
    ({"rms_norm_eps": 0}, "rms_norm_eps 0: expected a number in (0, 1)"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps nan"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps '1e-6'"),
    ({"rope_theta": 1.0}, "rope_theta 1.0: expected a finite number > 1"),
    ({"rope_theta": float("inf")}, "rope_theta inf"),
    ({"max_position_embeddings": 0}, "max_position_embeddings 0"),
    ({"max_position_embeddings": 1 << 21}, "max_position_embeddings 2097152: expected an integer in [1, 1048576]"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings 'false': expected true or false"),
    ({"use_sliding_window": "yes"}, "use_sliding_window 'yes'"),
    ({"rope_scaling": "yarn"}, "rope_scaling 'yarn': expected an object or null"),
    ({"rope_scaling": ["yarn"]}, "rope_scaling ['yarn']"),
    ({"rope_scaling": {"type": "yarn", "factor": 1e9}},
     "rope_scaling.factor 1e+09 × original_max_position_embeddings"),
    ({"eos_token_id": 320}, "eos_token_id 320: expected a token id in [0, 320), a list of them or null"),
    ({"eos_token_id": [1, "x"]}, "eos_token_id [1, 'x']"),
    ({"pad_token_id": [1]}, "pad_token_id [1]: expected a token id in [0, 320) or null"),
    ({"model_type": ["qwen2"]}, "model_type ['qwen2'] is not supported"),
]


@pytest.mark.parametrize("change,needle", BAD_CONFIGS, ids=[str(c) for c, _ in BAD_CONFIGS])
def test_config_fields_are_checked(change, needle):
    refused(ModelFolderError, lambda: Qwen2Config.from_dict(CONFIG | change, "ckpt/config.json"),
            "ckpt/config.json: ", needle)


def test_config_defaults_and_derived_values():
    base = {k: v for k, v in CONFIG.items() if k not in ("num_key_value_heads", "rope_theta", "max_position_embeddings",
                                                          "tie_word_embeddings")}
    cfg = Qwen2Config.from_dict(base | {"head_dim": None, "rope_scaling": None})
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
            cfg.tie_word_embeddings) == (4, 16, 10000.0, 32768, False)
    assert Qwen2Config.from_dict(CONFIG | {"head_dim": 32}).head_dim == 32  # given: may differ from hidden / heads
    refused(ModelFolderError, lambda: Qwen2Config.from_dict([CONFIG], "c.json"), "c.json: expected a JSON object")


def tiny_gguf(path: Path, metadata=None, tokens: int = 8) -> Path:
    """A small valid qwen2 GGUF (1 layer, hidden 32, 2 heads / 1 KV head, `tokens` tokens), its q/k/v in
    Q8_0; `metadata` calls GGUFWriter methods in place of the defaults ({"add_head_count_kv": 0})."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    meta = {"add_block_count": 1, "add_context_length": 64, "add_embedding_length": 32,
            "add_feed_forward_length": 32, "add_head_count": 2, "add_head_count_kv": 1, "add_rope_freq_base": 10000.0,
            "add_layer_norm_rms_eps": 1e-6, "add_tokenizer_model": "gpt2", "add_tokenizer_pre": "qwen2",
            "add_token_list": ["a", "b", "ab", "c", "abc", "d", "<|endoftext|>", "<|im_end|>"][:tokens],
            "add_token_types": [1] * (tokens - 2) + [3, 3], "add_token_merges": ["a b", "ab c"],
            "add_eos_token_id": tokens - 1, "add_pad_token_id": tokens - 2, "add_chat_template": "{{ messages }}"}
    for method, value in (meta | (metadata or {})).items():
        getattr(w, method)(value)
    shapes = {"token_embd.weight": (tokens, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_q.bias": (32,),
              "blk.0.attn_k.weight": (16, 32), "blk.0.attn_k.bias": (16,), "blk.0.attn_v.weight": (16, 32),
              "blk.0.attn_v.bias": (16,), "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_gate.weight": (32, 32),
              "blk.0.ffn_up.weight": (32, 32), "blk.0.ffn_down.weight": (32, 32)}
    for name, shape in shapes.items():
        t = rng.standard_normal(shape).astype(np.float32)
        if name.split(".")[-2] in ("attn_q", "attn_k", "attn_v") and t.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def open_gguf(path: Path):
    """What the export reads of a GGUF before its long passes: config, every tensor, the side files."""
    from export import qwen2

    ckpt = GGUFCheckpoint(path)
    cfg = Qwen2Config.from_dict(ckpt.config, str(path))
    for name, shape in qwen2.expected_tensors(cfg).items():
        ckpt.tensor(name, shape)
    side = path.parent / f"side-{path.stem}"
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir()
    ckpt.write_side_files(side)
    check_side_files(side, path, cfg.vocab_size)
    return ckpt, cfg


def test_tiny_gguf_opens(tmp_path):
    ckpt, cfg = open_gguf(tiny_gguf(tmp_path / "m.gguf"))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.vocab_size) == (1, 32, 16, 8)
    assert cfg.tie_word_embeddings


@pytest.mark.parametrize("metadata,needle", [
    ({"add_head_count_kv": 0}, "num_key_value_heads 0"),
    ({"add_block_count": 0}, "num_hidden_layers 0"),
    ({"add_layer_norm_rms_eps": -1.0}, "rms_norm_eps -1.0"),
    ({"add_rope_freq_base": 0.5}, "rope_theta 0.5"),
    ({"add_eos_token_id": 99}, "eos_token_id 99"),
    ({"add_token_types": [1, 1]}, "tokenizer.ggml.token_type [1, 1]: expected an array of integers, one per token (8)"),
    ({"add_token_merges": ["ab"]}, "tokenizer.ggml.merges has an entry without a space"),
])
def test_gguf_metadata_is_checked(metadata, needle, tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf", metadata)
    refused(ModelFolderError, lambda: open_gguf(path), "m.gguf", needle)


def test_gguf_string_that_is_not_utf8(tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data.replace(b"gpt2", b"gp\xff2", 1))
    refused(ModelFolderError, lambda: open_gguf(path), "m.gguf", "metadata tokenizer.ggml.model is unreadable")


def test_gguf_tensor_data_that_does_not_fit_its_type(tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf")
    ckpt = GGUFCheckpoint(path)
    t = ckpt.tensors["blk.0.attn_q.weight"]
    ckpt.tensors["blk.0.attn_q.weight"] = t._replace(data=t.data[:, :-1])  # a row of Q8_0 blocks cut short
    refused(ModelFolderError, lambda: ckpt.tensor("model.layers.0.self_attn.q_proj.weight", (32, 32)), "m.gguf",
            "blk.0.attn_q.weight (Q8_0) is unreadable")


# -- side files: refused before the long passes, naming the checkpoint's file

@pytest.mark.parametrize("file,change,needle", [
    ("tokenizer.json", "{not json", "tokenizer.json: the tokenizers library cannot load it"),
    ("tokenizer_config.json", {"eos_token": ["<|im_end|>"]}, "eos_token ['<|im_end|>']: expected a string"),
    ("tokenizer_config.json", {"chat_template": [{"name": "default"}]}, "chat_template [{'name': 'default'}]"),
    ("tokenizer_config.json", "[1]", "tokenizer_config.json: expected a JSON object, got list"),
    ("generation_config.json", {"temperature": "hot"}, "temperature 'hot': expected a number >= 0"),
    ("generation_config.json", {"top_p": 0}, "top_p 0: expected a number in (0, 1]"),
    ("generation_config.json", {"top_k": 2.5}, "top_k 2.5: expected an integer >= 0"),
    ("generation_config.json", {"eos_token_id": [2, -1]}, "eos_token_id [2, -1]: expected a token id in [0, 320)"),
    ("generation_config.json", {"pad_token_id": "x"}, "pad_token_id 'x'"),
    ("generation_config.json", {"do_sample": "yes"}, "do_sample 'yes': expected true or false"),
    ("chat_template.jinja", b"\xff\xfe", "chat_template.jinja: not UTF-8"),
])
def test_side_files_are_checked(file, change, needle, checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tied_fp32"), src)
    path = src / file
    if isinstance(change, dict):
        path.write_text(json.dumps(json.loads(path.read_text()) | change))
    else:
        path.write_bytes(change if isinstance(change, bytes) else change.encode())
    side = tmp_path / "side"
    side.mkdir()
    Checkpoint(src).write_side_files(side)
    refused(ModelFolderError, lambda: check_side_files(side, src, 320), str(src / file), needle)


# -- 3. OUT may replace only an earlier export (or an empty folder), never the source

def test_out_that_is_contains_or_is_inside_the_source(checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tied_fp32"), src)
    before = sorted(os.listdir(src))
    for out, where in ((src, "is the source"), (tmp_path, "contains the source"), (src / "onnx", "is inside"),
                       (src / ".." / "ckpt", "is the source")):
        refused(ArgumentError, lambda: check_output(src, out, force=True), str(out), where)
    (tmp_path / "link").symlink_to(src)
    refused(ArgumentError, lambda: check_output(tmp_path / "link", src, force=True), "is the source")
    assert sorted(os.listdir(src)) == before


def test_out_next_to_a_gguf_file(tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf")
    refused(ArgumentError, lambda: check_output(path, path, force=True), "is the source")
    refused(ArgumentError, lambda: check_output(path, tmp_path, force=True), "contains the source")
    check_output(path, tmp_path / "m-int4", force=False)  # the file's folder is not the source: allowed
    assert path.exists()


def test_force_replaces_only_an_export(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "file").write_text("precious")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "qwen-edge.json").write_text('{"format": "something-else"}')
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("mine", "file", "other", "dangling"):
        refused(ArgumentError, lambda: check_output(Path("src"), tmp_path / name, force=True),
                "is not a qwen-edge model folder", "even with --force")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious" and (tmp_path / "file").read_text() == "precious"
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "qwen-edge.json").write_text('{"format": "qwen-edge"}')
    refused(ArgumentError, lambda: check_output(Path("src"), tmp_path / "export", force=False), "pass --force")
    check_output(Path("src"), tmp_path / "export", force=True)
    (tmp_path / "empty").mkdir()
    check_output(Path("src"), tmp_path / "empty", force=True)


def test_cli_export_onto_its_source_keeps_it(checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tied_fp32"), src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert_bad_input(cli("export", src, src, "--force"), str(src), "is the source")
    assert_bad_input(cli("export", src, src / "sub", "--force"), "is inside the source")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    assert_bad_input(cli("export", src, tmp_path / "notes", "--force"), "is not a qwen-edge model folder")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"


# -- CLI end to end: corrupted inputs give exit 2 and one line, and leave nothing behind

@pytest.mark.parametrize("how,needles", [
    ("header length 2^62", ["model.safetensors", "header too large"]),
    ("truncated", ["model.safetensors", "not a valid safetensors file"]),
    ("kv heads 0", ["config.json", "num_key_value_heads 0"]),
    ("hidden 64.5", ["config.json", "hidden_size 64.5"]),
])
def test_cli_corrupted_checkpoint(how, needles, checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tied_fp32"), src)
    weights, config = src / "model.safetensors", src / "config.json"
    if how == "header length 2^62":
        weights.write_bytes(struct.pack("<Q", 1 << 62) + weights.read_bytes()[8:])
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        change = {"num_key_value_heads": 0} if how == "kv heads 0" else {"hidden_size": 64.5}
        config.write_text(json.dumps(json.loads(config.read_text()) | change))
    (tmp_path / "out").mkdir()
    assert_bad_input(cli("export", src, tmp_path / "out" / "m", "--bits", "4"), *needles)
    assert os.listdir(tmp_path / "out") == []


# -- 4. killed exports: signals clean up, stale partial folders are removed, everything is flushed

SLOW_EXPORT = """
import sys, time
import export.convert as convert
real = convert.write_graphs
def slow(*args, **kwargs):
    print("graphs", flush=True)
    time.sleep(120)
    return real(*args, **kwargs)
convert.write_graphs = slow
from toolkit.cli import main
main(["export", sys.argv[1], sys.argv[2], "--bits", "32"])
"""


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signalled_export_leaves_nothing(sig, status, checkpoint, tmp_path):
    out = tmp_path / "out" / "m"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(checkpoint("tied_fp32")), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "graphs\n", proc.stderr.read()
        partial = os.listdir(out.parent)
        assert len(partial) == 1 and partial[0].startswith(f".m.partial-{proc.pid}-"), partial
        assert "model.weights" in os.listdir(out.parent / partial[0])
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == status, proc.stderr.read()
    finally:
        proc.kill()
    assert os.listdir(out.parent) == []
    assert "Traceback" not in proc.stderr.read()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_folders_are_removed(checkpoint, tmp_path):
    dead, alive = dead_pid(), os.getpid()
    planted = {f".m.partial-{dead}-deadbeef": False, f".m.old-{dead}-0badf00d": False,
               f".m.partial-{alive}-12345678": True,  # a running export's
               ".m.partial-k3j4h5g6": True,  # no pid (an older qwen-edge): left alone
               f".other.partial-{dead}-deadbeef": True}  # another OUT's
    for name in planted:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.weights").write_bytes(b"x")
    out = export(checkpoint("tied_fp32"), tmp_path / "m", QuantSpec(32), log=lambda m: None)
    assert {name for name in planted if (tmp_path / name).exists()} == {n for n, kept in planted.items() if kept}
    assert (out / "qwen-edge.json").exists()
    remove_stale(tmp_path / "m")  # also on its own: the running one's stays
    assert (tmp_path / f".m.partial-{alive}-12345678").exists()


def test_export_hygiene(checkpoint, tmp_path, monkeypatch):
    """Files and folders flushed before and after the rename, the usual mode without umask juggling, the
    source recorded by name, signal handlers put back."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the flushed files")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask is process-wide"))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    src = checkpoint("tied_fp32")
    out = export(src, tmp_path / "m", QuantSpec(32), log=lambda m: None)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    partial = {Path(p).name for p in synced if Path(p).name.startswith(".m.partial-")}  # the folder itself
    assert len(partial) == 1
    assert {Path(p).name for p in synced if Path(p).parent.name in partial} == set(os.listdir(out))
    assert str(tmp_path.resolve()) in synced  # its parent, after the rename
    os.mkdir(tmp_path / "probe", 0o777)
    assert (out.stat().st_mode & 0o7777) == ((tmp_path / "probe").stat().st_mode & 0o7777)
    manifest = json.loads((out / "qwen-edge.json").read_text())
    assert manifest["export"]["source"] == src.name
    assert str(tmp_path) not in (out / "qwen-edge.json").read_text()


def test_replacing_an_export_with_force(checkpoint, tmp_path):
    out = export(checkpoint("tied_fp32"), tmp_path / "m", QuantSpec(32), log=lambda m: None)
    (out / "stale.txt").write_text("from the earlier export")
    started = time.time()
    export(checkpoint("tied_fp32"), out, QuantSpec(32), force=True, log=lambda m: None)
    assert not (out / "stale.txt").exists() and (out / "qwen-edge.json").stat().st_mtime >= started - 1
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no .m.old-* left
