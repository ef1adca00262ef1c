"""Read a GGUF file (llama.cpp's format) as a Qwen2 checkpoint, with the `gguf` package and no transformers.

The config comes from the `qwen2.*` metadata, tensors are dequantized to float32 on demand
(gguf.quants.dequantize: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, …) under their
Hugging Face names, and the tokenizer files are rebuilt from the GGUF vocabulary and merges.

Q/K rows: llama.cpp's converter permutes q_proj/k_proj rows for the `llama` architecture only (its
interleaved RoPE); `qwen2` uses the NeoX (rotate_half) layout and is stored unpermuted, so nothing is undone.
"""
import json
import re
from pathlib import Path

import numpy as np

from export.checkpoint import one_line
from export.qwen2 import check_token_ids, show
from toolkit.errors import ModelFolderError

# Qwen2's pre-tokenizer split (the same regex as the Qwen2 tokenizer.json), applied before byte-level BPE.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that become added tokens (special / not special)
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def is_gguf(path: Path) -> bool:
    """A regular file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (and the few global names)."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if not m or m.group(2) not in _LAYER:
        return hf_name
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def check_layout(path: Path) -> None:
    """Walk a GGUF file's header (metadata and tensor infos) and refuse it unless every count and length fits
    in the bytes that remain: a flipped length must not become a gigabyte allocation in the gguf package."""
    import mmap
    import struct

    def fail(what: str):
        raise ModelFolderError(f"{path}: not a readable GGUF file ({what})")

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            end = len(m)
            if end < 24 or m[:4] != b"GGUF":
                fail("no GGUF header")
            order = "<" if 1 <= struct.unpack_from("<I", m, 4)[0] <= 3 else ">"
            if not 2 <= struct.unpack_from(order + "I", m, 4)[0] <= 3:
                fail("unsupported version")
            pos = 8

            def take(fmt: str):
                nonlocal pos
                size = struct.calcsize(fmt)
                if pos + size > end:
                    fail(f"cut short at byte {pos}")
                value = struct.unpack_from(order + fmt, m, pos)
                pos += size
                return value[0] if len(value) == 1 else value

            def need(count: int, each: int, what: str):
                if count * each > end - pos:
                    fail(f"{what} claims {count} items at byte {pos}, more than the file holds")

            def string():
                nonlocal pos
                n = take("Q")
                need(n, 1, "a string")
                pos += n

            def value(kind: int, depth: int = 0):
                nonlocal pos
                if kind in _SCALAR:
                    need(1, _SCALAR[kind], "a value")
                    pos += _SCALAR[kind]
                elif kind == _STRING:
                    string()
                elif kind == _ARRAY and depth == 0:
                    item, n = take("I"), take("Q")
                    if item in _SCALAR:
                        need(n, _SCALAR[item], "an array")
                        pos += n * _SCALAR[item]
                        return
                    need(n, 8 if item == _STRING else 12, "an array")
                    for _ in range(n):
                        value(item, depth + 1)
                else:
                    fail(f"value type {kind} at byte {pos}")

            tensors, kvs = take("Q"), take("Q")
            need(kvs, 13, "the metadata")
            for _ in range(kvs):
                string()
                value(take("I"))
            need(tensors, 24, "the tensor list")
            for _ in range(tensors):
                string()
                dims = take("I")
                if dims > 8:
                    fail(f"a tensor with {dims} dimensions")
                need(dims, 8, "a tensor's shape")
                pos += 8 * dims + 12
                if pos > end:
                    fail("tensor list cut short")
    except OSError as e:
        raise ModelFolderError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # mmap of an empty file
        fail(one_line(e))


class GGUFCheckpoint:
    """The same interface as checkpoint.Checkpoint (config, has, tensor, write_side_files) over one GGUF."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = self.folder = Path(path)
        check_layout(self.path)  # before the gguf package, which allocates for whatever counts the file claims
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError / struct / numpy errors on a malformed file
            raise ModelFolderError(f"{path}: not a readable GGUF file ({one_line(e)})") from None
        self.meta = {k: self._field(k) for k in self.reader.fields if not k.startswith("tokenizer.ggml.")}
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()

    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        try:
            return default if field is None else field.contents()
        except Exception as e:  # bytes that are not UTF-8, a value cut short
            raise ModelFolderError(f"{self.path}: metadata {key} is unreadable ({one_line(e)})") from None

    def _list(self, key: str, kind: type, count: int | None = None) -> list | None:
        """Array metadata `key` whose items are all `kind` (and `count` of them if given), or None if absent."""
        value = self._field(key)
        if value is not None and (not isinstance(value, list) or any(type(v) is not kind for v in value)
                                  or count is not None and len(value) != count):
            raise ModelFolderError(f"{self.path}: metadata {key} {show(value)}: expected an array of "
                                   f"{'string' if kind is str else 'integer'}s"
                                   + (f", one per token ({count})" if count is not None else ""))
        return value

    def _config(self) -> dict:
        arch = self.meta.get("general.architecture")
        if arch != "qwen2":
            raise ModelFolderError(f"{self.path}: general.architecture {arch!r} is not supported; expected 'qwen2'")
        a = lambda key, default=None: self.meta.get(f"qwen2.{key}", default)  # noqa: E731
        missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
                   if a(k) is None]
        if missing:
            raise ModelFolderError(f"{self.path}: metadata qwen2.{missing[0]} is missing")
        scaling = a("rope.scaling.type")
        embed = self.tensors.get("token_embd.weight")
        return {
            "model_type": "qwen2",
            "vocab_size": int(embed.shape[-1]) if embed is not None and len(embed.shape)
            else len(self._list("tokenizer.ggml.tokens", str) or []),
            "hidden_size": a("embedding_length"), "intermediate_size": a("feed_forward_length"),
            "num_hidden_layers": a("block_count"), "num_attention_heads": a("attention.head_count"),
            "num_key_value_heads": a("attention.head_count_kv", a("attention.head_count")),
            "head_dim": a("attention.key_length"),  # absent (as usual): embedding_length / head_count
            "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": a("rope.freq_base", 10000.0),
            "max_position_embeddings": a("context_length", 32768),
            "rope_scaling": None if scaling in (None, "none") else {
                "rope_type": scaling, "factor": a("rope.scaling.factor"),
                "original_max_position_embeddings": a("rope.scaling.original_context_length")},
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }

    def has(self, name: str) -> bool:
        return gguf_name(name) in self.tensors

    def check(self, name: str, shape: tuple) -> None:
        """Raise ModelFolderError unless tensor `name` exists with `shape` (GGUF lists dims innermost first)."""
        t = self.tensors.get(gguf_name(name))
        if t is None:
            raise ModelFolderError(f"{self.path}: tensor {gguf_name(name)} ({name}) is missing "
                                   f"(expected shape {list(shape)})")
        got = tuple(int(d) for d in reversed(t.shape))
        if got != tuple(shape):
            raise ModelFolderError(f"{self.path}: tensor {t.name} has shape {list(got)}, expected {list(shape)}")

    def tensor(self, name: str, shape: tuple, rows=slice(None)):
        """Tensor `name` (Hugging Face naming), or the `rows` of its first axis (a slice or ids), dequantized to float32,
        checked against `shape`. A quantized GGUF tensor's data is [rows, bytes per row], so a block of
        rows dequantizes alone."""
        from gguf.quants import dequantize

        self.check(name, shape)
        t = self.tensors[gguf_name(name)]
        shape = (len(np.arange(shape[0])[rows]), *shape[1:])
        try:
            w = dequantize(t.data[rows], t.tensor_type).astype("float32", copy=False)
        except NotImplementedError:
            raise ModelFolderError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be "
                                   "dequantized here; expected F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 or a K-quant")
        except (ValueError, IndexError) as e:  # its data does not fit its type's blocks
            raise ModelFolderError(f"{self.path}: tensor {t.name} ({t.tensor_type.name}) is unreadable "
                                   f"({one_line(e)})") from None
        if tuple(w.shape) != tuple(shape):
            raise ModelFolderError(f"{self.path}: tensor {t.name} has shape {list(w.shape)}, expected {list(shape)}")
        return w

    def write_side_files(self, dest: Path) -> None:
        """tokenizer.json, tokenizer_config.json and generation_config.json rebuilt from the metadata."""
        tokens = self._list("tokenizer.ggml.tokens", str)
        if not tokens:
            raise ModelFolderError(f"{self.path}: no tokenizer.ggml.tokens in the metadata")
        model, pre = self._field("tokenizer.ggml.model"), self._field("tokenizer.ggml.pre")
        if model != "gpt2" or pre not in ("qwen2", None):
            raise ModelFolderError(f"{self.path}: tokenizer {show(model)} with pre-tokenizer {show(pre)} is not "
                                   "supported; expected 'gpt2' (byte-level BPE) with 'qwen2'")
        types = self._list("tokenizer.ggml.token_type", int, len(tokens)) or [1] * len(tokens)
        merges = [m.split(" ", 1) for m in self._list("tokenizer.ggml.merges", str) or []]
        if any(len(m) != 2 for m in merges):
            raise ModelFolderError(f"{self.path}: metadata tokenizer.ggml.merges has an entry without a space; "
                                   "expected 'left right' pairs")
        template = self._field("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ModelFolderError(f"{self.path}: metadata tokenizer.chat_template {show(template)}: expected a string")
        ids = {k: self._field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
        for k, i in ids.items():
            check_token_ids(i, f"metadata tokenizer.ggml.{k}_token_id", str(self.path), len(tokens))
        (dest / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens, types, merges), ensure_ascii=False),
                                             encoding="utf-8")
        text = lambda i: tokens[i] if i is not None else None  # noqa: E731
        (dest / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": template,
            "bos_token": text(ids["bos"]) if self._field("tokenizer.ggml.add_bos_token") else None,
            "eos_token": text(ids["eos"]), "pad_token": text(ids["padding"]),
        }, indent=2, ensure_ascii=False), encoding="utf-8")
        (dest / "generation_config.json").write_text(json.dumps({
            "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}, indent=2))


def tokenizer_json(tokens: list[str], types: list[int], merges: list[list[str]]) -> dict:
    """A Hugging Face tokenizer.json for Qwen2's byte-level BPE: NFC, the Qwen2 split, byte-level."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == CONTROL} for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
