"""Read a Hugging Face checkpoint folder: config.json, safetensors weights, tokenizer and generation files.

Safetensors is read directly (8-byte header length, JSON header, raw little-endian data), so bf16 needs no
torch and a tensor is only materialised when asked for. The header is first validated by the `safetensors`
package (as its Rust crate does: a header under 100 MB, a JSON object of tensors whose offsets tile the
data exactly, sizes matching shape × dtype), so no offset read here points outside its tensor's bytes.
"""
import json
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from toolkit.errors import ModelFolderError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (the CLI prints errors as one line)."""
    return " ".join(str(e).split())


def read_json(path: Path, shown: str | None = None) -> dict:
    """Parse a JSON file holding an object, or raise ModelFolderError naming it (as `shown` if given: a
    copy's original)."""
    shown = shown or path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{shown}: file not found") from None
    except OSError as e:
        raise ModelFolderError(f"{shown}: not readable ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise ModelFolderError(f"{shown}: not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{shown}: expected a JSON object, got {type(data).__name__}")
    return data


def _unique_keys(pairs: list) -> dict:
    """json object_pairs_hook: refuse a key given twice (JSON parsers disagree on which one wins)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


class SafetensorsFile:
    """Lazy access to the tensors of one .safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(path, framework="numpy") as f:  # validates the header; lists bf16 too (never loads)
                listed = {name: (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) for name in f.keys()}
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
        except SafetensorError as e:
            raise ModelFolderError(f"{path}: not a valid safetensors file ({one_line(e)})") from None
        except OSError as e:
            raise ModelFolderError(f"{path}: not readable ({e.strerror or one_line(e)})") from None
        except ValueError as e:  # a key given twice
            raise ModelFolderError(f"{path}: not a valid safetensors header ({one_line(e)})") from None
        header.pop("__metadata__", None)
        seen = {name: (t.get("dtype"), t.get("shape")) if isinstance(t, dict) else t for name, t in header.items()}
        if seen != listed:  # two JSON parsers, one reading
            raise ModelFolderError(f"{path}: the header reads differently to the safetensors package; expected "
                                   "a plain JSON header")
        self.header = header
        self.data_start = 8 + n
        self._map = None

    def keys(self):
        return self.header.keys()

    def dtype(self, name: str) -> np.dtype:
        """The numpy type tensor `name` is stored as (BF16 as uint16 bit patterns)."""
        dtype = _DTYPES.get(self.header[name]["dtype"])
        if dtype is None:
            raise ModelFolderError(f"{self.path}: tensor {name} has unsupported dtype {self.header[name]['dtype']}")
        return np.dtype(dtype)

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name` as stored, a read-only view of the memory map (BF16 as uint16 bit patterns)."""
        info = self.header[name]
        dtype = self.dtype(name)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        return self._map[self.data_start + start:self.data_start + end].view(dtype).reshape(info["shape"])

    def get(self, name: str, rows=slice(None)) -> np.ndarray:
        """Tensor `name` (or the `rows` of its first axis: a slice or ids) as float32, bf16/f16 widened."""
        shape = self.header[name]["shape"]
        if shape and isinstance(rows, slice) and rows.step in (None, 1):
            # Read, not mapped: the pages go to the page cache, not into this process's resident memory
            # (a mapped 14 GB checkpoint would count fully against the export's RSS by its end).
            start, stop, _ = rows.indices(shape[0])
            per_row = int(np.prod(shape[1:]))
            dtype = self.dtype(name)
            with open(self.path, "rb") as f:
                raw = np.fromfile(f, dtype, count=(stop - start) * per_row,
                                  offset=self.data_start + self.header[name]["data_offsets"][0]
                                  + start * per_row * dtype.itemsize)
            if raw.size != (stop - start) * per_row:  # the header was checked against the file: it shrank since
                raise ModelFolderError(f"{self.path}: tensor {name} is cut short (the file changed while reading)")
            raw = raw.reshape(stop - start, *shape[1:])
        else:
            raw = self.raw(name)[rows]
        if self.header[name]["dtype"] == "BF16":  # bf16 is the top half of a float32
            wide = raw.astype(np.uint32)
            wide <<= 16  # in place: one float32-sized array, not two
            return wide.view(np.float32)
        return raw.astype(np.float32, copy=False)


class Checkpoint:
    """A Hugging Face model folder: its config dict, a name → tensor lookup, and its side files."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: expected a Hugging Face model folder (a directory)")
        self.folder = folder
        self.config = read_json(folder / "config.json")
        self._where = self._index_weights()

    def _index_weights(self) -> dict:
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ModelFolderError(f"{index}: expected a 'weight_map' object of tensor name -> file name")
            files = {f: SafetensorsFile(self._shard(f, index)) for f in sorted(set(weight_map.values()))}
            for name, f in weight_map.items():
                if name not in files[f].header:
                    raise ModelFolderError(f"{index}: tensor {name} is listed in {f}, which does not have it")
            return {name: files[f] for name, f in weight_map.items()}
        if single.exists():
            st = SafetensorsFile(single)
            return {name: st for name in st.keys()}
        raise ModelFolderError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")

    def _shard(self, name: str, index: Path) -> Path:
        """The path of a shard that weight_map names: a plain file name in the folder (no directory, no `..`,
        not absolute: the index may not reach outside the checkpoint) that exists."""
        if name in ("", "..") or "\0" in name or Path(name).name != name:
            raise ModelFolderError(f"{index}: weight_map names the file {name!r}; expected a file name in the "
                                   "checkpoint folder")
        if not (self.folder / name).is_file():
            raise ModelFolderError(f"{self.folder / name}: listed in {index.name} but missing")
        return self.folder / name

    def has(self, name: str) -> bool:
        return name in self._where

    def check(self, name: str, shape: tuple) -> None:
        """Raise ModelFolderError unless tensor `name` exists with `shape` (reads only the header)."""
        if name not in self._where:
            raise ModelFolderError(f"{self.folder}: tensor {name} is missing (expected shape {list(shape)})")
        got = tuple(self._where[name].header[name]["shape"])
        if got != tuple(shape):
            raise ModelFolderError(f"{self.folder}: tensor {name} has shape {list(got)}, expected {list(shape)}")

    def tensor(self, name: str, shape: tuple, rows=slice(None)) -> np.ndarray:
        """Tensor `name` (or the `rows` of its first axis: a slice or ids) as float32, checked against the
        shape the config implies."""
        self.check(name, shape)
        return self._where[name].get(name, rows)

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name` as stored (int32, float16, bf16 bit patterns as uint16, …), memory-mapped: for
        checkpoints that are already quantized (GPTQ / AWQ)."""
        if name not in self._where:
            raise ModelFolderError(f"{self.folder}: tensor {name} is missing")
        return self._where[name].raw(name)

    def write_side_files(self, dest: Path) -> None:
        """Copy the tokenizer, chat template and generation files into the model folder `dest`."""
        if not (self.folder / "tokenizer.json").exists():
            raise ModelFolderError(f"{self.folder}: tokenizer.json is missing (the runtime tokenizes with it)")
        for name in TOKENIZER_FILES:
            if (self.folder / name).exists():
                shutil.copyfile(self.folder / name, dest / name)


class Untied:
    """A checkpoint with tied embeddings read as an untied one (`export --untie`): `lm_head.weight` is the
    embedding table, so the lm_head is quantized as a matrix of its own (GPTQ with --method compensated: its
    error pushed across columns would otherwise land on the embedding lookups too) and the embedding apart."""

    LM_HEAD, TABLE = "lm_head.weight", "model.embed_tokens.weight"

    def __init__(self, ckpt):
        self.inner = ckpt

    def _name(self, name: str) -> str:
        return self.TABLE if name == self.LM_HEAD else name

    def has(self, name: str) -> bool:
        return self.inner.has(self._name(name))

    def check(self, name: str, shape: tuple) -> None:
        self.inner.check(self._name(name), shape)

    def tensor(self, name: str, shape: tuple, rows=slice(None)) -> np.ndarray:
        return self.inner.tensor(self._name(name), shape, rows)

    def raw(self, name: str) -> np.ndarray:
        return self.inner.raw(self._name(name))

    def __getattr__(self, attr):  # config, folder, write_side_files, describe, imported, ...
        return getattr(self.inner, attr)


def open_checkpoint(src: Path):
    """A Hugging Face folder (GPTQ / AWQ ones wrapped, export/prequantized.py), or a .gguf file (read with
    the gguf package)."""
    from export.gguf_checkpoint import GGUFCheckpoint, is_gguf

    src = Path(src)
    if src.is_file() and is_gguf(src):
        return GGUFCheckpoint(src)
    if src.is_file():
        raise ModelFolderError(f"{src}: expected a Hugging Face model folder or a GGUF file")
    if not src.exists():
        raise ModelFolderError(f"{src}: not found; expected a Hugging Face model folder or a GGUF file")
    from export.prequantized import PrequantizedCheckpoint, PrequantizedFormat

    ckpt = Checkpoint(src)
    fmt = PrequantizedFormat.from_folder(src, ckpt.config)  # GPTQ / AWQ: their codes are imported as they are
    return ckpt if fmt is None else PrequantizedCheckpoint(ckpt, fmt)
