"""Snapshot onnxruntime's kernel table (op, domain, version range, type constraints per provider).

    python scripts/ort_kernel_table.py OperatorKernels.md [--cpu-from-installed]
        [--source "where the markdown came from"] [--out tests/data/ort_kernels.json]
    python scripts/ort_kernel_table.py --refresh-cpu [--out tests/data/ort_kernels.json]

OperatorKernels.md is onnxruntime's docs/OperatorKernels.md (generated from the registered kernels
of a build with every provider). Only the CPU, CUDA and DML providers are kept. With
--cpu-from-installed the CPU rows come instead from the installed onnxruntime's own kernel
registry, which is exact for the installed version (the markdown may be from another commit).
--refresh-cpu keeps the snapshot's CUDA and DML rows and replaces only its CPU rows from the installed
onnxruntime (a new CPU release, while the GPU packages stay on the version their rows describe).

Rows are {"since": [first, last or null], "types": {constraint: [element types]}}, newest first;
"tensor(float)" is written "float" and "seq(tensor(float))" "seq(float)". A provider that lists
several open-ended rows for one op (DML writes "13+" and "7+") has each closed just below the next
newer row, so that every opset version falls in exactly one row.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider")
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "ort_kernels.json"


def parse_version(text: str) -> list:
    """'13+' -> [13, None]; '[11, 12]' -> [11, 12]; '9' -> [9, 9]."""
    text = text.strip()
    if text.endswith("+"):
        return [int(text[:-1]), None]
    if text.startswith("["):
        first, last = text.strip("[]").split(",")
        return [int(first), int(last)]
    return [int(text), int(text)]


def short_type(name: str) -> str:
    """'tensor(float)' -> 'float', 'seq(tensor(int64))' -> 'seq(int64)'."""
    return re.sub(r"tensor\(([^()]*)\)", r"\1", name.strip())


def parse_types(cell: str) -> dict:
    """'**T** = tensor(float), tensor(float16)<br/> **M** = tensor(int32)' -> {'T': [...], 'M': [...]}."""
    types = {}
    for part in cell.split("<br/>"):
        m = re.match(r"\s*\*\*(\w+)\*\*\s*=\s*(.*)", part)
        if m:
            types[m.group(1)] = sorted(short_type(t) for t in m.group(2).split(", ") if t.strip())
    return types


def close_ranges(rows: list) -> list:
    """Sort rows newest first and end each open-ended older row just below the next newer one."""
    rows = sorted(rows, key=lambda r: -r["since"][0])
    for newer, older in zip(rows, rows[1:]):
        if older["since"][1] is None and newer["since"][0] > older["since"][0]:
            older["since"][1] = newer["since"][0] - 1
    return rows


def parse_markdown(text: str) -> dict:
    """OperatorKernels.md -> {provider: {'domain:Op': [rows]}} for the providers in PROVIDERS."""
    table: dict = {}
    provider = domain = op = None
    for line in text.splitlines():
        if m := re.match(r"## Operators implemented by (\w+)", line):
            provider, domain = m.group(1), None
        elif m := re.match(r"\|\*\*Operator Domain:\*\* \*([\w.]+)\*", line):
            domain = m.group(1)
        elif provider in PROVIDERS and domain and line.startswith("|"):
            cells = line.split("|")
            if len(cells) < 6 or not cells[3].strip():
                continue  # the '| |' lines closing a domain
            op = cells[1].strip() or op
            row = {"since": parse_version(cells[3]), "types": parse_types(cells[4])}
            table.setdefault(provider, {}).setdefault(f"{domain}:{op}", []).append(row)
    return {p: {k: close_ranges(v) for k, v in sorted(ops.items())} for p, ops in table.items()}


def installed_kernels(provider: str = "CPUExecutionProvider") -> dict:
    """The installed onnxruntime's registered kernels for provider, in parse_markdown's form."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    merged: dict = defaultdict(lambda: defaultdict(set))
    for k in C.get_all_opkernel_def():
        if k.provider == provider:
            first, last = k.version_range
            since = (first, None if last >= 2**31 - 1 else last)
            for name, types in k.type_constraints.items():
                merged[(f"{k.domain or 'ai.onnx'}:{k.op_name}", since)][name].update(map(short_type, types))
    table: dict = defaultdict(list)
    for (key, since), types in merged.items():
        table[key].append({"since": list(since), "types": {n: sorted(t) for n, t in sorted(types.items())}})
    return {k: close_ranges(v) for k, v in sorted(table.items())}


def dump(snapshot: dict) -> str:
    """JSON with one op per line: compact, but diffable."""
    lines = ["{", f'"source": {json.dumps(snapshot["source"])},', f'"onnxruntime": {json.dumps(snapshot["onnxruntime"])},',
             '"providers": {']
    providers = snapshot["providers"]
    for i, (provider, ops) in enumerate(providers.items()):
        lines.append(f"{json.dumps(provider)}: {{")
        items = [f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in ops.items()]
        lines.append(",\n".join(items))
        lines.append("}" + ("," if i < len(providers) - 1 else ""))
    lines += ["}", "}", ""]
    return "\n".join(lines)


def main() -> None:
    """Parse the markdown (and optionally the installed CPU registry) and write the snapshot."""
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("markdown", type=Path, nargs="?", help="onnxruntime's docs/OperatorKernels.md")
    ap.add_argument("--source", default="", help="where the markdown came from (repository, commit)")
    ap.add_argument("--cpu-from-installed", action="store_true",
                    help="take CPUExecutionProvider from the installed onnxruntime's kernel registry")
    ap.add_argument("--refresh-cpu", action="store_true",
                    help="keep --out's CUDA and DML rows; take CPUExecutionProvider from the installed onnxruntime")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.refresh_cpu == (args.markdown is not None):
        ap.error("give either OperatorKernels.md or --refresh-cpu")

    if args.refresh_cpu:
        old = json.loads(args.out.read_text(encoding="utf-8"))
        providers = old["providers"]
        source = old["source"].split("; CPUExecutionProvider from")[0]
        args.cpu_from_installed = True
    else:
        providers = parse_markdown(args.markdown.read_text(encoding="utf-8"))
        source = args.source or str(args.markdown)
    if args.cpu_from_installed:
        providers["CPUExecutionProvider"] = installed_kernels()
        source += f"; CPUExecutionProvider from the installed onnxruntime {onnxruntime.__version__} kernel registry"
    providers = {p: providers[p] for p in PROVIDERS if p in providers}
    snapshot = {"source": source, "onnxruntime": onnxruntime.__version__, "providers": providers}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(snapshot), encoding="utf-8")
    counts = ", ".join(f"{p}: {len(ops)} ops" for p, ops in providers.items())
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB; {counts})")


if __name__ == "__main__":
    main()
