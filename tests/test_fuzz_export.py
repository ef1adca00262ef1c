"""Fuzzing the converter's readers with hypothesis: mutated safetensors files, config.json dicts and GGUF
files. Property, for every case: reading it (what the export does before its long passes) either succeeds
or raises a QwenEdgeError with a one-line message — never another exception, never a hang (each case has
10 s), never more than 100 MB (Python/numpy allocations by tracemalloc; on Linux also the case's peak
RSS, which sees the Rust and C readers too).

The cases each target ran are counted and printed (`pytest -s`); a target that ran fewer than MIN_CASES
fails. Bounded (EXAMPLES per target, tiny inputs) so the file takes well under a minute on 2 cores;
FUZZ_EXAMPLES=20000 runs longer.
"""
import json
import os
import shutil
import signal
import struct
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from export import qwen2, rope
from export.checkpoint import Checkpoint, open_checkpoint
from export.prequantized import PrequantizedFormat
from test_hardening_export import CONFIG, open_gguf, safetensors_bytes, tiny_gguf
from toolkit.errors import QwenEdgeError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 500))  # per target; more for a longer local run
MIN_CASES = 50
MEMORY = 100 << 20
SECONDS = 10
CASES = Counter()  # target -> cases run
OUTCOMES = Counter()  # (target, "ok" | "refused") -> cases
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORK = Path(tempfile.mkdtemp(prefix="qwen-edge-fuzz-"))


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a case ran longer than {SECONDS} s")


def rss(field: str) -> int | None:
    """VmRSS (now) or VmHWM (peak) of this process in bytes, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> bool:
    """Reset the peak RSS (Linux: VmHWM), so the next reading is one case's peak, not the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(target: str, read) -> None:
    """One case: `read()` succeeds or raises a one-line QwenEdgeError, in bounded time and memory."""
    CASES[target] += 1
    measured = reset_peak_rss()
    before = rss("VmRSS")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    tracemalloc.start()
    try:
        read()
        OUTCOMES[target, "ok"] += 1
    except QwenEdgeError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        OUTCOMES[target, "refused"] += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY, f"{target}: one case allocated {peak / 1e6:.0f} MB"
    if measured and before is not None:
        grown = rss("VmHWM") - before
        assert grown < MEMORY, f"{target}: one case's peak RSS was {grown / 1e6:.0f} MB above its start"


def report(target: str) -> None:
    print(f"\nfuzz {target}: {CASES[target]} cases ({OUTCOMES[target, 'ok']} read, "
          f"{OUTCOMES[target, 'refused']} refused)")
    assert CASES[target] >= MIN_CASES, f"{target}: only {CASES[target]} cases ran"


def mutate(data: bytes, edits) -> bytes:
    """Apply ("flip", position, byte), ("u64", position, value) and ("truncate", length, _) edits."""
    data = bytearray(data)
    for how, pos, value in edits:
        if how == "flip" and pos < len(data):
            data[pos] = value
        elif how == "u64" and pos + 8 <= len(data):
            data[pos:pos + 8] = struct.pack("<Q", value % (1 << 64))
        elif how == "truncate":
            del data[pos:]
    return bytes(data)


# JSON values of every kind, small
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)
interesting_ints = st.sampled_from([0, 1, -1, 2, 7, 8, 16, 31, 32, 64, 65, 1 << 31, 1 << 32, 1 << 62, (1 << 64) - 1,
                                    1 << 64])
small_ints = st.integers(-4, 70) | interesting_ints
byte_values = st.integers(0, 255) | st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xC0, 0xFF])  # 0x80 and up: not UTF-8


# -- safetensors: a valid small file, mutated

TENSORS = {"w.bf16": ("BF16", (4, 8)), "w.f16": ("F16", (3, 8)), "w.f32": ("F32", (8,)), "w.i32": ("I32", (2, 2)),
           "w.empty": ("F32", (0, 8))}
SIZES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}


def valid_safetensors() -> tuple[dict, bytes]:
    header, data, rng = {"__metadata__": {"format": "pt"}}, b"", np.random.default_rng(0)
    for name, (dtype, shape) in TENSORS.items():
        n = int(np.prod(shape)) * SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + n]}
        data += rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return header, data


HEADER, DATA = valid_safetensors()
VALID = safetensors_bytes(HEADER, DATA)

tensor_fields = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])
field_values = (json_values | st.sampled_from(["F32", "F16", "BF16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F64"])
                | st.lists(small_ints, max_size=4))
header_edits = st.lists(st.tuples(st.sampled_from([*TENSORS, "__metadata__", "new"]), tensor_fields,
                                  field_values | st.just("<delete>")), min_size=1, max_size=4)
safetensors_edits = st.lists(st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), byte_values)
                             | st.tuples(st.just("u64"), st.just(0), interesting_ints | st.integers(0, (1 << 64) - 1))
                             | st.tuples(st.just("truncate"), st.integers(0, len(VALID) - 1), st.just(0)),
                             min_size=1, max_size=6)


@st.composite
def mutated_safetensors(draw) -> bytes:
    """Byte edits of the valid file (the first 8 bytes are the header length), bytes appended, or edits of
    its JSON header (random values for dtype / shape / data_offsets, extra keys, deleted keys and tensors)."""
    how = draw(st.sampled_from(["bytes", "bytes", "append", "header", "header"]))
    if how == "bytes":
        return mutate(VALID, draw(safetensors_edits))
    if how == "append":
        return VALID + draw(st.binary(min_size=1, max_size=64))
    header = json.loads(json.dumps(HEADER))
    for name, field, value in draw(header_edits):
        entry = header.setdefault(name, {})
        if not isinstance(entry, dict):
            header[name] = value
        elif value == "<delete>":
            entry.pop(field, None) if draw(st.booleans()) else header.pop(name, None)
        else:
            entry[field] = value
    return safetensors_bytes(json.dumps(header).encode(), DATA)


def read_safetensors_folder(folder: Path) -> None:
    """What the export reads: the header (Checkpoint), each tensor checked against its shape, then read:
    whole, a block of rows, by ids, and raw."""
    ckpt = Checkpoint(folder)
    for name, (_, shape) in TENSORS.items():
        ckpt.check(name, shape)
        ckpt.tensor(name, shape)
        if shape[0]:
            ckpt.tensor(name, shape, slice(1, 3))
            ckpt.tensor(name, shape, np.array([0, shape[0] - 1]))
        ckpt.raw(name)


def checkpoint_folder(name: str, weights: bytes) -> Path:
    """A folder with an empty config.json and `weights` as model.safetensors (a new one each case: the
    readers map the file)."""
    folder = WORK / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


@FUZZ
@given(content=mutated_safetensors())
def fuzz_safetensors(content):
    folder = checkpoint_folder(f"st-{CASES['safetensors']}", content)
    try:
        run_case("safetensors", lambda: read_safetensors_folder(folder))
    finally:
        shutil.rmtree(folder)


def test_fuzz_safetensors():
    read_safetensors_folder(checkpoint_folder("st-valid", VALID))  # the unmutated file reads
    fuzz_safetensors()
    report("safetensors")


# -- config.json: a valid dict, fields replaced by random values or removed

FIELDS = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
          "head_dim", "use_sliding_window", "bos_token_id", "eos_token_id", "pad_token_id", "rope_scaling",
          "quantization_config"]
rope_scalings = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["yarn", "default", "linear", None]) | json_values,
    "rope_type": st.sampled_from(["yarn", "default"]) | json_values,
    "factor": st.floats(-10, 1e7) | json_values, "original_max_position_embeddings": small_ints | json_values,
    "beta_fast": st.floats(-1, 1e6) | json_values, "beta_slow": st.floats(-1, 1e6) | json_values,
    "mscale": st.floats(-1, 1e4) | json_values, "mscale_all_dim": st.floats(-1, 1e4) | json_values,
    "attention_factor": st.floats(-1, 1e4) | json_values, "truncate": st.booleans() | json_values})
quantization_configs = st.fixed_dictionaries({}, optional={
    "quant_method": st.sampled_from(["gptq", "awq", "GPTQ", "bnb"]) | json_values,
    "bits": st.sampled_from([2, 4, 8]) | json_values, "group_size": st.sampled_from([-1, 32, 128, 48]) | json_values,
    "checkpoint_format": st.sampled_from(["gptq", "gptq_v2", "marlin"]) | json_values, "sym": json_values,
    "version": st.sampled_from(["gemm", "gemv"]) | json_values, "zero_point": json_values,
    "pack_dtype": st.sampled_from(["int32", "int16"]) | json_values, "dynamic": json_values, "backend": json_values})
config_values = (json_values | small_ints | st.floats(-1e6, 1e6) | rope_scalings | quantization_configs
                 | st.lists(small_ints, max_size=3))
config_edits = st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=6), config_values | st.just("<delete>")),
                        min_size=1, max_size=5)


def read_config(d: dict) -> None:
    """Qwen2Config.from_dict and the pre-quantized format; an accepted config must be usable: sane
    numbers, and RoPE tables that compute and are finite."""
    PrequantizedFormat.from_config(d, "config.json")
    cfg = qwen2.Qwen2Config.from_dict(d, "config.json")
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.head_dim % 2 == 0
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
        assert type(getattr(cfg, name)) is int and 0 < getattr(cfg, name) <= qwen2.LIMITS[name], name
    assert 0 < cfg.context_length <= qwen2.LIMITS["max_position_embeddings"]
    cos, sin = rope.tables(cfg.head_dim, cfg.rope_theta, np.array([0, 1, cfg.context_length - 1]), cfg.rope_scaling)
    assert np.isfinite(cos).all() and np.isfinite(sin).all()
    assert len(qwen2.expected_tensors(cfg)) >= 4


@FUZZ
@given(edits=config_edits)
def fuzz_config(edits):
    d = dict(CONFIG)
    for field, value in edits:
        if value == "<delete>":
            d.pop(field, None)
        else:
            d[field] = value
    run_case("config", lambda: read_config(d))


def test_fuzz_config():
    read_config(CONFIG)
    fuzz_config()
    report("config")


# -- GGUF: a tiny valid file, bytes of its first KB flipped or overwritten, or the file cut short

GGUF = tiny_gguf(WORK / "valid.gguf").read_bytes()
HEAD = min(1024, len(GGUF))
TEXT = [i for i, b in enumerate(GGUF[:HEAD]) if 0x20 < b < 0x7F]  # inside keys and string values
gguf_edits = st.lists(st.tuples(st.just("flip"), st.integers(0, HEAD - 1) | st.sampled_from(TEXT), byte_values)
                      | st.tuples(st.just("u64"), st.integers(0, HEAD - 8), interesting_ints)  # a length or count
                      | st.tuples(st.just("truncate"), st.integers(0, len(GGUF) - 1), st.just(0)),
                      min_size=1, max_size=6)


@FUZZ
@given(edits=gguf_edits)
def fuzz_gguf(edits):
    path = WORK / f"g{CASES['gguf']}.gguf"  # a new file each case: the readers map them
    path.write_bytes(mutate(GGUF, edits))
    try:
        run_case("gguf", lambda: open_checkpoint(path) and open_gguf(path))  # the magic, then what export reads
    finally:
        path.unlink()
        shutil.rmtree(path.parent / f"side-{path.stem}", ignore_errors=True)


def test_fuzz_gguf():
    open_gguf(WORK / "valid.gguf")
    fuzz_gguf()
    report("gguf")


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(WORK, ignore_errors=True)


def test_gguf_count_beyond_the_file_is_refused_before_the_gguf_package_allocates():
    """Found by fuzz_gguf: a metadata array whose count was overwritten made the gguf package allocate
    ~350-960 MB before failing; export/gguf_checkpoint.check_layout now walks the header first."""
    edits = [("truncate", 923, 0), ("truncate", 14011, 0), ("flip", 571, 229), ("truncate", 2952, 0),
             ("truncate", 1601, 0), ("u64", 665, 16)]
    path = WORK / "count.gguf"
    path.write_bytes(mutate(GGUF, edits))
    tracemalloc.start()
    try:
        with pytest.raises(QwenEdgeError, match="more than the file holds"):
            open_checkpoint(path)
        assert tracemalloc.get_traced_memory()[1] < 10 << 20
    finally:
        tracemalloc.stop()
