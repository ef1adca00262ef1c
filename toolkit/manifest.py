"""Read and check qwen-edge.json, the one file the runtime consults to know what a model folder holds."""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ModelFolderError

MANIFEST_NAME = "qwen-edge.json"
FORMAT_VERSION = 2  # 2: prefill takes num_logits; no score graph
REQUIRED = ("format_version", "model", "quantization", "graphs", "kv_cache", "tokenizer", "eos_token_ids", "files")


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
        if not isinstance(name, str) or not name:
            raise ModelFolderError(f"{self.folder / MANIFEST_NAME}: expected a file name, got {name!r}")
        root = self.folder.resolve()
        path = (root / name).resolve()
        if path.parent != root:
            raise ModelFolderError(f"{self.folder / MANIFEST_NAME}: file name {name!r} leaves the model folder")
        if not path.is_file():
            raise ModelFolderError(f"{path}: listed in {MANIFEST_NAME} but missing")
        return path

    def check_files(self, hashes: bool = False) -> None:
        """Every listed file exists with its recorded size (and sha256 when `hashes`), and every graph and
        tokenizer file named stays inside the folder."""
        for graph in self["graphs"].values():
            self.path(graph.get("file") if isinstance(graph, dict) else None)
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
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{file}: not found; expected a model folder made by `qwen-edge export`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{file}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ModelFolderError(f"{file}: missing {', '.join(missing)}")
    if data["format_version"] != FORMAT_VERSION:
        raise ModelFolderError(f"{file}: format_version {data['format_version']} is not supported; "
                               f"expected {FORMAT_VERSION} (re-export the model)")
    return Manifest(folder, data)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
