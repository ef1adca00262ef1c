"""qwen-edge against the tools users would pick instead, on the real sample, in one run (not run in CI).

    bash tests/bench/setup_peers.sh            # once: the peers' venvs and model folders (see that file)
    .venv/bin/python tests/bench/peers.py [--runs 3] [--new-tokens 128] [--threads 2] [--only qwen-edge …]

Every row is measured by a runner (tests/bench/peer_*.py) in its own process and virtualenv, with one
contract: the same prompt token ids (the sample's chat template around a code-review request), greedy
decoding of exactly --new-tokens tokens with end tokens ignored, and the same three texts (prose, code,
heldout; tests/data/README.md) scored in the same sliding windows against the same float32 reference
log-probabilities (qwen-edge's --bits 32 export of the GGUF). A peer that cannot run still gets a row,
saying why. Prints one markdown table (each figure also as a ratio to qwen-edge int4) and writes all
results as JSON. tests/bench/front.py reuses TEXTS, prepare_inputs and the runners for the quality/speed front.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import toolkit  # noqa: E402
from toolkit.bench import PROMPT_TEXT  # noqa: E402
from toolkit.evaluate import log_softmax, windows  # noqa: E402

SAMPLE_GGUF = ROOT / "models" / "qwen2.5-coder-0.5b-instruct.gguf"
SAMPLE_HF = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-hf"
TEXTS = {"prose": ROOT / "tests" / "data" / "prose.txt", "code": ROOT / "tests" / "data" / "code.txt",
         "heldout": ROOT / "tests" / "data" / "heldout.txt"}  # heldout: a domain absent from the calibration text
WINDOW, STRIDE = 512, 256
BASELINE = "qwen-edge int4"


def rows(peers: Path, work: Path) -> list[dict]:
    """label, runner, variant, model path and python of every row, in table order."""
    ours = [dict(label=f"qwen-edge {v}", runner="peer_qwen_edge.py", variant=v, model=work / f"qwen-edge-{v}",
                 python=sys.executable) for v in OURS]
    theirs = [
        dict(label="onnxruntime-genai int4", runner="peer_genai.py", variant="int4", model=peers / "genai-int4",
             python=peers / "genai" / "bin" / "python"),
        dict(label="onnxruntime-genai int8", runner="peer_genai.py", variant="int8", model=peers / "genai-int8",
             python=peers / "genai" / "bin" / "python"),
        dict(label="optimum-onnx fp32", runner="peer_optimum.py", variant="fp32", model=peers / "optimum-fp32",
             python=peers / "optimum" / "bin" / "python"),
        dict(label="llama.cpp sample GGUF (Q5_0/Q4_K/Q6_K/Q8_0)", runner="peer_llamacpp.py", variant="sample-mixed",
             model=peers / "gguf" / "sample-mixed.gguf", python=peers / "llamacpp" / "bin" / "python"),
        dict(label="llama.cpp Q8_0", runner="peer_llamacpp.py", variant="q8_0", model=peers / "gguf" / "q8_0.gguf",
             python=peers / "llamacpp" / "bin" / "python"),
        dict(label="llama.cpp Q4_0", runner="peer_llamacpp.py", variant="q4_0", model=peers / "gguf" / "q4_0.gguf",
             python=peers / "llamacpp" / "bin" / "python"),
    ]
    return ours + theirs


OURS = {  # variant -> how `qwen-edge export` makes it
    "int4": "the defaults (calibrated, asymmetric g32, int8 lm_head g128, embedding g64, accuracy level 4)",
    "int4-rtn": "--method rtn --symmetric --lm-head-bits 4 --accuracy-level 4 (what genai's int4 does)",
    "int8": "the defaults (rtn, symmetric g32)",
    "fp32": "--bits 32 (the reference)",
    "int4-portable": "the int4 defaults with --ops portable (standard ONNX only; onnxruntime fuses it back)",
}


def export_ours(work: Path) -> None:
    from export import QuantSpec, export

    specs = {"int4": QuantSpec.recommended(4),
             "int4-rtn": QuantSpec(bits=4, method="rtn", symmetric=True, accuracy_level=4),
             "int8": QuantSpec.recommended(8), "fp32": QuantSpec.recommended(32),
             "int4-portable": QuantSpec.recommended(4)}
    for variant, spec in specs.items():
        out = work / f"qwen-edge-{variant}"
        if not (out / "qwen-edge.json").exists():
            export(SAMPLE_GGUF, out, spec, force=True, ops="portable" if variant.endswith("portable") else "fast")


def prepare_inputs(work: Path, reference: Path | None = None) -> tuple[Path, dict]:
    """prompt.json and, per text of TEXTS, windows.json + reference.npy (float32 log-probs of the fp32 export:
    `reference`, by default WORK/qwen-edge-fp32)."""
    ref = toolkit.load(reference or work / "qwen-edge-fp32", preload=False)
    prompt = work / "prompt.json"
    ids = ref.encode([{"role": "user", "content": PROMPT_TEXT}])
    prompt.write_text(json.dumps({"ids": ids}))
    scores = {}
    for name, path in TEXTS.items():
        d = work / f"score-{name}"
        scores[name] = d
        if (d / "reference.npy").exists():
            continue
        d.mkdir(exist_ok=True)
        text_ids = ref.tokenizer.encode(path.read_text(encoding="utf-8"))
        plan = windows(len(text_ids), WINDOW, STRIDE)
        n = sum(end - first for _, end, first in plan)
        out = np.lib.format.open_memmap(d / "reference.npy.partial", mode="w+", dtype=np.float32,
                                        shape=(n, ref.config["vocab_size"]))
        row = 0
        for start, end, first in plan:
            chunk = np.array([text_ids[start:end]], dtype=np.int64)
            logits = ref.forward("prefill", chunk, np.ones_like(chunk), ref.new_cache(), num_logits=chunk.shape[1])[0]
            out[row:row + end - first] = log_softmax(logits[first - 1 - start:end - 1 - start])
            row += end - first
        out.flush()
        del out
        os.replace(d / "reference.npy.partial", d / "reference.npy")
        (d / "windows.json").write_text(json.dumps({"ids": text_ids, "windows": plan}))
        print(f"reference for {name}: {n} targets", file=sys.stderr)
    return prompt, scores


def run_row(row: dict, prompt: Path, scores: dict, args, work: Path) -> dict:
    out = work / f"result-{row['label'].split()[0]}-{row['variant']}.json"
    if not Path(row["python"]).exists():
        return {"ok": False, "why": f"{row['python']} missing: run tests/bench/setup_peers.sh"}
    cmd = [str(row["python"]), str(BENCH / row["runner"]), "--variant", row["variant"], "--model", str(row["model"]),
           "--prompt-ids", str(prompt), "--new-tokens", str(args.new_tokens), "--runs", str(args.runs),
           "--threads", str(args.threads), "--out", str(out)]
    cmd += [a for name, d in scores.items() for a in ("--score", f"{name}={d}")]
    started = time.time()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=3600)
    result = json.loads(out.read_text()) if out.exists() else {"ok": False, "why": "the runner wrote no result"}
    print(f"{row['label']}: {'ok' if result.get('ok') else result.get('why')} ({time.time() - started:.0f} s)",
          file=sys.stderr)
    return result


COLUMNS = [  # header, getter, format, higher is better?
    ("disk MB", lambda r: r["disk_bytes"] / 1e6, "{:,.0f}", False),
    ("peak RSS MB", lambda r: r["peak_rss_bytes"] / 1e6, "{:,.0f}", False),
    ("load s", lambda r: r["load_s"], "{:.2f}", False),
    ("TTFT ms", lambda r: r["ttft_s"]["median"] * 1000, "{:,.0f}", False),
    ("prefill tok/s", lambda r: r["prefill_tok_s"]["median"], "{:,.0f}", True),
    ("decode tok/s", lambda r: r["decode_tok_s"]["median"], "{:.1f}", True),
    ("PPL prose", lambda r: r["scores"]["prose"]["ppl"], "{:.2f}", False),
    ("PPL code", lambda r: r["scores"]["code"]["ppl"], "{:.3f}", False),
    ("PPL heldout", lambda r: r["scores"]["heldout"]["ppl"], "{:.2f}", False),
    ("KL prose", lambda r: r["scores"]["prose"]["kl_mean"], "{:.4f}", False),
    ("KL code", lambda r: r["scores"]["code"]["kl_mean"], "{:.4f}", False),
    ("KL heldout", lambda r: r["scores"]["heldout"]["kl_mean"], "{:.4f}", False),
    ("top-1 prose", lambda r: 100 * r["scores"]["prose"]["top1"], "{:.1f} %", True),
    ("top-1 code", lambda r: 100 * r["scores"]["code"]["top1"], "{:.1f} %", True),
    ("top-1 heldout", lambda r: 100 * r["scores"]["heldout"]["top1"], "{:.1f} %", True),
]


def table(results: dict) -> str:
    base = results.get(BASELINE, {})
    lines = ["| tool | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, r in results.items():
        if not r.get("ok"):
            lines.append(f"| {label} | " + f"not measured: {r.get('why', '?')}" + " |" * len(COLUMNS))
            continue
        cells = []
        for _, get, fmt, _ in COLUMNS:
            try:
                value = get(r)
            except (KeyError, TypeError):
                cells.append("—")
                continue
            cell = fmt.format(value)
            try:
                b = get(base) if base.get("ok") else None
                if b and label != BASELINE:
                    cell += f" ({value / b:.2f}×)"
            except (KeyError, TypeError, ZeroDivisionError):
                pass
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    flags = set()
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8") if f in flags]
    return f"{os.cpu_count()} cores, {model}, flags: {' '.join(shown)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers-dir", type=Path, default=Path(os.environ.get(
        "PEERS_DIR", Path.home() / ".cache" / "qwen-edge" / "peers")))
    ap.add_argument("--work", type=Path, default=ROOT / "models" / "peers-run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="labels (prefix match) of the rows to run")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: WORK/results.json)")
    args = ap.parse_args()
    if not SAMPLE_GGUF.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "get_sample.py")], check=True)
    args.work.mkdir(parents=True, exist_ok=True)
    export_ours(args.work)
    prompt, scores = prepare_inputs(args.work)
    results = {}
    for row in rows(args.peers_dir, args.work):
        if args.only and not any(row["label"].startswith(o) for o in args.only):
            continue
        results[row["label"]] = run_row(row, prompt, scores, args, args.work)
    header = (f"Machine: {machine()}. Date: {datetime.date.today()}. Prompt: {len(json.loads(prompt.read_text())['ids'])}"
              f" tokens, {args.new_tokens} greedy new tokens, {args.runs} runs (medians), {args.threads} threads. "
              f"Texts: tests/data/prose.txt, code.txt and heldout.txt, windows of {WINDOW} with stride {STRIDE}; KL and top-1 "
              "against qwen-edge fp32. Ratios in parentheses are to qwen-edge int4.")
    print(header + "\n\n" + table(results))
    for variant, how in OURS.items():
        print(f"- qwen-edge {variant}: {how}")
    for label, r in results.items():
        for note in r.get("notes", []) if r.get("ok") else []:
            print(f"- {label}: {note}")
    (args.out or args.work / "results.json").write_text(json.dumps({"header": header, "results": results}, indent=1))


if __name__ == "__main__":
    main()
