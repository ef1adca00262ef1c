"""Write qwen-edge.json: everything the runtime needs to know about a model folder, written once."""
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import onnx

from export.checkpoint import one_line, read_json
from export.quantize import QuantSpec
from export.qwen2 import check_token_ids, show
from toolkit.errors import ModelFolderError
from toolkit.manifest import FORMAT_VERSION, MANIFEST_NAME, sha256

# Qwen ends a chat turn with <|im_end|> and plain text with <|endoftext|>; whichever the checkpoint's
# files declare, generation stops at both when the vocabulary has them.
QWEN_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")
_DTYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT8: "int8",
                onnx.TensorProto.FLOAT16: "float16"}


def build_manifest(folder: Path, source: Path, config: dict, cfg, spec: QuantSpec, graphs: dict, stored: dict,
                   export_seconds: float, backend, kv_cache: str = "float32") -> dict:
    """The manifest of model folder `folder`, whose graphs, weights and side files are already written;
    `config` is the checkpoint's config.json (or the GGUF metadata under the same names)."""
    tok_cfg = optional_json(folder / "tokenizer_config.json")
    gen_cfg = optional_json(folder / "generation_config.json")
    vocab = token_ids(folder / "tokenizer.json")
    specials = {k: token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    return {
        "format": "qwen-edge",
        "format_version": FORMAT_VERSION,
        "model": asdict(cfg),
        "quantization": {
            "bits": spec.bits,
            "group_size": spec.group_size if spec.quantized else None,
            "symmetric": spec.symmetric if spec.quantized else None,
            "accuracy_level": spec.accuracy_level if spec.quantized else None,  # of the int4 matrices
            "accuracy_level_int8": spec.int8_accuracy_level if spec.quantized else None,  # QuantSpec.accuracy_for
            "method": spec.method if spec.quantized else "none",
            "lm_head_bits": spec.bits_for("lm_head", cfg.tie_word_embeddings) if spec.quantized else None,
            "lm_head_group_size": spec.group_for("lm_head", cfg.tie_word_embeddings) if spec.quantized else None,
            "quantized_tensors": stored["quantized"],  # name -> bits
            "group_sizes": stored["groups"],  # name -> weights per scale, of the same tensors
            "quantized_bytes_by_bits": bytes_by_bits(stored),
            "float_tensors": stored["float"],
            "embedding": {"nbits": "GatherBlockQuantized", "rows": "Gather + DequantizeLinear", "table": "Gather"}[
                backend.layout(spec.quantized, "embedding")],
            "tied_embeddings": cfg.tie_word_embeddings,
            "untied": stored.get("untied", False),  # export --untie: a tied checkpoint's lm_head stored apart
            "weights_bytes": sum(stored["bytes"].values()),
            # a GPTQ / AWQ checkpoint's quantization, whose codes and scales were imported unchanged; else None
            "imported": stored.get("imported"),
            # calibrated / compensated (or an int8 KV cache): {"text" (None: the shipped one), "sequences",
            # "sequence_length"}; else None
            "calibration": stored.get("calibration"),
        },
        "ops": backend.ops,  # "fast": onnxruntime contrib ops; "portable": standard ONNX only
        "device": backend.device,  # the execution provider the graphs are built for: cpu, cuda or dml
        # "int8": prompts of at least `threshold` tokens run the layers' matmuls on stored int8 copies
        "prefill": {"matmul": backend.prefill, "threshold": backend.prefill_threshold if backend.prefill == "int8"
                    else None} if backend.ops == "fast" else None,
        "activation_dtype": backend.activation,  # float32, or float16 on a GPU (logits are float32 always)
        "weights_file": stored["file"],
        "graphs": {name: describe_graph(f"{name}.onnx", model) for name, model in graphs.items()},
        "kv_cache": {
            "num_layers": cfg.num_hidden_layers,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "dtype": "int8" if kv_cache == "int8" else backend.activation,  # int8: round(x / scale), scales in the graphs
            "scales": "per_channel" if kv_cache == "int8" else None,
            "past_key": "past_key_values.{layer}.key",
            "past_value": "past_key_values.{layer}.value",
            "present_key": "present.{layer}.key",
            "present_value": "present.{layer}.value",
            # in place: one buffer per tensor is bound as past and present, the graph writes the new positions
            # into it (GroupQueryAttention); otherwise present = [past; new], a new tensor each call
            "in_place": backend.in_place_cache,
        },
        "tokenizer": {"file": "tokenizer.json", "special_tokens": specials},
        "chat_template": chat_template(folder, tok_cfg),
        "eos_token_ids": eos_ids(config, gen_cfg, specials, vocab),
        "pad_token_id": pad_id(config, gen_cfg, specials, vocab),
        "generation": {k: gen_cfg[k] for k in SAMPLING_KEYS if gen_cfg.get(k) is not None}
        | {"do_sample": bool(gen_cfg.get("do_sample", False))},
        "context_length": cfg.context_length,
        # by name, not path: a folder that is moved or shared should not carry the exporting machine's paths
        "export": {"source": Path(os.path.abspath(source)).name, "seconds": round(export_seconds, 1)},
        "files": file_hashes(folder),
    }


def bytes_by_bits(stored: dict) -> dict:
    """Bytes on disk (codes, scales, zero points) of the quantized matrices, per bit width: the cost of
    mixed precision in plain numbers."""
    out = {}
    for name, bits in stored["quantized"].items():
        size = sum(n for key, n in stored["bytes"].items() if key.startswith(name + "."))
        out[str(bits)] = out.get(str(bits), 0) + size
    return out


def optional_json(path: Path, shown: str | None = None) -> dict:
    return read_json(path, shown) if path.exists() else {}


# generation_config.json's sampling defaults as the runtime's sampler accepts them (toolkit/sampling.py):
# key -> (type, in range, what is expected)
SAMPLING_RANGES = {"temperature": ((int, float), lambda v: v >= 0, "a number >= 0"),
                   "top_k": (int, lambda v: v >= 0, "an integer >= 0"),
                   "top_p": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
                   "repetition_penalty": ((int, float), lambda v: v > 0, "a number > 0")}


def check_side_files(folder: Path, source: Path, vocab_size: int) -> None:
    """Refuse, before the long passes, the side files copied (or, from a GGUF, written) into `folder` that
    the manifest or the runtime would fail on later: a tokenizer.json the tokenizers library cannot load,
    special tokens or a chat template of the wrong type, sampling defaults the runtime refuses, token ids
    outside the vocabulary. Messages name the checkpoint's file."""
    from tokenizers import Tokenizer

    def shown(name):
        return str(source / name) if source.is_dir() else f"{source} ({name} built from its metadata)"

    try:
        Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception
        raise ModelFolderError(f"{shown('tokenizer.json')}: the tokenizers library cannot load it ({one_line(e)})") \
            from None
    tok_cfg = optional_json(folder / "tokenizer_config.json", shown("tokenizer_config.json"))
    for key in ("bos_token", "eos_token", "pad_token"):
        value = tok_cfg.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, dict) and isinstance(value.get("content"), str)):
            raise ModelFolderError(f"{shown('tokenizer_config.json')}: {key} {show(value)}: expected a string, "
                                   "{\"content\": string} or null")
    template = tok_cfg.get("chat_template")
    if template is not None and not isinstance(template, str) and not (isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("template"), str) for t in template)):
        raise ModelFolderError(f"{shown('tokenizer_config.json')}: chat_template {show(template)}: expected a "
                               "string, a list of {\"name\", \"template\"} objects or null")
    if (folder / "chat_template.jinja").exists():
        try:
            (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ModelFolderError(f"{shown('chat_template.jinja')}: not UTF-8 text ({one_line(e)})") from None
    gen_cfg = optional_json(folder / "generation_config.json", shown("generation_config.json"))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        check_token_ids(gen_cfg.get(key), key, shown("generation_config.json"), vocab_size, key == "eos_token_id")
    for key, (kind, ok, expected) in SAMPLING_RANGES.items():
        value = gen_cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
                                  or not ok(value)):
            raise ModelFolderError(f"{shown('generation_config.json')}: {key} {show(value)}: expected {expected}")
    if gen_cfg.get("do_sample") not in (None, True, False):
        raise ModelFolderError(f"{shown('generation_config.json')}: do_sample {show(gen_cfg['do_sample'])}: expected "
                               "true or false")


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def describe_graph(file: str, model: onnx.ModelProto) -> dict:
    def io(values):
        return [{"name": v.name, "dtype": _DTYPE_NAMES[v.type.tensor_type.elem_type],
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]
    return {"file": file, "inputs": io(model.graph.input), "outputs": io(model.graph.output)}


def token_text(value) -> str | None:
    """tokenizer_config writes special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def token_ids(tokenizer_json: Path) -> dict:
    """Special-token text -> id, from tokenizer.json's added_tokens (checked by `check_side_files`)."""
    return {t["content"]: t["id"] for t in read_json(tokenizer_json).get("added_tokens", [])}


def eos_ids(config: dict, gen_cfg: dict, specials: dict, vocab: dict) -> list[int]:
    ids = []
    for source in (gen_cfg.get("eos_token_id"), config.get("eos_token_id")):
        ids += source if isinstance(source, list) else [source] if source is not None else []
    ids += [vocab[t] for t in (specials["eos_token"], *QWEN_END_TOKENS) if t in vocab]
    return sorted(set(ids))


def pad_id(config: dict, gen_cfg: dict, specials: dict, vocab: dict) -> int | None:
    for value in (gen_cfg.get("pad_token_id"), config.get("pad_token_id"), vocab.get(specials["pad_token"]),
                  vocab.get("<|endoftext|>")):
        if isinstance(value, int):
            return value
    return None


def chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """The default chat template: chat_template.jinja if present, else tokenizer_config's."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def file_hashes(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST_NAME or not path.is_file():
            continue
        out[path.name] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    return out
