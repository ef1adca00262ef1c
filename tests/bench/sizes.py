"""Export and run cost by model size: the 0.5B sample and checkpoints shaped like Qwen2.5 1.5B / 3B / 7B
(tests/bench/shaped.py: released shapes, random bf16 weights). Not run in CI.

    .venv/bin/python tests/bench/sizes.py 1.5b 7b [--methods rtn,default] [--work models/sizes]
                                          [--src-root DIR] [--label NAME] [--skip-export] [--no-lock]

For each size (0.5b, 1.5b, 3b, 7b; the shaped checkpoints are written first if missing):

1. export: `qwen-edge export SRC OUT --bits 4 [--method rtn] --force` for each method (rtn, default = the
   calibrated recipe), under tests/bench/memory.py: wall time, peak anonymous and peak file-backed RSS of
   the export's process tree. The checkpoint's pages are dropped from the page cache first
   (posix_fadvise DONTNEED), so every export reads its checkpoint from disk (--warm-export: not).
2. run (the rtn folder, or the first method exported): a fresh process that loads the folder with
   toolkit.load(folder, threads=2) (load s, and of it the ORT session; RSS right after load, anon and file
   apart; the peaks while loading), then prefills a 64-token prompt (--prompt-tokens) and decodes greedily
   (--steps 64, end tokens ignored; toolkit/bench.py greedy_timed), best-of-runs medians. The weights file
   is read into the page cache first (a warm load, what a second launch sees; --cold-load: dropped).
3. bytes per decode token: every initializer the prefill graph streams through per token (the external
   initializers of every node except the rows a Gather / GatherBlockQuantized picks and the RoPE tables
   GroupQueryAttention indexes), plus the KV cache read at the mean context of the decode (float32 K and
   V of every layer). With the memory bandwidth measured in the same run (a fresh process summing a
   2 GiB float32 tensor with torch on 2 threads, best of 5; numpy's single-threaded sum alongside), the
   decode bound is bandwidth / bytes per token, and "of bound" is the measured decode / that bound.

Prints a markdown table and keeps the rows (keyed by label, size and method) in
tests/bench/results/sizes.json. --src-root runs the exporter and runtime of another tree (e.g. a `git
archive` of HEAD in /tmp) by putting it first on PYTHONPATH; the row records which.

Each measurement takes /tmp/qwen-edge-bench.lock (flock) for its own duration, so other benchmark runs
on the machine interleave between measurements but never overlap one; --no-lock when the caller already
holds it (never run this under `flock` of the same file without --no-lock: it would wait on itself).
"""
import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import memory  # noqa: E402
import shaped  # noqa: E402

SAMPLE_HF = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-hf"
SIZES = {"0.5b": SAMPLE_HF, "1.5b": ROOT / "models" / "shaped-1.5b", "3b": ROOT / "models" / "shaped-3b",
         "7b": ROOT / "models" / "shaped-7b"}
METHODS = {"rtn": ["--method", "rtn"], "default": []}
LOCK = "/tmp/qwen-edge-bench.lock"
RESULTS = BENCH / "results" / "sizes.json"
QWEN_EDGE = ROOT / ".venv" / "bin" / "qwen-edge"
GB = 1e9


# -- machine state -------------------------------------------------------------------------------

@contextlib.contextmanager
def bench_lock(enabled: bool, what: str):
    if not enabled:
        yield
        return
    with open(LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{what}] waiting for {LOCK} ...", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def files_under(path: Path) -> list[Path]:
    path = Path(path).resolve()
    if path.is_file():
        return [path]
    return [Path(r) / f for r, _, fs in os.walk(path) for f in fs]


def drop_cache(path: Path) -> None:
    """Ask the kernel to drop the (clean) page-cache pages of every file under path."""
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(path: Path) -> None:
    """Read every file under path once, so its pages are in the page cache."""
    buf = bytearray(16 << 20)
    for p in files_under(path):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def git_describe(root: Path) -> str:
    """Commit of `root` and whether its tree differs from it (read-only git commands); a tree made by
    `git archive` may name its commit in a file .source-commit."""
    if (root / ".source-commit").exists():
        return (root / ".source-commit").read_text().strip()
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git work tree)"


def env_for(src_root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src_root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -- measured in fresh processes (memory.measure_call runs these by file path) --------------------

def bandwidth(gib: float = 2.0, threads: int = 2, repeats: int = 8) -> dict:
    """Read bandwidth in GB/s: a float32 array of `gib` GiB summed, best (and median) of `repeats`."""
    import numpy as np

    n = int(gib * 2**30) // 4
    out = {"gib": gib, "threads": threads}
    try:
        import torch

        x = torch.ones(n, dtype=torch.float32)
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            x.sum()
            times = [_timed(lambda: x.sum().item()) for _ in range(repeats)]
            out[f"torch_sum_{t}t_gb_s"] = n * 4 / min(times) / GB
            out[f"torch_sum_{t}t_median_gb_s"] = n * 4 / statistics.median(times) / GB
        out["torch_sum_gb_s"] = out[f"torch_sum_{threads}t_gb_s"]
        x = None
    except ImportError:
        out["torch_sum_gb_s"] = None
    a = np.ones(n, dtype=np.float32)
    a.sum()
    best = min(_timed(a.sum) for _ in range(repeats))
    out["numpy_sum_gb_s"] = n * 4 / best / GB  # one thread, and a pairwise sum: understates the bus
    out["gb_s"] = out["torch_sum_gb_s"] or out["numpy_sum_gb_s"]
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_child(folder: str, threads: int = 2, prompt_tokens: int = 64, steps: int = 64, runs: int = 3) -> dict:
    """Load `folder`, then prefill + greedy decode; times and this process's own RSS at each point."""
    memory.phase("import")
    t = time.perf_counter()
    import toolkit
    from toolkit.bench import greedy_timed, prompt_ids
    import_s = time.perf_counter() - t

    memory.phase("load")
    t = time.perf_counter()
    model = toolkit.load(folder, threads=threads, max_length=prompt_tokens + steps + 8, preload=False)
    t_session = time.perf_counter()
    model.session("prefill")
    loaded = time.perf_counter()
    after_load = memory.status("self")
    memory.phase("run")
    ids = prompt_ids(model.tokenizer, prompt_tokens)
    greedy_timed(model, ids[:8], 1)  # warm-up: the first calls allocate ORT's arenas
    prefill, decode = [], []
    for _ in range(runs):
        first, rest, _ = greedy_timed(model, ids, steps)
        prefill.append(prompt_tokens / first)
        decode.append(steps / rest)
    after_run = memory.status("self")
    return {"toolkit": toolkit.__file__, "import_s": import_s, "load_s": loaded - t,
            "load_session_s": loaded - t_session, "load_rest_s": t_session - t,
            "after_load": after_load, "after_run": after_run, "prompt_tokens": prompt_tokens, "steps": steps,
            "runs": runs, "threads": threads, "prefill_tok_s": prefill, "decode_tok_s": decode}


# -- bytes per decode token ----------------------------------------------------------------------

def streamed_bytes(folder: Path) -> dict:
    """Bytes of the external initializers one token streams through (see the module docstring)."""
    import onnx

    man = json.loads((folder / "qwen-edge.json").read_text())
    g = onnx.load(str(folder / man["graphs"]["prefill"]["file"]), load_external_data=False).graph
    ext = {}
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            ext[t.name] = int({e.key: e.value for e in t.external_data}["length"])
    partial, full = set(), set()
    for n in g.node:
        for i, name in enumerate(n.input):
            if name not in ext:
                continue
            gathered = (n.op_type == "GatherBlockQuantized" or (n.op_type == "Gather" and i == 0)
                        or (n.op_type == "GroupQueryAttention" and i in (7, 8)))
            (partial if gathered else full).add(name)
    kv = man["kv_cache"]
    per_pos = 2 * kv["num_layers"] * kv["num_key_value_heads"] * kv["head_dim"] * (2 if kv["dtype"] == "float16" else 4)
    q = man["quantization"]
    return {"streamed_bytes": sum(ext[n] for n in full), "gathered_bytes": sum(ext[n] for n in partial - full),
            "external_bytes": sum(ext.values()), "kv_bytes_per_position": per_pos,
            "weights_bytes": q.get("weights_bytes") or man["files"][man["weights_file"]]["bytes"],
            "weights_file_bytes": man["files"][man["weights_file"]]["bytes"],
            "folder_bytes": sum(f["bytes"] for f in man["files"].values())}


# -- one size ------------------------------------------------------------------------------------

def ensure_checkpoint(size: str, lock: bool) -> Path:
    src = SIZES[size]
    if size != "0.5b" and not shaped.is_complete(src, size):
        with bench_lock(lock, f"write {size}"):
            shaped.write(size, src)
    if not (src / "config.json").exists():
        raise SystemExit(f"{src}: missing (0.5b: run models/get_sample.py)")
    return src


def measure_export(size: str, method: str, src: Path, out: Path, args) -> dict:
    cmd = [QWEN_EDGE, "export", src, out, "--bits", "4", *METHODS[method], "--force"]
    log = args.work / f"export-{size}-{method}.log"
    with bench_lock(not args.no_lock, f"export {size} {method}"):
        if not args.warm_export:
            drop_cache(src)
        avail = mem_available()
        with open(log, "w") as f:
            rep = memory.measure(cmd, env=env_for(args.src_root), cwd=args.src_root, stdout=f, stderr=subprocess.STDOUT,
                                 timeout=args.export_timeout, max_anon_bytes=int(args.max_anon_gb * 1e9))
    rep["mem_available_before_bytes"] = avail
    rep["log"] = str(log)
    if rep["rc"] != 0:
        rep["error"] = (f"killed: {rep['killed']} | " if rep.get("killed") else "") + " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-500:]
    return rep


def measure_run(folder: Path, args) -> dict:
    man = json.loads((folder / "qwen-edge.json").read_text())
    weights = folder / man["weights_file"]
    with bench_lock(not args.no_lock, f"run {folder.name}"):
        bw = memory.measure_call(f"{__file__}:bandwidth", {"gib": 2.0, "threads": args.threads})["result"]
        if args.cold_load:
            drop_cache(folder)
        else:
            read_through(folder)
        rep = memory.measure_call(f"{__file__}:run_child",
                                  {"folder": str(folder), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                   "steps": args.steps, "runs": args.runs},
                                  env=env_for(args.src_root), cwd=args.src_root)
    rep["weights_path"] = str(weights)
    rep["bandwidth"] = bw  # measured just before, under the same lock
    return rep


def measure_bandwidth(args) -> dict:
    with bench_lock(not args.no_lock, "bandwidth"):
        rep = memory.measure_call(f"{__file__}:bandwidth", {"gib": 2.0, "threads": args.threads})
    if rep.get("result") is None:
        raise SystemExit(f"bandwidth measurement failed: {rep.get('error')}")
    return rep["result"]


def summarize(size: str, method: str, exp: dict | None, run: dict | None, folder: Path, bw: dict, args) -> dict:
    row = {"label": args.label, "size": size, "method": method, "src": str(SIZES[size]), "folder": str(folder),
           "src_root": str(args.src_root), "src_commit": git_describe(args.src_root),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
           "cores": os.cpu_count(), "threads": args.threads, "bandwidth": bw}
    if exp is not None:
        row["export"] = {k: exp.get(k) for k in ("rc", "wall_s", "peak_anon_bytes", "peak_file_bytes", "peak_rss_bytes",
                                                 "vm_hwm_bytes", "ru_maxrss_bytes", "mem_available_before_bytes",
                                                 "log", "error") if k in exp}
        row["export"]["cache"] = "warm" if args.warm_export else "cold (checkpoint dropped from page cache)"
    if (folder / "qwen-edge.json").exists():
        row.update(streamed_bytes(folder))
        ckpt = SIZES[size]
        row["checkpoint_bytes"] = sum(p.stat().st_size for p in files_under(ckpt) if p.suffix == ".safetensors")
    if run is not None:
        r = run.get("result") or {}
        phases = {p["phase"]: p for p in run.get("phases", [])}
        load = phases.get("load", {})
        row["run"] = {"error": run.get("error"), "rc": run["rc"], "wall_s": run["wall_s"],
                      "peak_anon_bytes": run["peak_anon_bytes"], "peak_file_bytes": run["peak_file_bytes"],
                      "peak_rss_bytes": run["peak_rss_bytes"], "vm_hwm_bytes": run["vm_hwm_bytes"],
                      "load_peak_anon_bytes": load.get("peak_anon_bytes"),
                      "load_peak_file_bytes": load.get("peak_file_bytes"),
                      "load_peak_rss_bytes": load.get("peak_rss_bytes"),
                      "cache": "cold" if args.cold_load else "warm (weights file read into the page cache first)"}
        if r:
            row["run"].update({k: r[k] for k in ("toolkit", "import_s", "load_s", "load_session_s", "load_rest_s",
                                                 "after_load", "after_run", "prompt_tokens", "steps", "runs")})
            row["run"]["prefill_tok_s"] = statistics.median(r["prefill_tok_s"])
            row["run"]["decode_tok_s"] = statistics.median(r["decode_tok_s"])
            row["run"]["decode_tok_s_all"] = r["decode_tok_s"]
            if "streamed_bytes" in row:
                ctx = r["prompt_tokens"] + r["steps"] / 2
                per_token = row["streamed_bytes"] + ctx * row["kv_bytes_per_position"]
                row["run"]["bandwidth"] = bw_run = run.get("bandwidth") or bw
                bound = bw_run["gb_s"] * GB / per_token
                row["run"].update({"mean_context": ctx, "bytes_per_token": per_token, "bound_tok_s": bound,
                                   "of_bound": row["run"]["decode_tok_s"] / bound,
                                   "effective_gb_s": row["run"]["decode_tok_s"] * per_token / GB})
    return row


# -- results -------------------------------------------------------------------------------------

def load_rows() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def save_rows(rows: list[dict], new: list[dict]) -> list[dict]:
    """Merge `new` into the results file (re-read under a lock: several runs may share it)."""
    key = lambda r: (r.get("label"), r["size"], r["method"])  # noqa: E731
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open("/tmp/qwen-edge-sizes-results.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {key(r): r for r in load_rows()}
        for r in new:
            old = merged.get(key(r), {})
            if "export" not in r and "export" in old:  # --skip-export keeps the last export's numbers
                r["export"] = old["export"]
            if "run" not in r and "run" in old:
                r["run"] = old["run"]
            merged[key(r)] = r
        out = list(merged.values())
        tmp = RESULTS.with_suffix(".json.partial")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, RESULTS)
    return out


def mb(x) -> str:
    return "–" if x is None else f"{x / 1e6:,.0f}"


def table(rows: list[dict]) -> str:
    head = ("| label | size | method | ckpt GB | export s | export peak anon MB | export peak file MB | weights MB | "
            "load s (session) | anon after load MB | file after load MB | load peak RSS MB (× weights) | "
            "prefill tok/s | decode tok/s | MB / token | bound tok/s | of bound |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        e, run = r.get("export") or {}, r.get("run") or {}
        al = run.get("after_load") or {}
        w = r.get("weights_bytes")
        export_s = ("failed" if e.get("rc") not in (0, None) else f"{e['wall_s']:.0f}") if e else "–"
        load = f"{run['load_s']:.2f} ({run['load_session_s']:.2f})" if "load_s" in run else (
            "failed" if run else "–")
        peak = (f"{mb(run.get('load_peak_rss_bytes'))} ({run['load_peak_rss_bytes'] / w:.2f}×)"
                if run.get("load_peak_rss_bytes") and w else "–")
        lines.append(
            f"| {r.get('label') or ''} | {r['size']} | {r['method']} | {r.get('checkpoint_bytes', 0) / GB:.2f} | "
            f"{export_s} | {mb(e.get('peak_anon_bytes'))} | {mb(e.get('peak_file_bytes'))} | {mb(w)} | {load} | "
            f"{mb(al.get('anon'))} | {mb(al.get('file'))} | {peak} | "
            f"{run['prefill_tok_s']:.0f} | {run['decode_tok_s']:.1f} | {mb(run.get('bytes_per_token'))} | "
            f"{run.get('bound_tok_s', 0):.1f} | {run.get('of_bound', 0):.0%} |"
            if "decode_tok_s" in run else
            f"| {r.get('label') or ''} | {r['size']} | {r['method']} | {r.get('checkpoint_bytes', 0) / GB:.2f} | "
            f"{export_s} | {mb(e.get('peak_anon_bytes'))} | {mb(e.get('peak_file_bytes'))} | {mb(w)} | {load} | "
            f"– | – | – | – | – | – | – | – |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="*", default=list(SIZES), help=f"any of {', '.join(SIZES)} (default: all)")
    ap.add_argument("--methods", default="rtn,default", help="comma-separated: rtn, default (calibrated)")
    ap.add_argument("--run-method", default="rtn", help="which export's folder is loaded and run")
    ap.add_argument("--work", type=Path, default=ROOT / "models" / "sizes", help="exported folders and logs")
    ap.add_argument("--src-root", type=Path, default=ROOT, help="tree whose exporter/runtime is measured")
    ap.add_argument("--label", default="", help="names this run's rows (e.g. baseline-HEAD)")
    ap.add_argument("--skip-export", action="store_true", help="measure existing folders only")
    ap.add_argument("--skip-run", action="store_true", help="exports only")
    ap.add_argument("--warm-export", action="store_true", help="do not drop the checkpoint from the page cache")
    ap.add_argument("--cold-load", action="store_true", help="drop the weights from the page cache before loading")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--export-timeout", type=float, default=None, help="kill an export after this many seconds")
    ap.add_argument("--max-anon-gb", type=float, default=14.0,
                    help="kill an export whose anonymous RSS passes this many GB (default 14: a shared 24 GB machine)")
    ap.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} per measurement")
    ap.add_argument("--table", action="store_true", help="print the table of the saved results and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(load_rows()))
        return 0
    sizes = [s.lower() for s in args.sizes]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"size {s!r}: expected one of {', '.join(SIZES)}")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"method {m!r}: expected rtn or default")
    args.work = args.work.resolve()  # the children run in --src-root
    args.work.mkdir(parents=True, exist_ok=True)
    args.src_root = args.src_root.resolve()

    bw = measure_bandwidth(args)
    print(f"bandwidth: torch sum {bw['torch_sum_gb_s']:.1f} GB/s ({args.threads} threads), numpy sum "
          f"{bw['numpy_sum_gb_s']:.1f} GB/s (1 thread)", file=sys.stderr)
    rows = load_rows()
    for size in sizes:
        src = ensure_checkpoint(size, not args.no_lock)
        for method in methods:
            folder = args.work / f"{size}-int4-{method}"
            exp = None
            if not args.skip_export:
                print(f"[{size} {method}] export {src} -> {folder}", file=sys.stderr, flush=True)
                exp = measure_export(size, method, src, folder, args)
                print(f"[{size} {method}] rc {exp['rc']}, {exp['wall_s']:.0f} s, peak anon "
                      f"{mb(exp['peak_anon_bytes'])} MB, peak file {mb(exp['peak_file_bytes'])} MB",
                      file=sys.stderr, flush=True)
            run = None
            if method == args.run_method and not args.skip_run and (folder / "qwen-edge.json").exists():
                print(f"[{size} {method}] load + decode {folder}", file=sys.stderr, flush=True)
                run = measure_run(folder, args)
            row = summarize(size, method, exp, run, folder, bw, args)
            rows = save_rows(rows, [row])
            print(json.dumps({k: row.get(k) for k in ("size", "method", "export", "run")}, default=str),
                  file=sys.stderr, flush=True)
    bw_end = measure_bandwidth(args)
    print(f"bandwidth at the end: torch sum {bw_end['torch_sum_gb_s']:.1f} GB/s", file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
