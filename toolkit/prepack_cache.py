"""A first-load cache of onnxruntime's prepacked weights, so that a large model loads in seconds.

On the CPU, every MatMulNBits weight is repacked into the layout of this CPU's kernels when a session is
created ("prepacking"); that is most of a load's time and its anonymous memory (the 7B-shaped int4 folder on 2
cores: 24.7 s, 5.6 GB anonymous). onnxruntime can save a session's optimized graph together with its prepacked
weights (session.save_external_prepacked_constant_initializers) and load that copy later with the prepacked
blobs memory-mapped from the file instead of rebuilt. The layout depends on this CPU, this onnxruntime and
the session's settings, so it cannot ship in the model folder; it is made here, once, on the first load:

    model = toolkit.load("models/qwen-7b-int4", prepack_cache=True)   # first load: normal time + saving
    model = toolkit.load("models/qwen-7b-int4", prepack_cache=True)   # later loads: the saved copy

The trade: disk. onnxruntime's saved data file holds the original weights and the prepacked ones (about
twice the folder's weights; 10.5 GB for the 7B's 5.1 GB). An entry is keyed by the graph's and the weights'
identities (sha256 from the manifest, size and modification time), onnxruntime's version, the CPU and the
settings that change the saved graph; an entry for the same folder and graph under another key (a re-export,
an onnxruntime upgrade) is removed when the new one is made. Making an entry never leaves a partial one
behind: it is written to a temporary folder beside the cache and renamed when complete. A damaged entry is
dropped and made again. Not enough free disk, or any error while saving: the model loads without the cache,
with one warning.
"""
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import onnxruntime as ort

ENV = "QWEN_EDGE_CACHE"  # overrides the default cache root
DISK_MARGIN = 2.3  # free bytes needed, as a multiple of the weights file (original + prepacked + slack)
ENTRY_INFO = "entry.json"


def default_root() -> Path:
    """$QWEN_EDGE_CACHE/prepacked, else $XDG_CACHE_HOME or ~/.cache, then qwen-edge/prepacked."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]) / "prepacked"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen-edge" / "prepacked"


def cpu_identity() -> str:
    """What decides the prepacked layout on this machine: architecture, CPU model and its feature flags."""
    parts = [platform.system(), platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if key in ("flags", "Features"):
                    break  # the first processor's block is enough
    except OSError:
        pass
    return "\n".join(parts)


def entry_key(graph: Path, weights: Path, manifest_files: dict, settings: dict) -> str:
    """The cache key of one graph: changes whenever the saved copy would differ."""
    ident = {"onnxruntime": ort.__version__, "cpu": cpu_identity(), "settings": settings}
    for path in (graph, weights):
        st = path.stat()
        ident[path.name] = [manifest_files.get(path.name, {}).get("sha256"), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def folder_slot(graph: Path) -> str:
    """One directory per model folder and graph, holding its current entry."""
    return graph.stem + "-" + hashlib.sha256(str(graph.resolve()).encode()).hexdigest()[:16]


def open_session(graph: Path, weights: Path, manifest_files: dict, make_options: Callable[[], ort.SessionOptions],
                 providers: list, root: Path, settings: dict) -> ort.InferenceSession:
    """A CPU session of `graph` through the cache at `root`: the saved prepacked copy if there is one,
    else a normal session that saves one on the way. make_options: fresh SessionOptions as the caller
    wants them (threads, spinning, accuracy level); settings: those of them that change the saved graph."""
    slot = root / folder_slot(graph)
    entry = slot / entry_key(graph, weights, manifest_files, settings)
    saved = entry / graph.name
    if saved.is_file():
        options = make_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized
        try:
            return ort.InferenceSession(str(saved), options, providers=providers)
        except Exception as e:  # a damaged entry: drop it, make it again
            warnings.warn(f"{saved}: the saved prepacked copy did not load ({str(e).splitlines()[0]}); "
                          "making it again", stacklevel=3)
            shutil.rmtree(entry, ignore_errors=True)
    return _make_entry(graph, weights, make_options, providers, slot, entry)


def _make_entry(graph, weights, make_options, providers, slot: Path, entry: Path) -> ort.InferenceSession:
    def plain(reason: str) -> ort.InferenceSession:
        warnings.warn(f"prepack cache {slot.parent}: {reason}; loading {graph} without it", stacklevel=4)
        return ort.InferenceSession(str(graph), make_options(), providers=providers)

    try:
        slot.mkdir(parents=True, exist_ok=True)
        need = int(weights.stat().st_size * DISK_MARGIN)
        free = shutil.disk_usage(slot).free
        if free < need:
            return plain(f"{free / 1e9:.1f} GB free, saving the prepacked copy needs {need / 1e9:.1f} GB")
        building = Path(tempfile.mkdtemp(dir=slot, prefix=".making-"))
    except OSError as e:
        return plain(f"not writable ({e.strerror or e})")
    options = make_options()
    out = building / graph.name
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    try:
        session = ort.InferenceSession(str(graph), options, providers=providers)
        (building / ENTRY_INFO).write_text(json.dumps({"graph": str(graph.resolve()), "onnxruntime": ort.__version__},
                                                      indent=1) + "\n", encoding="utf-8")
        for name in os.listdir(building):
            with open(building / name, "rb") as f:
                os.fsync(f.fileno())
    except Exception as e:  # saving failed (disk full, ...): the model still loads, without the cache
        shutil.rmtree(building, ignore_errors=True)
        return plain(f"saving the prepacked copy failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    for old in slot.iterdir():  # entries of an earlier export or onnxruntime, and abandoned attempts
        if old != building and old != entry and (not old.name.startswith(".making-") or _stale(old)):
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(building, entry)
    except OSError:  # another process made the same entry first: keep theirs
        shutil.rmtree(building, ignore_errors=True)
    return session


def _stale(path: Path, age_s: float = 24 * 3600) -> bool:
    """An attempt another process may still be making is left alone unless a day old."""
    try:
        return time.time() - path.stat().st_mtime > age_s
    except OSError:
        return False
