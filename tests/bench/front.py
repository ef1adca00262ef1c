"""The quality/speed front of qwen-edge's int4 options on the sample, beside genai and llama.cpp (not in CI).

    bash tests/bench/setup_peers.sh                       # once: the peers' venvs and model folders
    .venv/bin/python tests/bench/front.py [--runs 3] [--only PREFIX ...] [--variants [NAME=]OPTIONS ...]

Every qwen-edge variant is a set of `qwen-edge export` options, exported from the Hugging Face sample
(models/qwen2.5-coder-0.5b-instruct-hf) into models/front/<name> unless a folder there already holds an export
whose manifest matches those options (any folder name: another run's folders are reused). The float32
reference is models/front/fp32 (--bits 32 of the same folder); tests/bench/peers.py makes the prompt and,
for every text of its TEXTS (prose, code, heldout), the windows and reference log-probabilities. Every row
(ours, onnxruntime-genai int4/int8, llama.cpp Q4_0 and the sample GGUF) is measured by its peer runner
(tests/bench/peer_*.py, its own venv), one process per row and round: round k runs every row once before
round k+1 starts, so the decode runs of all rows alternate; round 0 also scores the texts (after its timing).
Results are cached per row and round under WORK/results/<texts hash>/ and reused by later invocations;
--recompute [NAME ...] drops them. Decode tok/s is the median over rounds (greedy, --new-tokens tokens, end
tokens ignored).

Bytes read per decoded token (a static count from the weights, the KV cache left out since it is the same
for every row at a given context): every weight initializer of the decode graph that a matmul reads in
full (MatMulNBits packed weights + scales + zero points + biases, float MatMul/Gemm weights), the lm_head
among them, plus one row of the embedding table (its packed data, scales and zero points divided by the
number of rows), the small tensors (norm weights, biases outside the matmuls) and one row of the RoPE
cos/sin tables that GroupQueryAttention reads. For genai the graph is its model.onnx; for a GGUF,
every tensor's bytes except token_embd.weight, of which one row (and, when there is no output.weight, the
whole table again as the tied lm_head).

The run takes /tmp/qwen-edge-bench.lock (flock) around every export, reference and runner process, so
other timings on this machine wait for it and it waits for them; do not wrap the script in flock yourself
(--no-lock if you must). Prints a markdown table (ratios to genai int4), writes tests/bench/results/front.json
and docs/front.png (decode tok/s against KL; peers marked and labelled, the Pareto front drawn).
"""
import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402  (TEXTS, prepare_inputs, machine)

HF = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-hf"
FRONT = ROOT / "models" / "front"
QWEN_EDGE = Path(sys.executable).parent / "qwen-edge"
BASELINE = "genai int4"
LOCK = "/tmp/qwen-edge-bench.lock"

PEER_ROWS = [  # label, runner, variant, model (relative to the peers dir), venv
    ("genai int4", "peer_genai.py", "int4", "genai-int4", "genai"),
    ("genai int8", "peer_genai.py", "int8", "genai-int8", "genai"),
    ("llama.cpp Q4_0", "peer_llamacpp.py", "q4_0", "gguf/q4_0.gguf", "llamacpp"),
    ("llama.cpp sample GGUF", "peer_llamacpp.py", "sample-mixed", "gguf/sample-mixed.gguf", "llamacpp"),
]


# ---------------------------------------------------------------------------------------------------------
# variants: export options -> the quantization the manifest will record
def parse_options(options: str) -> dict:
    """What `qwen-edge export OPTIONS` records in its manifest's "quantization" (the CLI's defaults applied)."""
    from export.quantize import QuantSpec

    ap = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--asymmetric", dest="symmetric", action="store_false", default=None)
    ap.add_argument("--symmetric", dest="symmetric", action="store_true")
    ap.add_argument("--method", default=None)
    ap.add_argument("--accuracy-level", type=int, default=None)
    ap.add_argument("--lm-head-bits", type=int, default=None)
    ap.add_argument("--lm-head-group-size", type=int, default=None)
    a, rest = ap.parse_known_args(shlex.split(options))
    spec = QuantSpec.recommended(a.bits, preset=a.preset, group_size=a.group_size, symmetric=a.symmetric,
                                 method=a.method, accuracy_level=a.accuracy_level, lm_head_bits=a.lm_head_bits,
                                 lm_head_group_size=a.lm_head_group_size)  # the CLI's defaults, from their source
    q = {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric, "method": spec.method,
         "lm_head_bits": spec.lm_head_bits or spec.bits, "lm_head_group_size": spec.lm_head_group_size or spec.group_size}
    if a.bits == 4:
        q["accuracy_level"] = spec.accuracy_level
    if a.bits == 32:
        q = {"bits": 32}
    q["_unchecked"] = rest  # options passed to export but not compared with a manifest
    return q


def variant_name(options: str) -> str:
    q = parse_options(options)
    if q["bits"] == 32:
        return "fp32"
    name = (f"{q['method']}-{'sym' if q['symmetric'] else 'asym'}-g{q['group_size']}"
            f"-lm{q['lm_head_bits']}g{q['lm_head_group_size']}")
    if q["bits"] != 4:
        name = f"int{q['bits']}-{name}"
    if q.get("accuracy_level", 4) != 4:
        name += f"-acc{q['accuracy_level']}"
    if q["_unchecked"]:
        name += "-" + hashlib.sha1(" ".join(q["_unchecked"]).encode()).hexdigest()[:6]
    return name


def short_label(name: str) -> str:
    """'calibrated-asym-g32-lm8g128' -> 'cal a32 h8/128' (method, sym/asym + group, lm_head bits/group)."""
    parts = name.split("-")
    if len(parts) < 4:
        return name
    method, sym, g, lm = parts[:4]
    return f"{method[:4]} {sym[0]}{g[1:]} h{lm[2]}/{lm.split('g')[1]}" + ("".join(f" {p}" for p in parts[4:]))


def default_variants() -> dict:
    """name -> options: the current default, genai's recipe and the grid."""
    opts = ["",  # the current default (QuantSpec.recommended)
            "--method rtn --symmetric --group-size 32 --lm-head-bits 4 --lm-head-group-size 32"]  # genai's int4
    for method in ("calibrated", "compensated"):
        for sym in ("--asymmetric", "--symmetric"):
            for g in (32, 64, 128):
                for lm in (f"--lm-head-bits 4 --lm-head-group-size {g}", "--lm-head-bits 8 --lm-head-group-size 128"):
                    opts.append(f"--method {method} {sym} --group-size {g} {lm}")
    out = {}
    for o in opts:
        out.setdefault(variant_name(o), o)
    return out


DEFAULT_NAME = variant_name("")


def export_methods() -> set:
    """The --method choices this qwen-edge offers (compensated may not exist yet)."""
    text = subprocess.run([str(QWEN_EDGE), "export", "--help"], capture_output=True, text=True).stdout
    flat = " ".join(text.split())
    start = flat.find("--method [")
    return set(flat[start + len("--method ["):flat.find("]", start)].split("|")) if start >= 0 else set()


def manifest_matches(folder: Path, want: dict) -> bool:
    try:
        m = json.loads((folder / "qwen-edge.json").read_text())
    except (OSError, ValueError):
        return False
    q = m.get("quantization", {})
    if m.get("export", {}).get("source") != HF.name or m.get("ops", "fast") != "fast":
        return False
    if m.get("kv_cache", {}).get("dtype", "float32") != "float32":
        return False
    return all(q.get(k) == v for k, v in want.items() if not k.startswith("_"))


@contextlib.contextmanager
def bench_lock(path):
    if not path:
        yield
        return
    with open(path, "a") as f:
        waited = time.time()
        fcntl.flock(f, fcntl.LOCK_EX)
        if time.time() - waited > 5:
            print(f"  (waited {time.time() - waited:.0f} s for {path})", file=sys.stderr)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_export(name: str, options: str, args) -> tuple[Path | None, str]:
    """The folder holding this variant (reused or exported now), or None and why."""
    want = parse_options(options)
    target = FRONT / name
    if manifest_matches(target, want) and not args.reexport:
        return target, "reused"
    if not args.reexport:
        for other in sorted(FRONT.glob("*/qwen-edge.json")):
            if manifest_matches(other.parent, want) and not want["_unchecked"]:
                return other.parent, f"reused {other.parent.name}"
    if target.exists() and (target / "qwen-edge.json").exists() and not args.reexport:
        return None, f"{target} holds an export with other options (--reexport replaces it)"
    cmd = [str(QWEN_EDGE), "export", str(HF), str(target), "--force", *shlex.split(options)]
    print(f"export {name}: {' '.join(cmd[2:])}", file=sys.stderr)
    started = time.time()
    with bench_lock(args.lock):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (target / "qwen-edge.json").exists():
        return None, "export failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    print(f"  exported in {time.time() - started:.0f} s", file=sys.stderr)
    if not manifest_matches(target, want):
        return target, "exported; its manifest does not record every option asked for (check the JSON)"
    return target, "exported"


# ---------------------------------------------------------------------------------------------------------
# bytes read per decoded token
def _tensor_bytes(t) -> int:
    import numpy as np
    from onnx import TensorProto, helper

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (n + 1) // 2
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def onnx_bytes_per_token(graph_file: Path, vocab: int) -> dict:
    """Bytes of weights one decode step reads: matmul weights (lm_head apart) + one embedding row + the rest."""
    import onnx

    g = onnx.load(str(graph_file), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    uses = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((node.op_type, i, node))
    out = {"matmul": 0, "lm_head": 0, "embedding_row": 0, "other": 0}
    for name, t in inits.items():
        size = _tensor_bytes(t)
        ops = uses.get(name, [])
        if not ops:
            continue
        if all(op in ("Gather", "GatherBlockQuantized") and i != 1 for op, i, _ in ops):
            out["embedding_row"] += size // t.dims[0]
        elif all(op == "GroupQueryAttention" and i in (7, 8) for op, i, _ in ops):
            out["other"] += size // t.dims[0]  # the RoPE cos/sin tables: one position's row per step
        elif any(op in ("MatMulNBits", "MatMul", "Gemm") for op, _, _ in ops):
            nodes = [n for op, _, n in ops if op in ("MatMulNBits", "MatMul", "Gemm")]
            n_out = [a.i for n in nodes for a in n.attribute if a.name == "N"]
            lm = "lm_head" in name or (n_out and n_out[0] == vocab) or (t.dims and vocab in (t.dims[0], t.dims[-1])
                                                                        and len(t.dims) >= 2)
            out["lm_head" if lm else "matmul"] += size
        else:
            out["other"] += size
    out["total"] = sum(out.values())
    return out


def gguf_bytes_per_token(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    out = {"matmul": 0, "lm_head": 0, "embedding_row": 0, "other": 0}
    names = {t.name for t in r.tensors}
    for t in r.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":
            out["embedding_row"] += n // int(t.shape[-1])  # GGUF shapes are [ne0 = hidden, ne1 = rows]
            if "output.weight" not in names:
                out["lm_head"] += n
        elif t.name == "output.weight":
            out["lm_head"] += n
        elif len(t.shape) >= 2 and int(t.shape[1]) > 1:
            out["matmul"] += n
        else:
            out["other"] += n
    out["total"] = sum(out.values())
    return out


def bytes_per_token(row: dict, vocab: int) -> dict | None:
    model = Path(row["model"])
    try:
        if model.suffix == ".gguf":
            return gguf_bytes_per_token(model)
        if (model / "qwen-edge.json").exists():
            m = json.loads((model / "qwen-edge.json").read_text())
            return onnx_bytes_per_token(model / m["graphs"]["decode"]["file"], vocab)
        cfg = json.loads((model / "genai_config.json").read_text())
        return onnx_bytes_per_token(model / cfg["model"]["decoder"]["filename"], vocab)
    except Exception as e:  # noqa: BLE001 - a row without the figure, saying why
        return {"why": f"{type(e).__name__}: {e}"[:200]}


# ---------------------------------------------------------------------------------------------------------
# measurement
def texts_key() -> str:
    h = hashlib.sha256(f"{peers.WINDOW}/{peers.STRIDE}".encode())
    for name, path in sorted(peers.TEXTS.items()):
        h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def run_once(row: dict, rnd: int, prompt: Path, scores: dict, args, cache: Path) -> dict:
    out = cache / f"{row['slug']}.r{rnd}.json"
    if out.exists():
        return json.loads(out.read_text())
    if not Path(row["python"]).exists():
        return {"ok": False, "why": f"{row['python']} missing: run tests/bench/setup_peers.sh"}
    if not Path(row["model"]).exists():
        return {"ok": False, "why": f"{row['model']} missing"}
    tmp = cache / f"{row['slug']}.r{rnd}.partial.json"
    cmd = [str(row["python"]), str(BENCH / row["runner"]), "--variant", row["variant"], "--model", str(row["model"]),
           "--prompt-ids", str(prompt), "--new-tokens", str(args.new_tokens), "--runs", "1",
           "--threads", str(args.threads), "--out", str(tmp)]
    if rnd == 0:
        cmd += [a for name, d in scores.items() for a in ("--score", f"{name}={d}")]
    started = time.time()
    with bench_lock(args.lock):
        subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=3600)
    result = json.loads(tmp.read_text()) if tmp.exists() else {"ok": False, "why": "the runner wrote no result"}
    if result.get("ok"):
        os.replace(tmp, out)  # only successes are cached: a failed row is tried again next time
    print(f"  round {rnd} {row['label']}: "
          f"{'%.1f tok/s' % result['decode_tok_s']['median'] if result.get('ok') else result.get('why')}"
          f" ({time.time() - started:.0f} s)", file=sys.stderr)
    return result


def combine(per_round: list) -> dict:
    first = per_round[0]
    if not first.get("ok"):
        return first
    ok = [r for r in per_round if r.get("ok")]
    dec = [r["decode_tok_s"]["median"] for r in ok]
    res = dict(first)
    res["decode_tok_s"] = {"median": statistics.median(dec), "min": min(dec), "max": max(dec), "runs": dec}
    res["rounds_ok"] = len(ok)
    return res


# ---------------------------------------------------------------------------------------------------------
# report
def mean_kl(r: dict) -> float | None:
    try:
        return statistics.mean(r["scores"][t]["kl_mean"] for t in peers.TEXTS)
    except (KeyError, TypeError):
        return None


def table(rows: list, results: dict) -> str:
    names = list(peers.TEXTS)
    base = results.get(BASELINE, {})
    bdec = base["decode_tok_s"]["median"] if base.get("ok") else None
    bkl = mean_kl(base) if base.get("ok") else None
    head = (["row", "bytes/token MB", "decode tok/s (× genai int4)"] + [f"KL {t}" for t in names]
            + ["mean KL (× genai int4)"] + [f"top-1 {t}" for t in names])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        r = results[row["label"]]
        bpt = row.get("bytes_per_token") or {}
        b = f"{bpt['total'] / 1e6:.1f}" if "total" in bpt else "—"
        if not r.get("ok"):
            lines.append(f"| {row['label']} | {b} | not measured: {r.get('why', '?')} |" + " |" * (len(head) - 3))
            continue
        dec = r["decode_tok_s"]["median"]
        cells = [row["label"], b, f"{dec:.1f}" + (f" ({dec / bdec:.2f}×)" if bdec else "")]
        cells += [f"{r['scores'][t]['kl_mean']:.4f}" if t in r.get("scores", {}) else "—" for t in names]
        mk = mean_kl(r)
        cells.append("—" if mk is None else f"{mk:.4f}" + (f" ({mk / bkl:.2f}×)" if bkl else ""))
        cells += [f"{100 * r['scores'][t]['top1']:.1f} %" if t in r.get("scores", {}) else "—" for t in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto(points: list) -> list:
    """The points no other point beats on both KL (lower) and tok/s (higher), by increasing KL."""
    front, best = [], -1.0
    for kl, tps, label in sorted(points):
        if tps > best:
            front.append((kl, tps, label))
            best = tps
    return front


def plot(rows: list, results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    texts = list(peers.TEXTS)
    fig = plt.figure(figsize=(13, 11))
    gs = fig.add_gridspec(2, len(texts), height_ratios=[2.2, 1])
    panels = [("mean KL over " + ", ".join(texts), fig.add_subplot(gs[0, :]), mean_kl)]
    for i, t in enumerate(texts):
        panels.append((f"KL {t}", fig.add_subplot(gs[1, i]),
                       lambda r, t=t: r.get("scores", {}).get(t, {}).get("kl_mean")))
    styles = {"ours": dict(marker="o", color="tab:blue"), "genai": dict(marker="s", color="tab:red", s=70),
              "llama.cpp": dict(marker="^", color="tab:green", s=70)}
    for k, (xlabel, ax, get) in enumerate(panels):
        pts = []
        for row in rows:
            r = results[row["label"]]
            x = get(r) if r.get("ok") else None
            if x is None:
                continue
            y = r["decode_tok_s"]["median"]
            kind = row["kind"]
            st = dict(styles[kind])
            if row.get("is_default"):
                st.update(marker="*", s=180, color="tab:purple")
            ax.scatter([x], [y], zorder=3, label=None, **{"s": 36, **st})
            pts.append((x, y, row["label"]))
            if k == 0 or kind != "ours":
                text = row["label"] if kind != "ours" else row["short"] + (" (default)" if row.get("is_default") else "")
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8 if kind == "ours" else 9, color=st["color"])
        f = pareto(pts)
        if len(f) > 1:
            ax.step([p[0] for p in f], [p[1] for p in f], where="post", color="gray", lw=1, ls="--", zorder=1)
        ax.set_xscale("log")
        fmt = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(fmt if k == 0 else ticker.NullFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(xlabel + " (nats/token, log scale; lower is better)")
        ax.set_ylabel("decode tok/s")
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker=s["marker"], color=s["color"], label=lbl) for lbl, s in (
        ("qwen-edge variants", styles["ours"]), ("qwen-edge default", dict(marker="*", color="tab:purple")),
        ("onnxruntime-genai", styles["genai"]), ("llama.cpp", styles["llama.cpp"]))]
    handles.append(plt.Line2D([], [], color="gray", ls="--", label="Pareto front"))
    panels[0][1].legend(handles=handles, loc="best", fontsize=9)
    panels[0][1].set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", metavar="[NAME=]OPTIONS",
                    help="qwen-edge variants as export options, e.g. '--method rtn --symmetric' (default: the "
                         "current default, genai's recipe and the grid; --list shows them)")
    ap.add_argument("--only", nargs="*", metavar="PREFIX", help="rows whose label starts with one of these")
    ap.add_argument("--no-peers", action="store_true", help="only qwen-edge rows")
    ap.add_argument("--list", action="store_true", help="print the rows and their options, then exit")
    ap.add_argument("--peers-dir", type=Path, default=Path(os.environ.get(
        "PEERS_DIR", Path.home() / ".cache" / "qwen-edge" / "peers")))
    ap.add_argument("--work", type=Path, default=FRONT / "_run", help="prompt, references, cached results")
    ap.add_argument("--runs", type=int, default=3, help="rounds: each row decodes once per round")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recompute", nargs="*", metavar="PREFIX",
                    help="drop cached results (of the rows starting with these; all rows if none given)")
    ap.add_argument("--reexport", action="store_true", help="export again even when a matching folder exists")
    ap.add_argument("--no-lock", dest="lock", action="store_const", const="", default=LOCK,
                    help=f"do not take {LOCK} around exports and runners")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "front.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "front.png")
    args = ap.parse_args()

    variants = default_variants()
    if args.variants is not None:
        variants = {}
        for v in args.variants:
            name, sep, opts = v.partition("=")
            if not sep or name.startswith("-"):
                name, opts = variant_name(v), v
            variants[name] = opts
    methods = export_methods()
    rows = []
    for name, opts in variants.items():
        rows.append(dict(label=f"qwen-edge {name}", short=short_label(name), kind="ours", name=name, options=opts,
                         runner="peer_qwen_edge.py", variant=name, python=sys.executable,
                         method=parse_options(opts).get("method"), is_default=name == DEFAULT_NAME,
                         slug=f"qwen-edge-{name}"))
    if not args.no_peers:
        for label, runner, variant, model, venv in PEER_ROWS:
            rows.append(dict(label=label, kind=label.split()[0], runner=runner, variant=variant,
                             model=args.peers_dir / model, python=args.peers_dir / venv / "bin" / "python",
                             slug=label.replace(" ", "-").replace(".", "")))
    if args.only:
        rows = [r for r in rows if any(r[k].startswith(o) for o in args.only for k in ("label", "slug"))
                or any(r.get("name", "").startswith(o) for o in args.only)]
    if args.list:
        for r in rows:
            print(f"{r['label']}: " + (f"qwen-edge export {r['options'] or '(defaults)'}" if r["kind"] == "ours"
                                       else str(r["model"])))
        return

    FRONT.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results, notes = {}, {}
    for row in rows:  # exports first: all of them, so the timing rounds below run back to back
        if row["kind"] != "ours":
            continue
        if row["method"] and methods and row["method"] not in methods:
            results[row["label"]] = {"ok": False, "why": f"this qwen-edge has no --method {row['method']}"}
            continue
        folder, how = ensure_export(row["name"], row["options"], args)
        if folder is None:
            results[row["label"]] = {"ok": False, "why": how}
        else:
            row["model"] = folder
            notes[row["label"]] = how
    ref, how = ensure_export("fp32", "--bits 32", args)
    if ref is None:
        sys.exit(f"the float32 reference: {how}")
    with bench_lock(args.lock):
        prompt, scores = peers.prepare_inputs(args.work, ref)
    cache = args.work / "results" / texts_key()
    cache.mkdir(parents=True, exist_ok=True)
    if args.recompute is not None:
        for row in rows:
            if not args.recompute or any(row["label"].startswith(p) or row.get("name", "").startswith(p)
                                         for p in args.recompute):
                for f in cache.glob(f"{row['slug']}.r*.json"):
                    f.unlink()

    vocab = json.loads((ref / "qwen-edge.json").read_text())["model"]["vocab_size"]
    live = [r for r in rows if r["label"] not in results]
    per_round = {r["label"]: [] for r in live}
    for rnd in range(args.runs):
        for row in live:
            if rnd > 0 and not per_round[row["label"]][0].get("ok"):
                continue
            per_round[row["label"]].append(run_once(row, rnd, prompt, scores, args, cache))
    for row in live:
        results[row["label"]] = combine(per_round[row["label"]])
    for row in rows:
        if "model" in row:
            row["bytes_per_token"] = bytes_per_token(row, vocab)
    results = {r["label"]: results[r["label"]] for r in rows}

    n_prompt = len(json.loads(prompt.read_text())["ids"])
    header = (f"Machine: {peers.machine()}. Date: {datetime.date.today()}. Prompt: {n_prompt} tokens, "
              f"{args.new_tokens} greedy new tokens, {args.runs} rounds (every row once per round, alternating; "
              f"medians), {args.threads} threads. Texts: " + ", ".join(f"tests/data/{p.name}" for p in peers.TEXTS.values())
              + f", windows of {peers.WINDOW} with stride {peers.STRIDE}; KL and top-1 against the float32 export "
              f"of {HF.name}. Bytes/token: weights read per decode step (matmuls incl. scales and zero points, "
              "lm_head, one embedding row, norms and biases; KV cache excluded). Ratios are to genai int4.")
    print(header + "\n\n" + table(rows, results))
    for row in rows:
        if row["kind"] == "ours":
            print(f"- {row['label']}: `qwen-edge export {row['options'] or '(defaults)'}`"
                  + (f" ({notes[row['label']]}: {row['model']})" if row["label"] in notes else ""))
    ok = [r for r in rows if results[r["label"]].get("ok")]
    if ok:
        plot(rows, results, args.plot, f"{HF.name}, {peers.machine().split(',')[0]}, {datetime.date.today()}")
        print(f"plot: {args.plot}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out_rows = []
    for row in rows:
        keep = {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items() if k not in ("python",)}
        keep["result"] = {k: v for k, v in results[row["label"]].items() if k != "greedy_ids"}
        keep["mean_kl"] = mean_kl(results[row["label"]]) if results[row["label"]].get("ok") else None
        out_rows.append(keep)
    args.out.write_text(json.dumps({"header": header, "rows": out_rows}, indent=1, default=str))
    print(f"results: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
