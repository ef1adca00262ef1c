import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_checkpoint  # noqa: E402

SAMPLE_HF = Path(__file__).resolve().parents[1] / "models" / "qwen2.5-coder-0.5b-instruct-hf"
CHECKPOINTS = {  # name -> (tied, dtype, sharded)
    "tied_fp32": (True, "float32", False),
    "untied_bf16": (False, "bfloat16", True),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> folder of a tiny random Qwen2, written once per session."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            tied, dtype, sharded = CHECKPOINTS[name]
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name), tied=tied, dtype=dtype, sharded=sharded)
        return made[name]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoint):
    """exported(name, bits=32, group_size=32, symmetric=True, ops="fast") -> model folder, exported once per
    session."""
    from export import QuantSpec, export

    made = {}

    def get(name: str, bits: int = 32, group_size: int = 32, symmetric: bool = True, ops: str = "fast") -> Path:
        key = (name, bits, group_size, symmetric, ops)
        if key not in made:
            out = tmp_path_factory.mktemp("exports") / f"{name}-{bits}-{group_size}-{symmetric}-{ops}"
            # int8 at accuracy level 0: exact float math, so the graphs can be compared with the oracle at 1e-4
            spec = QuantSpec(bits, group_size, symmetric, int8_accuracy_level=0)
            made[key] = export(checkpoint(name), out, spec, log=lambda m: None, ops=ops)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tools_folder(tmp_path_factory):
    """A tiny random Qwen2 carrying Qwen2.5's real chat template (tools section included, tests/data) and 2,048
    positions (a prompt with tools is long in the tiny vocabulary), exported in float32 once per session."""
    from export import QuantSpec, export

    template = (Path(__file__).parent / "data" / "qwen2.5_chat_template.jinja").read_text(encoding="utf-8")
    folder = make_checkpoint(tmp_path_factory.mktemp("tools_ckpt"), tied=True, context=2048, chat_template=template)
    out = tmp_path_factory.mktemp("exports") / "tools-32"
    return export(folder, out, QuantSpec(32, 32, True, int8_accuracy_level=0), log=lambda m: None)


@pytest.fixture(scope="session")
def sample_hf():
    """The real-model sample's Hugging Face folder (models/get_sample.py fetches it when absent); the test is
    skipped, with the reason, only when it cannot be fetched."""
    if not (SAMPLE_HF / "config.json").exists():
        r = subprocess.run([sys.executable, str(SAMPLE_HF.parent / "get_sample.py")], capture_output=True, text=True,
                           timeout=1800)
        if r.returncode != 0:
            pytest.skip(f"the real-model sample could not be fetched: {r.stderr.strip().splitlines()[-1:]}")
    return SAMPLE_HF


@pytest.fixture(scope="session")
def sample_int4(sample_hf, tmp_path_factory):
    """The sample exported at int4 g32 once per session (~400 MB), shared by every sample test that reads it."""
    from export import QuantSpec, export

    return export(sample_hf, tmp_path_factory.mktemp("sample") / "int4", QuantSpec(bits=4, group_size=32),
                  log=lambda m: None)
