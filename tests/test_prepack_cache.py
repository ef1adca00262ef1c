"""The first-load cache of onnxruntime's prepacked weights (toolkit/prepack_cache.py)."""
import os
import warnings

import numpy as np
import onnxruntime as ort
import pytest

import toolkit
from toolkit import prepack_cache
from toolkit.errors import ArgumentError


def logits(model) -> np.ndarray:
    ids = np.array([[5, 17, 99, 3, 250, 8]], np.int64)
    cache = model.new_cache(1)
    return model.forward("prefill", ids, np.ones_like(ids), cache, num_logits=ids.shape[1])


def entries(root):
    return sorted(p for p in root.glob("*/*") if p.is_dir())


def spy_sessions(monkeypatch) -> list:
    """The model files onnxruntime is asked to open, in order."""
    opened = []
    real = ort.InferenceSession

    def session(path, *args, **kwargs):
        opened.append(os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return opened


def test_first_load_saves_later_loads_map_and_outputs_are_identical(exported, tmp_path, monkeypatch):
    folder = exported("untied_bf16", bits=4)
    want = logits(toolkit.load(folder, threads=1))
    root = tmp_path / "cache"
    opened = spy_sessions(monkeypatch)
    first = toolkit.load(folder, threads=1, prepack_cache=root)
    [entry] = entries(root)
    assert {p.name for p in entry.iterdir()} == {"prefill.onnx", "prefill.onnx.data", "entry.json"}
    assert not list(root.glob("*/.making-*"))  # nothing half-made left behind
    second = toolkit.load(folder, threads=1, prepack_cache=root)
    assert opened == [f"{folder.name}/prefill.onnx", f"{entry.name}/prefill.onnx"]
    np.testing.assert_array_equal(logits(first), want)
    np.testing.assert_array_equal(logits(second), want)
    assert second.generate("ab", max_new_tokens=6, temperature=0) == toolkit.load(folder, threads=1).generate(
        "ab", max_new_tokens=6, temperature=0)


def test_a_changed_folder_gets_a_new_entry_and_the_old_one_goes(exported, tmp_path):
    folder = exported("tied_fp32", bits=4)
    root = tmp_path / "cache"
    toolkit.load(folder, threads=1, prepack_cache=root)
    [old] = entries(root)
    weights = folder / "model.weights"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a re-export would leave it
    toolkit.load(folder, threads=1, prepack_cache=root)
    [new] = entries(root)
    assert new != old and new.parent == old.parent


def test_a_damaged_entry_is_made_again(exported, tmp_path):
    folder = exported("untied_bf16", bits=4)
    root = tmp_path / "cache"
    want = logits(toolkit.load(folder, threads=1, prepack_cache=root))
    [entry] = entries(root)
    (entry / "prefill.onnx").write_bytes(b"not a model")
    with pytest.warns(UserWarning, match="did not load"):
        model = toolkit.load(folder, threads=1, prepack_cache=root)
    np.testing.assert_array_equal(logits(model), want)
    [again] = entries(root)
    assert (again / "prefill.onnx").stat().st_size > 100


def test_too_little_disk_loads_without_the_cache(exported, tmp_path, monkeypatch):
    folder = exported("untied_bf16", bits=4)
    monkeypatch.setattr(prepack_cache, "DISK_MARGIN", 1e15)
    with pytest.warns(UserWarning, match="GB free"):
        model = toolkit.load(folder, threads=1, prepack_cache=tmp_path / "cache")
    assert entries(tmp_path / "cache") == []
    np.testing.assert_array_equal(logits(model), logits(toolkit.load(folder, threads=1)))


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(prepack_cache.ENV, str(tmp_path))
    assert prepack_cache.default_root() == tmp_path / "prepacked"
    monkeypatch.delenv(prepack_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepack_cache.default_root() == tmp_path / "xdg" / "qwen-edge" / "prepacked"


def test_bad_settings_are_one_line_errors(exported):
    folder = exported("untied_bf16", bits=4)
    with pytest.raises(ArgumentError, match="prepack_cache 3: expected True"):
        toolkit.load(folder, prepack_cache=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = toolkit.load(folder, threads=1, prepack_cache=None)  # None: no cache, and no warning
    assert model._prepack_root is None
    assert {i.name for i in model.session("prefill").get_inputs()} >= {"input_ids", "attention_mask", "num_logits"}


def test_cli_flag_uses_the_cache_root_from_the_environment(exported, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    folder = exported("untied_bf16", bits=4)
    exe = str(Path(sys.executable).parent / "qwen-edge")
    env = dict(os.environ, **{prepack_cache.ENV: str(tmp_path)})
    runs = [subprocess.run([exe, "generate", str(folder), "hi", "--raw", "--max-new-tokens", "4", "--temperature",
                            "0", "--threads", "1", "--prepack-cache"], capture_output=True, text=True, env=env,
                           timeout=120) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert len(entries(tmp_path / "prepacked")) == 1
