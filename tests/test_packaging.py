"""The runtime stays light: no torch in its dependencies or in a generating process."""
import subprocess
import sys
from importlib.metadata import requires


def test_base_install_does_not_pull_torch():
    base = [r for r in requires("qwen-edge") if "extra ==" not in r]
    assert base and not any(r.lower().startswith(("torch", "transformers", "onnx ", "onnx>", "onnx=")) for r in base)


def test_generating_imports_neither_torch_nor_the_converter(exported):
    folder = exported("tied_fp32", bits=4)
    code = ("import sys, toolkit; m = toolkit.load(sys.argv[1]); m.generate('hi', max_new_tokens=3); "
            "bad = [n for n in ('torch', 'transformers', 'export', 'onnx') if n in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
