"""Checkpoint folder in, self-contained model folder out: graphs, one weights file, tokenizer, manifest.

Four passes, each over the result of the one before:
    read       the config and the tensor index (headers only); side files (tokenizer, chat template)
    calibrate  (--method calibrated, --kv-cache int8) the float model over a text, one layer at a time:
               input statistics of every matrix, and the KV cache's channel ranges
    store      each tensor read, quantized and written to model.weights, then released (export/store.py)
    graphs     prefill.onnx and decode.onnx over the stored tensors, by name; then the manifest

The folder is assembled in a temporary sibling directory and renamed into place at the end, so an
interrupted or failed export leaves nothing half-written.
"""
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnx

from export import qwen2
from export.backend import backend
from export.checkpoint import open_checkpoint
from export.manifest import build_manifest, write_manifest
from export.onnx_builder import Graph
from export.quantize import QuantSpec, check_divides
from export.store import Store, write_store
from toolkit.errors import ArgumentError
from toolkit.textfile import read_text_file

WEIGHTS_FILE = "model.weights"
# graph name -> length of input_ids' sequence axis. Prefill also serves speculative verification and
# evaluation (its num_logits input chooses how many trailing positions get logits).
GRAPHS = {"prefill": "sequence", "decode": 1}


OPS = ("fast", "portable")
KV_CACHES = ("float32", "int8")
PREQUANTIZED_SUPPORTED = True  # GPTQ / AWQ checkpoints are imported as they are (export/prequantized.py)


def export(src: Path, out: Path, spec: QuantSpec, force: bool = False, log=None,
           calibration: Path | None = None, calibration_sequences: int = 16, ops: str = "fast",
           kv_cache: str = "float32", device: str = "cpu") -> Path:
    """Export checkpoint `src` (a Hugging Face folder or a GGUF file) to model folder `out`; return `out`.

    With spec.method == "calibrated", the float model first runs over `calibration` (a UTF-8 text file;
    default: the text shipped in export/data) to weigh each matrix's rounding error by its activations.
    ops "fast" uses onnxruntime's contrib ops (MatMulNBits, GroupQueryAttention, …); "portable" standard
    ONNX only (export/portable.py). kv_cache "int8" keeps the KV cache in int8 with per-channel scales
    calibrated on the same text (GroupQueryAttention's quantized cache; fast ops only). device "cuda" or
    "dml" builds float16 graphs for that GPU's onnxruntime kernels (export/backend.py)."""
    src, out = Path(src), Path(out)
    if ops not in OPS:
        raise ArgumentError(f"--ops {ops}: expected one of {', '.join(OPS)}")
    try:
        target = backend(ops, device)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if kv_cache == "int8" and device != "cpu":
        raise ArgumentError(f"--kv-cache int8: a CPU feature here; expected --device cpu (got {device})")
    if kv_cache not in KV_CACHES:
        raise ArgumentError(f"--kv-cache {kv_cache}: expected one of {', '.join(KV_CACHES)}")
    if kv_cache == "int8" and ops == "portable":
        raise ArgumentError("--kv-cache int8: needs --ops fast (onnxruntime's GroupQueryAttention quantizes the cache)")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if out.exists() and not force:
        raise ArgumentError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ArgumentError(f"{out}: parent folder {out.parent} does not exist")
    ckpt = open_checkpoint(src)
    cfg = qwen2.Qwen2Config.from_dict(ckpt.config, str(src if src.is_file() else src / "config.json"))
    if spec.quantized:
        spec = spec.fit(cfg.hidden_size)
        check_group_sizes(cfg, spec)
    for name, shape in qwen2.expected_tensors(cfg).items():  # every missing or mis-shaped tensor, up front
        ckpt.check(name, shape)
    imported = ckpt.describe() if hasattr(ckpt, "describe") else None
    if imported and spec.quantized:
        log(f"{src}: {imported['method'].upper()} {imported['bits']}-bit checkpoint: its quantized matrices are "
            "imported as they are; the quantization options apply to the others (embedding, lm_head)")

    started = time.time()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets the usual mode
    try:
        ckpt.write_side_files(tmp)  # first: a checkpoint without a tokenizer fails before the long part
        stats = None
        if spec.method == "calibrated" or kv_cache == "int8":
            stats = calibrate(tmp / "tokenizer.json", ckpt, cfg, calibration, calibration_sequences, log)
        importance = stats if spec.method == "calibrated" else None
        t = time.time()
        store = write_store(tmp / WEIGHTS_FILE, ckpt, cfg, spec, target, qwen2.matrices(cfg), qwen2.vectors(cfg),
                            qwen2.constants(cfg, target, stats if kv_cache == "int8" else None), importance,
                            report=progress_line, kv_cache=kv_cache)
        log(f"{WEIGHTS_FILE}: {sum(store.file.nbytes.values()) / 1e6:.1f} MB in {time.time() - t:.1f} s")
        graphs = write_graphs(tmp, cfg, store, log)
        manifest = build_manifest(tmp, src, ckpt.config, cfg, spec, graphs, store.summary() | {"imported": imported},
                                  time.time() - started, target, kv_cache)
        write_manifest(tmp, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {time.time() - started:.1f} s")
    return out


def check_group_sizes(cfg: qwen2.Qwen2Config, spec: QuantSpec) -> None:
    """Every quantized matrix's input dimension K must be a multiple of its group size."""
    tied = cfg.tie_word_embeddings
    lm_head = "--lm-head-group-size" if spec.lm_head_group_size else "--group-size"
    embed = "--embed-group-size" if spec.embed_group_size and not tied else lm_head if tied else "--group-size"
    for name, k, role, group, option in (
            ("hidden_size", cfg.hidden_size, "q/k/v/gate/up_proj", spec.group_size, "--group-size"),
            ("hidden_size", cfg.hidden_size, "lm_head", spec.group_for("lm_head", tied), lm_head),
            ("hidden_size", cfg.hidden_size, "embedding", spec.group_for("model.embed_tokens", tied), embed),
            ("num_attention_heads*head_dim", cfg.num_attention_heads * cfg.head_dim, "o_proj", spec.group_size,
             "--group-size"),
            ("intermediate_size", cfg.intermediate_size, "down_proj", spec.group_size, "--group-size")):
        check_divides(k, group, name, f" (the input dimension of {role})", option)


def calibrate(tokenizer_json: Path, ckpt, cfg, text_file: Path | None, sequences: int, log) -> dict:
    """Per-matrix input statistics from the float model over the calibration text."""
    from export.calibrate import activation_stats, default_text, token_batches

    text = default_text() if text_file is None else read_text_file(text_file, "--calibration")
    tokens = token_batches(tokenizer_json, text, max_sequences=sequences)
    t = time.time()

    def progress(done, total):
        print(f"\rcalibrating: layer {done}/{total} ({time.time() - t:.0f} s)", end="", file=sys.stderr, flush=True)

    try:
        stats = activation_stats(ckpt, cfg, tokens, progress)
    finally:
        print(file=sys.stderr)  # end the progress line, also when calibration fails
    log(f"calibration: {tokens.shape[0]} sequences of {tokens.shape[1]} tokens in {time.time() - t:.1f} s")
    return stats


def progress_line(line: str, final: bool) -> None:
    """The store pass's progress, one line on stderr updated in place."""
    print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)


def write_graphs(folder: Path, cfg, store: Store, log) -> dict:
    """Build prefill.onnx and decode.onnx over the stored weights; returns {graph name: ModelProto}."""
    graphs = {}
    for name, seq in GRAPHS.items():
        t = time.time()
        g = Graph(name, store.file)
        qwen2.build(g, cfg, store, seq)
        model = g.to_model()
        onnx.save(model, folder / f"{name}.onnx")
        graphs[name] = model
        log(f"{name}.onnx: {len(g.nodes)} nodes ({time.time() - t:.1f} s)")
    return graphs


def replace_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` (allowed by --force) is moved aside first, then deleted."""
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
