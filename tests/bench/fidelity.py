"""Fidelity of qwen-edge's quantization choices on the real sample: method × bits × group size → KL, top-1,
PPL, bytes, export time (not run in CI).

    .venv/bin/python tests/bench/fidelity.py [--work models/peers-run] [--only rtn-sym-g32-lm4 …]

Each variant is exported from the sample GGUF and scored on tests/data/prose.txt and code.txt against the
same float32 reference log-probabilities as tests/bench/peers.py (shared windows, shared work folder), so
its figures line up with the peers' table. Variants run MatMulNBits at accuracy level 0 (float32 compute)
unless their name says acc4. Prints a markdown table and writes WORK/fidelity.json (rows of
variants not selected by --only are kept from earlier runs in the same work folder).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402  (also puts the repository on sys.path)
from runner_common import load_windows, score_windows  # noqa: E402

import toolkit  # noqa: E402
from export import QuantSpec, export  # noqa: E402

VARIANTS = {  # name -> QuantSpec
    "rtn-sym-g32-lm4": QuantSpec(bits=4, method="rtn", symmetric=True),
    "rtn-sym-g32-lm8": QuantSpec(bits=4, method="rtn", symmetric=True, lm_head_bits=8),
    "rtn-asym-g32-lm8": QuantSpec(bits=4, method="rtn", symmetric=False, lm_head_bits=8),
    "search-asym-g32-lm8": QuantSpec(bits=4, method="search", symmetric=False, lm_head_bits=8),
    "calibrated-sym-g32-lm8": QuantSpec(bits=4, method="calibrated", symmetric=True, lm_head_bits=8),
    "calibrated-asym-g32-lm8": QuantSpec(bits=4, method="calibrated", symmetric=False, lm_head_bits=8),
    "calibrated-asym-g32-lm8g128-e64-acc0": QuantSpec.recommended(4, accuracy_level=0),
    "calibrated-asym-g32-lm8g128-e64-acc4 (default)": QuantSpec.recommended(4),
    "calibrated-asym-g32-lm4g32-e64-acc4": QuantSpec.recommended(4, lm_head_bits=4, lm_head_group_size=32),
    "calibrated-asym-g64-lm8g128-e64-acc4": QuantSpec.recommended(4, group_size=64),
    "calibrated-asym-g128-lm8": QuantSpec(bits=4, method="calibrated", symmetric=False, group_size=128,
                                          lm_head_bits=8),
    "int8 rtn-sym-g32 (default)": QuantSpec.recommended(8),  # 8-bit matrices always run at accuracy level 4
    "int8 rtn-sym-g16": QuantSpec(bits=8, method="rtn", symmetric=True, group_size=16),
    "int8 rtn-asym-g32": QuantSpec(bits=8, method="rtn", symmetric=False),
    "int8 search-sym-g32": QuantSpec(bits=8, method="search", symmetric=True),
}


SAME_AS_PEERS = {  # variants that peers.py already exports into the shared work folder
    "rtn-sym-g32-lm4": "qwen-edge-int4-rtn", "calibrated-asym-g32-lm8g128-e64-acc4 (default)": "qwen-edge-int4",
    "int8 rtn-sym-g32 (default)": "qwen-edge-int8"}


def measure(name: str, spec: QuantSpec, work: Path, scores: dict) -> dict:
    out = work / SAME_AS_PEERS.get(name, "fidelity-" + name.split(" (")[0].replace(" ", "-"))
    started = time.perf_counter()
    if not (out / "qwen-edge.json").exists():
        export(peers.SAMPLE_GGUF, out, spec, force=True, log=lambda m: None)
        seconds = time.perf_counter() - started
    else:
        seconds = json.loads((out / "qwen-edge.json").read_text())["export"]["seconds"]
    model = toolkit.load(out, preload=False)
    q = model.manifest["quantization"]
    row = {"bits": spec.bits, "method": q["method"], "group_size": q["group_size"], "symmetric": q["symmetric"],
           "lm_head_bits": q["lm_head_bits"], "lm_head_group_size": q.get("lm_head_group_size"),
           "weights_bytes": q["weights_bytes"], "export_s": seconds}

    def logits_fn(window):
        x = np.array([list(window)], dtype=np.int64)
        return model.forward("prefill", x, np.ones_like(x), model.new_cache(1), num_logits=x.shape[1])[0]

    notes = []
    for text, d in scores.items():
        _, ids, wins, ref = load_windows(f"{text}={d}")
        row[text] = score_windows(logits_fn, ids, wins, ref, notes)
    print(f"{name}: done", file=sys.stderr)
    return row


def table(rows: dict) -> str:
    base = rows.get("rtn-sym-g32-lm4")
    head = ("| variant | weights MB | export s | KL prose | KL code | KL vs RTN sym (prose / code) | top-1 prose "
            "| top-1 code | PPL prose | PPL code |")
    lines = [head, "|---" * 10 + "|"]
    for name, r in rows.items():
        ratio = (f"{r['prose']['kl_mean'] / base['prose']['kl_mean']:.2f}× / "
                 f"{r['code']['kl_mean'] / base['code']['kl_mean']:.2f}×") if base else "—"
        lines.append(f"| {name} | {r['weights_bytes'] / 1e6:,.1f} | {r['export_s']:.0f} | {r['prose']['kl_mean']:.4f} "
                     f"| {r['code']['kl_mean']:.4f} | {ratio} | {100 * r['prose']['top1']:.1f} % "
                     f"| {100 * r['code']['top1']:.1f} % | {r['prose']['ppl']:.2f} | {r['code']['ppl']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=peers.ROOT / "models" / "peers-run")
    ap.add_argument("--only", nargs="*", help="variant names (prefix match)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    peers.export_ours(args.work)  # the fp32 reference lives there
    _, scores = peers.prepare_inputs(args.work)
    saved = args.work / "fidelity.json"
    rows = json.loads(saved.read_text()) if saved.exists() else {}  # earlier runs' rows, re-measured if selected
    rows = {name: rows[name] for name in VARIANTS if name in rows}
    rows |= {name: measure(name, spec, args.work, scores) for name, spec in VARIANTS.items()
             if not args.only or any(name.startswith(o) for o in args.only)}
    rows = {name: rows[name] for name in VARIANTS if name in rows}
    ref = json.loads((args.work / "score-prose" / "windows.json").read_text())
    print(f"Reference: qwen-edge fp32 export of the sample GGUF; texts: tests/data/prose.txt "
          f"({len(ref['ids'])} tokens) and code.txt; windows {peers.WINDOW}/{peers.STRIDE}.\n")
    print(table(rows))
    saved.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
