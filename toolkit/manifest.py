"""Read and check qwen-edge.json, the one file the runtime consults to know what a model folder holds.

The manifest is checked on load against SCHEMA (types, ranges, name patterns) and a few cross-checks, so that
a damaged or hand-edited manifest is one ModelFolderError naming the field, never a KeyError deep inside the
runtime or an allocation sized by a wild number. Unknown keys are ignored (a newer export may add some).
"""
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ModelFolderError

MANIFEST_NAME = "qwen-edge.json"
FORMAT_VERSION = 2  # 2: prefill takes num_logits; no score graph
MAX_BYTES = 16 << 20  # a 7B's manifest is ~100 KB
CACHE_NAME = re.compile(r"[A-Za-z0-9_.]*\{layer\}[A-Za-z0-9_.]*")  # kv_cache tensor name templates


def integer(lo: int, hi: int, even: bool = False):
    return (lambda v: type(v) is int and lo <= v <= hi and not (even and v % 2),
            f"{'an even' if even else 'an'} integer from {lo} to {hi}")


def number(lo: float, hi: float, low_open: bool = False):
    return (lambda v: type(v) in (int, float) and math.isfinite(v) and (lo < v if low_open else lo <= v) and v <= hi,
            f"a number in {'(' if low_open else '['}{lo:g}, {hi:g}]")


def one_of(*choices):
    return lambda v: type(v) in (str, int) and v in choices, "one of " + ", ".join(map(str, choices))


def text(limit: int = 255, pattern: re.Pattern | None = None, what: str = "a string"):
    return (lambda v: type(v) is str and 0 < len(v) <= limit and "\0" not in v
            and (pattern is None or pattern.fullmatch(v) is not None), what)


def optional(check):
    test, what = check
    return lambda v: v is None or test(v), f"{what} or null"


DICT = (lambda v: type(v) is dict, "an object")
LIST = (lambda v: type(v) is list and len(v) <= 1 << 16, "a list")
BOOL = (lambda v: type(v) is bool, "true or false")
FILE = text(255, what="a file name")
TOKEN_ID = integer(0, (1 << 24) - 1)
ACCURACY = optional(integer(0, 4))

# (path, required, check): "a.b" is data["a"]["b"]; "*" is every value of an object or item of a list. A row is
# checked only where its parent exists (parents come first); `required` means the parent must have the key (every
# format-2 export writes the required ones; the optional ones came later or are read with defaults).
SCHEMA = (
    ("model", True, DICT),
    ("model.vocab_size", True, integer(1, 1 << 24)),
    ("model.hidden_size", True, integer(1, 1 << 16)),
    ("model.intermediate_size", True, integer(1, 1 << 18)),
    ("model.num_hidden_layers", True, integer(1, 1024)),
    ("model.num_attention_heads", True, integer(1, 1024)),
    ("model.num_key_value_heads", True, integer(1, 1024)),
    ("model.head_dim", True, integer(1, 1024, even=True)),
    ("model.max_position_embeddings", True, integer(2, 1 << 24)),
    ("model.rms_norm_eps", True, number(0, 1)),
    ("model.rope_theta", True, number(0, 1e12, low_open=True)),
    ("model.tie_word_embeddings", True, BOOL),
    ("model.model_type", True, text()),
    ("model.rope_scaling", False, optional(DICT)),
    ("quantization", True, DICT),
    ("quantization.bits", True, one_of(4, 8, 32)),
    ("quantization.group_size", True, optional(integer(1, 1 << 16))),
    ("quantization.symmetric", True, optional(BOOL)),
    ("quantization.accuracy_level", True, ACCURACY),
    ("quantization.accuracy_level_int8", False, ACCURACY),
    ("quantization.method", True, text()),
    ("quantization.lm_head_bits", False, optional(one_of(4, 8))),
    ("quantization.lm_head_group_size", False, optional(integer(1, 1 << 16))),
    ("quantization.quantized_tensors", True, DICT),
    ("quantization.quantized_tensors.*", False, one_of(4, 8)),
    ("quantization.float_tensors", True, LIST),
    ("quantization.float_tensors.*", False, text()),
    ("quantization.embedding", True, text()),
    ("quantization.weights_bytes", True, integer(0, 1 << 50)),
    ("ops", False, one_of("fast", "portable")),
    ("device", False, one_of("cpu", "cuda", "dml")),
    ("activation_dtype", False, one_of("float32", "float16")),
    ("weights_file", True, FILE),
    ("graphs", True, DICT),
    ("graphs.prefill", True, DICT),
    ("graphs.*", True, DICT),
    ("graphs.*.file", True, FILE),
    ("graphs.*.inputs", True, LIST),
    ("graphs.*.outputs", True, LIST),
    ("graphs.*.inputs.*", False, DICT),
    ("graphs.*.outputs.*", False, DICT),
    ("graphs.*.inputs.*.name", True, text()),
    ("graphs.*.outputs.*.name", True, text()),
    ("graphs.*.inputs.*.shape", True, LIST),
    ("graphs.*.outputs.*.shape", True, LIST),
    ("kv_cache", True, DICT),
    ("kv_cache.num_layers", True, integer(1, 1024)),
    ("kv_cache.num_key_value_heads", True, integer(1, 1024)),
    ("kv_cache.head_dim", True, integer(1, 1024, even=True)),
    ("kv_cache.dtype", True, one_of("float32", "float16", "int8")),
    ("kv_cache.scales", False, optional(one_of("per_channel"))),
    ("kv_cache.in_place", False, BOOL),
    *((f"kv_cache.{name}", True, text(200, CACHE_NAME, "a tensor name with {layer} (letters, digits, _ and .)"))
      for name in ("past_key", "past_value", "present_key", "present_value")),
    ("tokenizer", True, DICT),
    ("tokenizer.file", True, FILE),
    ("tokenizer.special_tokens", False, DICT),
    ("tokenizer.special_tokens.*", False, optional(text(256))),
    ("chat_template", False, optional(text(1 << 20, what="a template of at most 1 MiB"))),
    ("eos_token_ids", True, LIST),
    ("eos_token_ids.*", False, TOKEN_ID),
    ("pad_token_id", False, optional(TOKEN_ID)),
    ("generation", False, DICT),
    ("generation.temperature", False, number(0, 1e6)),
    ("generation.top_k", False, integer(0, 1 << 24)),
    ("generation.top_p", False, number(0, 1, low_open=True)),
    ("generation.repetition_penalty", False, number(0, 1e6, low_open=True)),
    ("generation.do_sample", False, BOOL),
    ("context_length", False, optional(integer(2, 1 << 24))),
    ("files", True, DICT),
    ("files.*", True, DICT),
    ("files.*.bytes", True, integer(0, 1 << 50)),
    ("files.*.sha256", True, text(64, re.compile(r"[0-9a-f]{64}"), "64 lowercase hex digits")),
)


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest and the folder it describes."""

    folder: Path
    data: dict

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    def path(self, name: str) -> Path:
        """Resolve a file the manifest names, refusing anything outside the model folder."""
        path = self._inside(name)
        if not path.is_file():
            raise ModelFolderError(f"{path}: listed in {MANIFEST_NAME} but missing")
        return path

    def _inside(self, name: str) -> Path:
        if not isinstance(name, str) or not name or "\0" in name:
            raise ModelFolderError(f"{self.folder / MANIFEST_NAME}: expected a file name, got {name!r:.80}")
        root = self.folder.resolve()
        path = (root / name).resolve()
        if path.parent != root:
            raise ModelFolderError(f"{self.folder / MANIFEST_NAME}: file name {name!r:.80} leaves the model folder")
        return path

    def check_files(self, hashes: bool = False) -> None:
        """Every listed file exists with its recorded size (and sha256 when `hashes`), and every graph and
        tokenizer file named stays inside the folder."""
        for graph in self["graphs"].values():
            self.path(graph["file"])
        for name, info in self["files"].items():
            path = self.path(name)
            if path.stat().st_size != info["bytes"]:
                raise ModelFolderError(f"{path}: {path.stat().st_size} bytes, {MANIFEST_NAME} says {info['bytes']}")
            if hashes and sha256(path) != info["sha256"]:
                raise ModelFolderError(f"{path}: sha256 differs from {MANIFEST_NAME}; the folder is damaged")


def read_manifest(folder) -> Manifest:
    """Parse and validate `folder`/qwen-edge.json."""
    folder = Path(folder)
    file = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: expected a model folder made by `qwen-edge export`")
    try:
        if file.stat().st_size > MAX_BYTES:
            raise ModelFolderError(f"{file}: {file.stat().st_size} bytes; expected a manifest under {MAX_BYTES} bytes")
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{file}: not found; expected a model folder made by `qwen-edge export`") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number, deep nesting
        raise ModelFolderError(f"{file}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{file}: expected a JSON object")
    if "format_version" not in data:
        raise ModelFolderError(f"{file}: missing format_version")
    if data["format_version"] != FORMAT_VERSION or type(data["format_version"]) is not int:
        raise ModelFolderError(f"{file}: format_version {data['format_version']!r:.40} is not supported; "
                               f"expected {FORMAT_VERSION} (re-export the model)")
    manifest = Manifest(folder, data)
    validate(manifest)
    return manifest


def validate(manifest: Manifest) -> None:
    """Check the manifest against SCHEMA, then what ties its fields together; raise ModelFolderError."""
    data, where = manifest.data, manifest.folder / MANIFEST_NAME
    for path, required, (test, expected) in SCHEMA:
        for name, value in _lookup(data, path.split("."), required):
            if value is _MISSING:
                raise ModelFolderError(f"{where}: missing {name}")
            if not test(value):
                raise ModelFolderError(f"{where}: {name} is {_short(value)}; expected {expected}")
    model, kv = data["model"], data["kv_cache"]
    for key, model_key in (("num_layers", "num_hidden_layers"), ("num_key_value_heads", "num_key_value_heads"),
                           ("head_dim", "head_dim")):
        if kv[key] != model[model_key]:
            raise ModelFolderError(f"{where}: kv_cache.{key} {kv[key]} differs from model.{model_key} "
                                   f"{model[model_key]}")
    if model["num_attention_heads"] % model["num_key_value_heads"]:
        raise ModelFolderError(f"{where}: model.num_attention_heads {model['num_attention_heads']} is not a multiple "
                               f"of model.num_key_value_heads {model['num_key_value_heads']}")
    vocab = model["vocab_size"]
    for name, ids in (("eos_token_ids", data["eos_token_ids"]), ("pad_token_id", [data.get("pad_token_id")])):
        bad = [i for i in ids if i is not None and i >= vocab]
        if bad:
            raise ModelFolderError(f"{where}: {name} has {bad[0]}; expected token ids below model.vocab_size {vocab}")
    for name in data["files"]:
        manifest._inside(name)
    named = [("weights_file", data["weights_file"]), ("tokenizer.file", data["tokenizer"]["file"])]
    for key, name in named + [(f"graphs.{g}.file", v["file"]) for g, v in data["graphs"].items()]:
        manifest._inside(name)
        if name not in data["files"]:
            raise ModelFolderError(f"{where}: {key} {name!r:.80} is not listed in files")


_MISSING = object()


def _lookup(node, keys: list[str], required: bool, name: str = ""):
    """(dotted name, value) of every match of a SCHEMA path in `node`; _MISSING for a required key absent from
    an object that exists."""
    if not keys:
        yield name, node
        return
    key, rest = keys[0], keys[1:]
    join = lambda k: f"{name}.{k}" if name else str(k)
    if key == "*":
        items = node.items() if type(node) is dict else enumerate(node) if type(node) is list else ()
        for k, v in items:
            yield from _lookup(v, rest, required, join(k))
    elif type(node) is dict:
        if key in node:
            yield from _lookup(node[key], rest, required, join(key))
        elif required:
            yield join(key), _MISSING


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def layer_name(template: str, layer) -> str:
    """A KV cache tensor name from its template (kv_cache.past_key, ...): `{layer}` replaced, never str.format."""
    if not isinstance(template, str) or CACHE_NAME.fullmatch(template) is None:
        raise ModelFolderError(f"kv_cache name {template!r:.80}: expected letters, digits, _ and . around one "
                               "{layer}")
    return template.replace("{layer}", str(layer))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
