"""The README's embedding example runs as written (against a tiny model instead of the sample)."""
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_embedding_example_runs(exported, tmp_path):
    text = README.read_text()
    block = re.search(r"An app embeds it like this.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    folder = exported("tied_fp32", bits=32)
    script = tmp_path / "example.py"
    script.write_text(block.replace('"models/qwen2.5-coder-0.5b-instruct-int4"', repr(str(folder))))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tok/s, context" in r.stdout and "error: max_new_tokens 0" in r.stdout
