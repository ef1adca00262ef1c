"""Checkpoint folder in, self-contained model folder out: graphs, one weights file, tokenizer, manifest.

Four passes, each over the result of the one before:
    read       the config and the tensor index (headers only); side files (tokenizer, chat template)
    calibrate  (--method calibrated, --kv-cache int8) the float model over a text, one layer at a time:
               input statistics of every matrix, and the KV cache's channel ranges; with --method
               compensated the model is quantized here instead, matrix by matrix (GPTQ, export/compensate.py),
               its codes spilled to the partial folder for the store pass
    store      each tensor read, quantized and written to model.weights, then released (export/store.py)
    graphs     prefill.onnx and decode.onnx over the stored tensors, by name; then the manifest

The folder is assembled in a temporary sibling directory (.OUT.partial-PID-…), flushed to disk and renamed
into place at the end, so a failed, interrupted (Ctrl-C) or terminated (SIGTERM) export leaves nothing
half-written; one killed outright leaves its partial folder, which the next export to OUT removes once
that process is gone. OUT may only replace an earlier export (or an empty folder), never the source.
"""
import dataclasses
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import onnx

from export import prefill_int8, qwen2
from export.backend import backend
from export.checkpoint import Untied, open_checkpoint
from export.manifest import build_manifest, check_side_files, write_manifest
from export.onnx_builder import Graph
from export.quantize import QuantSpec, check_divides
from export.store import Store, write_store
from toolkit.errors import ArgumentError
from toolkit.manifest import MANIFEST_NAME
from toolkit.textfile import read_text_file

WEIGHTS_FILE = "model.weights"
# graph name -> length of input_ids' sequence axis. Prefill also serves speculative verification and
# evaluation (its num_logits input chooses how many trailing positions get logits).
GRAPHS = {"prefill": "sequence", "decode": 1}


OPS = ("fast", "portable")
KV_CACHES = ("float32", "int8")
PREQUANTIZED_SUPPORTED = True  # GPTQ / AWQ checkpoints are imported as they are (export/prequantized.py)


def export(src: Path, out: Path, spec: QuantSpec, force: bool = False, log=None,
           calibration: Path | None = None, calibration_sequences: int | None = None, ops: str = "fast",
           kv_cache: str = "float32", device: str = "cpu", prefill: str = "nbits",
           prefill_threshold: int | None = None, untie: bool = False) -> Path:
    """Export checkpoint `src` (a Hugging Face folder or a GGUF file) to model folder `out`; return `out`.

    With spec.method == "calibrated", the float model first runs over `calibration` (a UTF-8 text file;
    default: the text shipped in export/data) to weigh each matrix's rounding error by its activations;
    with "compensated" it runs with each matrix quantized by GPTQ as soon as its input is known.
    calibration_sequences: how many 256-token slices of the text (default: 16, and for "compensated"
    128 and enough for twice the largest input dimension in tokens, `compensated_sequences`; a shorter text
    gives what it has).
    ops "fast" uses onnxruntime's contrib ops (MatMulNBits, GroupQueryAttention, …); "portable" standard
    ONNX only (export/portable.py). kv_cache "int8" keeps the KV cache in int8 with per-channel scales
    calibrated on the same text (GroupQueryAttention's quantized cache; fast ops only). device "cuda" or
    "dml" builds float16 graphs for that GPU's onnxruntime kernels (export/backend.py). prefill "int8" (fast
    CPU float32, quantized): prompts of at least prefill_threshold tokens run the layers' matmuls on a stored
    int8 copy of each matrix (export/prefill_int8.py; a second copy of the layers in memory). untie: a
    checkpoint with tied embeddings gets an lm_head of its own, quantized apart from the embedding table
    (export/checkpoint.Untied; one more table on disk, the same bytes read per token)."""
    src, out = Path(src), Path(out)
    if ops not in OPS:
        raise ArgumentError(f"--ops {ops}: expected one of {', '.join(OPS)}")
    try:
        target = backend(ops, device, prefill=prefill, prefill_threshold=prefill_int8.DEFAULT_THRESHOLD
                         if prefill_threshold is None else prefill_threshold)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if prefill_threshold is not None and prefill != "int8":
        raise ArgumentError(f"--prefill-threshold {prefill_threshold}: applies to --prefill int8 only")
    if kv_cache == "int8" and device != "cpu":
        raise ArgumentError(f"--kv-cache int8: a CPU feature here; expected --device cpu (got {device})")
    if kv_cache not in KV_CACHES:
        raise ArgumentError(f"--kv-cache {kv_cache}: expected one of {', '.join(KV_CACHES)}")
    if kv_cache == "int8" and ops == "portable":
        raise ArgumentError("--kv-cache int8: needs --ops fast (onnxruntime's GroupQueryAttention quantizes the cache)")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_output(src, out, force)
    ckpt = open_checkpoint(src)
    cfg = qwen2.Qwen2Config.from_dict(ckpt.config, str(src if src.is_file() else src / "config.json"))
    if untie:
        if not cfg.tie_word_embeddings:
            raise ArgumentError(f"--untie: {src} has an lm_head of its own already; expected a checkpoint with "
                                "tied embeddings (tie_word_embeddings true)")
        ckpt, cfg = Untied(ckpt), dataclasses.replace(cfg, tie_word_embeddings=False)
    if spec.quantized:
        spec = spec.fit(cfg.hidden_size, cfg.intermediate_size)
        check_group_sizes(cfg, spec)
    for name, shape in qwen2.expected_tensors(cfg).items():  # every missing or mis-shaped tensor, up front
        ckpt.check(name, shape)
    imported = ckpt.describe() if hasattr(ckpt, "describe") else None
    if prefill == "int8" and not spec.quantized:
        raise ArgumentError(f"--prefill int8: the int8 copies serve quantized layers; expected --bits 4 or 8 "
                            f"(got {spec.bits})")
    if prefill == "int8" and imported:
        raise ArgumentError(f"--prefill int8: {src} is a {imported['method'].upper()} checkpoint without float "
                            "weights to derive the int8 copies from; expected a float checkpoint")
    if imported and spec.quantized:
        log(f"{src}: {imported['method'].upper()} {imported['bits']}-bit checkpoint: its quantized matrices are "
            "imported as they are; the quantization options apply to the others (embedding, lm_head)")

    started = time.time()
    with partial_folder(out) as tmp:
        ckpt.write_side_files(tmp)  # first: a checkpoint without a tokenizer fails before the long part
        check_side_files(tmp, src, cfg.vocab_size)
        stats = spill = calibrated = None
        if spec.quantized and spec.method == "compensated":
            spill, stats, calibrated = compensate(tmp, ckpt, cfg, spec, calibration, calibration_sequences, log)
        elif spec.method == "calibrated" or kv_cache == "int8":
            stats, calibrated = calibrate(tmp / "tokenizer.json", ckpt, cfg, calibration, calibration_sequences or 16,
                                          log)
        importance = stats if spec.method == "calibrated" else None
        t = time.time()
        plan = qwen2.matrices(cfg)
        extra = qwen2.constants(cfg, target, stats if kv_cache == "int8" else None).items()
        if target.prefill == "int8":  # streamed one matrix at a time, after the rest
            extra = itertools.chain(extra, prefill_int8.tensors(ckpt, plan))
        store = write_store(tmp / WEIGHTS_FILE, ckpt, cfg, spec, target, plan, qwen2.vectors(cfg), extra, importance,
                            report=progress_line, kv_cache=kv_cache, spill=spill)
        if spill is not None:
            shutil.rmtree(spill.folder)
        log(f"{WEIGHTS_FILE}: {sum(store.file.nbytes.values()) / 1e6:.1f} MB in {time.time() - t:.1f} s")
        graphs = write_graphs(tmp, cfg, store, log)
        manifest = build_manifest(tmp, src, ckpt.config, cfg, spec, graphs, store.summary() | {"imported": imported,
                                                                                     "calibration": calibrated,
                                                                                     "untied": untie},
                                  time.time() - started, target, kv_cache)
        write_manifest(tmp, manifest)
        replace_dir(tmp, out)
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
    return stats, calibration_record(text_file, tokens)


SPILL_FOLDER = ".compensated"  # inside the partial folder: the compensated codes until the store pass


def compensated_sequences(cfg, seq_len: int = 256) -> int:
    """Default calibration slices for --method compensated: 128 (as GPTQ's paper), and at least twice the
    largest input dimension (K of down_proj: intermediate_size) in tokens, so each H = Σ xᵀx has full rank;
    a shorter text gives what it has (the shipped one: 82 slices of 256 tokens). On the 0.5B, 82 slices
    rather than 38 (2K) lowered KL by 4-8 % at groups of 128 (README, "The int4 front")."""
    k = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
    return max(128, -(-2 * k // seq_len))


def compensate(tmp: Path, ckpt, cfg, spec: QuantSpec, text_file: Path | None, sequences: int | None, log):
    """GPTQ over the calibration text (export/compensate.py): returns the Spill holding every compensated
    matrix (in tmp/.compensated, deleted after the store pass) and the KV cache's channel ranges."""
    from export.calibrate import default_text, sequential_pass, token_batches
    from export.compensate import Compensator, Spill

    text = default_text() if text_file is None else read_text_file(text_file, "--calibration")
    tokens = token_batches(tmp / "tokenizer.json", text, max_sequences=sequences or compensated_sequences(cfg))
    k = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
    if tokens.size < k:
        log(f"calibration: {tokens.size} tokens, fewer than the largest input dimension ({k}): the Gram matrices "
            "are rank-deficient and only the damping keeps GPTQ stable; a longer --calibration text helps")
    spill = Spill(tmp / SPILL_FOLDER)
    compensator = Compensator(ckpt, cfg, spec, spill)
    t = time.time()

    def progress(done, total):
        print(f"\rcompensating: layer {done}/{total} ({time.time() - t:.0f} s)", end="", file=sys.stderr, flush=True)

    try:
        stats = sequential_pass(ckpt, cfg, tokens, compensator, progress)
    finally:
        print(file=sys.stderr)
    peak = peak_rss_mb()
    log(f"compensated: {compensator.count} matrices over {tokens.shape[0]} sequences of {tokens.shape[1]} tokens "
        f"in {time.time() - t:.1f} s" + ("" if peak is None else f", peak RSS {peak:.0f} MB"))
    return spill, stats, calibration_record(text_file, tokens)


def calibration_record(text_file: Path | None, tokens) -> dict:
    """What the manifest says of the calibration: the text (None: the one shipped with qwen-edge) and how much
    of it ran."""
    return {"text": None if text_file is None else Path(text_file).name, "sequences": int(tokens.shape[0]),
            "sequence_length": int(tokens.shape[1])}


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far in MB (None where the resource module is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


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


def check_output(src: Path, out: Path, force: bool) -> None:
    """Refuse an OUT whose replacement would delete what is not an earlier export: the source checkpoint
    (OUT is it, contains it or lies inside it; a GGUF file's folder only when OUT would contain the file),
    or any existing file or folder other than a qwen-edge model folder or an empty folder, --force or not."""
    if not out.parent.is_dir():
        raise ArgumentError(f"{out}: parent folder {out.parent} does not exist")
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents or (src.is_dir() and s in o.parents):
        where = "is" if o == s else "contains" if o in s.parents else "is inside"
        raise ArgumentError(f"{out}: {where} the source {src}; expected an output folder apart from the checkpoint")
    if not os.path.lexists(out):
        return
    if not is_export(out):
        raise ArgumentError(f"{out}: exists and is not a qwen-edge model folder (no {MANIFEST_NAME} with "
                            f'"format": "qwen-edge"); refusing to replace it, even with --force')
    if not force:
        raise ArgumentError(f"{out}: already exists; pass --force to replace it")


def is_export(folder: Path) -> bool:
    """An earlier export (its manifest says "format": "qwen-edge") or an empty folder: what --force replaces."""
    try:
        if folder.is_dir() and not any(folder.iterdir()):
            return True
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == "qwen-edge"


def sibling(out: Path, kind: str) -> Path:
    """A new hidden folder next to `out`, .OUT.KIND-PID-RANDOM: the pid tells a later export whether its owner
    still runs. os.mkdir applies the umask, so it (and the finished folder) gets the usual mode."""
    while True:
        path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise ArgumentError(f"{out}: cannot create a folder in {out.parent} ({e.strerror})") from None


def remove_stale(out: Path) -> None:
    """Delete the temporary siblings of `out` (see `sibling`) left by exports killed outright (SIGKILL, power
    loss): those whose process is gone."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?:partial|old)-(\d+)-[0-9a-f]{8}")
    for path in out.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and not process_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending one). On Windows assumed alive: os.kill
    there terminates the process whatever the signal."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True


@contextmanager
def partial_folder(out: Path):
    """The temporary sibling the export is built in (see `sibling`), deleted if the block raises anything,
    SIGTERM and SIGINT included (`signals_raise`); stale ones of `out` are removed first."""
    with signals_raise():
        remove_stale(out)
        tmp = sibling(out, "partial")
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def signals_raise():
    """While the block runs, SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt (or whatever handler
    was installed before runs), so the export's cleanup runs before the process ends; the previous handlers
    are restored after. Signals that were ignored stay ignored. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        before = previous[signum]
        if callable(before):  # Python's own SIGINT handler (KeyboardInterrupt), or the application's
            return before(signum, frame)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        before = signal.getsignal(sig)
        if before is not signal.SIG_IGN:
            previous[sig] = before
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, signal.SIG_DFL if before is None else before)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (POSIX; Windows cannot open a folder), to disk."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out` once its files and entries are on disk (else a crash after the rename could leave
    OUT with empty files); an existing `out` (an earlier export, allowed by --force) is moved aside first,
    then deleted. The parent's entries are flushed last."""
    for path in tmp.iterdir():
        fsync(path)
    fsync(tmp)
    if os.path.lexists(out):
        old = sibling(out, "old")
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync(out.parent)
