"""Checkpoint folder in, self-contained model folder out: graphs, one weights file, tokenizer, manifest.

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
from export.checkpoint import open_checkpoint
from export.layers import Weights
from export.manifest import build_manifest, write_manifest
from export.onnx_builder import Graph, WeightFile
from export.quantize import QuantSpec, check_divides
from toolkit.errors import ArgumentError

WEIGHTS_FILE = "model.weights"
# graph name -> (length of input_ids' sequence axis, logits for every position?). "score" serves evaluation
# (perplexity, KL); generation never loads it.
GRAPHS = {"prefill": ("sequence", False), "decode": (1, False), "score": ("sequence", True)}


def export(src: Path, out: Path, spec: QuantSpec, force: bool = False, log=None) -> Path:
    """Export checkpoint folder `src` to model folder `out` and return `out`."""
    src, out = Path(src), Path(out)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if out.exists() and not force:
        raise ArgumentError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ArgumentError(f"{out}: parent folder {out.parent} does not exist")
    ckpt = open_checkpoint(src)
    cfg = qwen2.Qwen2Config.from_dict(ckpt.config, str(src if src.is_file() else src / "config.json"))
    if spec.quantized:
        check_group_sizes(cfg, spec.group_size)

    started = time.time()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets the usual mode
    try:
        ckpt.write_side_files(tmp)  # first: a checkpoint without a tokenizer fails before the long part
        graphs, stored = write_graphs(tmp, ckpt, cfg, spec, log)
        manifest = build_manifest(tmp, src, ckpt.config, cfg, spec, graphs, stored, time.time() - started)
        write_manifest(tmp, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {time.time() - started:.1f} s")
    return out


def check_group_sizes(cfg: qwen2.Qwen2Config, group_size: int) -> None:
    """Every quantized matrix's input dimension K must be a multiple of the group size."""
    for name, k, role in (("hidden_size", cfg.hidden_size, "q/k/v/gate/up_proj and lm_head"),
                          ("num_attention_heads*head_dim", cfg.num_attention_heads * cfg.head_dim, "o_proj"),
                          ("intermediate_size", cfg.intermediate_size, "down_proj")):
        check_divides(k, group_size, name, f" (the input dimension of {role})")


def write_graphs(folder: Path, ckpt, cfg, spec: QuantSpec, log) -> dict:
    """Build prefill.onnx, decode.onnx and score.onnx over one shared weights file.

    Returns ({graph name: ModelProto}, {"file", "quantized", "float", "bytes"} of the weights file)."""
    weights = WeightFile(folder / WEIGHTS_FILE)
    w = Weights(ckpt, spec, tied=cfg.tie_word_embeddings)
    graphs = {}
    try:
        for name, (seq, all_logits) in GRAPHS.items():
            t = time.time()
            g = Graph(name, weights)
            qwen2.build(g, cfg, w, seq, all_logits)
            model = g.to_model()
            onnx.save(model, folder / f"{name}.onnx")
            graphs[name] = model
            log(f"{name}.onnx: {len(g.nodes)} nodes ({time.time() - t:.1f} s)")
    finally:
        weights.close()
    stored = {"file": WEIGHTS_FILE, "quantized": w.quantized, "float": w.float, "bytes": dict(weights.nbytes)}
    return graphs, stored


def replace_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` (allowed by --force) is moved aside first, then deleted."""
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
