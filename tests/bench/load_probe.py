"""Where the load time and load memory of an exported folder go: the same folder loaded with one
onnxruntime setting changed at a time, each in a fresh process (not run in CI).

    .venv/bin/python tests/bench/load_probe.py models/sizes/1.5b-int4-rtn [--variants all] [--src-root DIR]

Variants (toolkit.load with its session options patched; the rest of the runtime unchanged):

  baseline                 what toolkit.load does today
  disable_prepacking       session.disable_prepacking=1: MatMulNBits keeps the file's blocks, no repacking
  prepack_parallel         session.prepack.enable_parallel=1: PrePack() calls spread over the intra-op pool
  env_allocators           an arena allocator registered in the ORT environment, session.use_env_allocators=1
  device_alloc_init        session.use_device_allocator_for_initializers=1 (plain malloc, no arena, for initializers)
  no_arena                 enable_cpu_mem_arena = False
  opt_basic / opt_none     graph_optimization_level ENABLE_BASIC / DISABLE_ALL (what ENABLE_ALL's passes cost)
  saved_prepacked          prefill.onnx optimized once by ORT and saved with its prepacked weights in external
                           data (session.save_external_prepacked_constant_initializers=1), then loaded from that
                           copy with optimization off: the prepacked blobs are memory-mapped, not rebuilt
  ort_format               the same saved as an ORT-format model (session.save_model_format=ORT) and loaded with
                           session.load_model_format=ORT, use_ort_model_bytes_directly and
                           use_ort_model_bytes_for_initializers (flatbuffers cap a file at 2 GB)
  prepack_cache            toolkit.load(prepack_cache=DIR) as users run it (toolkit/prepack_cache.py): the
                           preparation is a first load that makes the cache entry, the probe a later load
  mmap_touch               no ORT: mmap the weights file and touch every page (the floor for mapping it)

Each row: load s (the session part apart), anon / file RSS right after load, the peaks while loading,
the first prefill call's time, and decode tok/s (64-token prompt, 32 greedy steps, best of 2), so a
setting that moves cost from load to the first call, or slows decoding, shows. The weights file is read
into the page cache before each variant (warm load). Results: tests/bench/results/load_probe.json.
Each measurement takes /tmp/qwen-edge-bench.lock (see sizes.py; --no-lock if the caller holds it).
"""
import argparse
import json
import mmap
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path.insert(0, str(BENCH))

import memory  # noqa: E402
from sizes import bench_lock, env_for, git_describe, read_through  # noqa: E402

RESULTS = BENCH / "results" / "load_probe.json"
CONFIG = {  # variant -> session config entries
    "baseline": {},
    "disable_prepacking": {"session.disable_prepacking": "1"},
    "prepack_parallel": {"session.prepack.enable_parallel": "1"},
    "env_allocators": {"session.use_env_allocators": "1"},
    "device_alloc_init": {"session.use_device_allocator_for_initializers": "1"},
    "no_arena": {},
    "opt_basic": {},
    "opt_none": {},
    "saved_prepacked": {},
    "ort_format": {"session.load_model_format": "ORT", "session.use_ort_model_bytes_directly": "1",
                   "session.use_ort_model_bytes_for_initializers": "1"},
    "prepack_cache": {},
    "mmap_touch": {},
}
PREPARED = {"saved_prepacked": "prefill.prepacked.onnx", "ort_format": "prefill.ort", "prepack_cache": "prepack_cache"}


def prepare_child(folder: str, kind: str, out_dir: str, threads: int = 2) -> dict:
    """Save prefill.onnx optimized by ORT (the kinds above) into out_dir; returns the files written."""
    import onnxruntime as ort

    if kind == "prepack_cache":  # the first load of a user's, making the entry
        import toolkit

        root = Path(out_dir) / PREPARED[kind]
        t = time.perf_counter()
        toolkit.load(folder, threads=threads, prepack_cache=root)
        return {"seconds": time.perf_counter() - t,
                "files": {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}}
    man = json.loads((Path(folder) / "qwen-edge.json").read_text())
    level = man["quantization"].get("accuracy_level")
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads = threads
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    out = Path(out_dir) / PREPARED[kind]
    o.optimized_model_filepath = str(out)
    if kind == "saved_prepacked":
        o.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
        o.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        o.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    else:
        o.add_session_config_entry("session.save_model_format", "ORT")
    if man.get("ops") == "portable" and level is not None:
        o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    t = time.perf_counter()
    ort.InferenceSession(str(Path(folder) / man["graphs"]["prefill"]["file"]), o,
                         providers=["CPUExecutionProvider"])
    return {"seconds": time.perf_counter() - t,
            "files": {p.name: p.stat().st_size for p in Path(out_dir).iterdir() if p.name.startswith(out.name)}}


def probe_child(folder: str, variant: str, threads: int = 2, prompt_tokens: int = 64, steps: int = 32,
                runs: int = 2, prepared: str | None = None, load_only: bool = False) -> dict:
    """Load `folder` with `variant`'s settings, then time the first call and a short greedy decode."""
    memory.phase("import")
    import numpy as np

    if variant == "mmap_touch":
        man = json.loads((Path(folder) / "qwen-edge.json").read_text())
        path = Path(folder) / man["weights_file"]
        memory.phase("load")
        t = time.perf_counter()
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            a = np.frombuffer(m, dtype=np.uint8)
            touched = int(a[::4096].sum())  # one byte of every page
            elapsed = time.perf_counter() - t
            after = memory.status("self")
            del a
            m.close()
        return {"variant": variant, "load_s": elapsed, "load_session_s": elapsed, "after_load": after,
                "touched": touched}

    import onnxruntime as ort
    import toolkit
    import toolkit.model as tm
    from toolkit.bench import greedy_timed, prompt_ids

    if variant == "env_allocators":
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    base_options = tm.session_options

    def patched(threads_, spin=True):
        o = base_options(threads_, spin=spin)
        for k, v in CONFIG[variant].items():
            o.add_session_config_entry(k, v)
        if variant == "no_arena":
            o.enable_cpu_mem_arena = False
        elif variant == "opt_basic":
            o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        elif variant in ("opt_none", "saved_prepacked", "ort_format"):
            o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return o

    tm.session_options = patched
    load_options = {}
    if variant == "prepack_cache":
        load_options["prepack_cache"] = prepared
    elif prepared:
        def _open(self, name, _path=prepared):
            return ort.InferenceSession(_path, self._options, providers=self._providers)
        tm.Model._open = _open

    memory.phase("load")
    t = time.perf_counter()
    model = toolkit.load(folder, threads=threads, max_length=prompt_tokens + steps + 8, preload=False, **load_options)
    t_session = time.perf_counter()
    model.session("prefill")
    loaded = time.perf_counter()
    after_load = memory.status("self")
    if load_only:
        return {"variant": variant, "load_s": loaded - t, "load_session_s": loaded - t_session,
                "after_load": after_load, "config": CONFIG[variant]}
    memory.phase("first_call")
    ids = prompt_ids(model.tokenizer, prompt_tokens)
    first, _, _ = greedy_timed(model, ids, 1)
    after_first = memory.status("self")
    memory.phase("run")
    decode, tokens = [], None
    for _ in range(runs):
        _, rest, tokens = greedy_timed(model, ids, steps)
        decode.append(steps / rest)
    return {"variant": variant, "load_s": loaded - t, "load_session_s": loaded - t_session,
            "after_load": after_load, "after_first_call": after_first, "first_call_s": first,
            "decode_tok_s": max(decode), "decode_tok_s_all": decode, "tokens": tokens[:8],
            "config": CONFIG[variant]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--variants", default="all", help=f"comma-separated of {', '.join(CONFIG)}")
    ap.add_argument("--src-root", type=Path, default=ROOT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="measure each variant this many times (min load kept)")
    ap.add_argument("--load-only", action="store_true", help="no first call or decode (e.g. disable_prepacking on 7B)")
    ap.add_argument("--no-lock", action="store_true")
    args = ap.parse_args(argv)
    folder = args.folder.resolve()
    variants = list(CONFIG) if args.variants == "all" else args.variants.split(",")
    for v in variants:
        if v not in CONFIG:
            ap.error(f"variant {v!r}: expected one of {', '.join(CONFIG)}")
    man = json.loads((folder / "qwen-edge.json").read_text())
    weights = man["quantization"].get("weights_bytes") or man["files"][man["weights_file"]]["bytes"]
    prep_dir = folder.parent / f".{folder.name}.probe"
    prep_dir.mkdir(exist_ok=True)
    env = env_for(args.src_root.resolve())
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for v in variants:
        prepared, prep = None, None
        if v in PREPARED:
            target = prep_dir / PREPARED[v]
            if not target.exists():
                with bench_lock(not args.no_lock, f"prepare {v}"):
                    prep = memory.measure_call(f"{__file__}:prepare_child",
                                               {"folder": str(folder), "kind": v, "out_dir": str(prep_dir),
                                                "threads": args.threads}, env=env, cwd=str(args.src_root))
                if prep.get("result") is None:
                    print(f"{v}: could not prepare ({prep.get('error')})", file=sys.stderr)
                    rows.append({"folder": str(folder), "variant": v, "error": prep.get("error")})
                    continue
            prepared = str(target)
        best = None
        for _ in range(args.repeat):
            with bench_lock(not args.no_lock, f"probe {v}"):
                read_through(folder)
                if prepared:
                    read_through(Path(prepared) if Path(prepared).is_dir() else Path(prepared).parent)
                rep = memory.measure_call(f"{__file__}:probe_child",
                                          {"folder": str(folder), "variant": v, "threads": args.threads,
                                           "prepared": prepared, "load_only": args.load_only},
                                          env=env, cwd=str(args.src_root))
            if best is None or (rep.get("result") or {}).get("load_s", 1e9) < (best.get("result") or {}).get("load_s", 1e9):
                best = rep
        rep = best
        r = rep.get("result") or {}
        load = {p["phase"]: p for p in rep.get("phases", [])}.get("load", {})
        row = {"folder": str(folder), "src_commit": git_describe(args.src_root.resolve()), "variant": v,
               "weights_bytes": weights, "error": rep.get("error"), "prepare": prep and {
                   "wall_s": prep["wall_s"], "peak_anon_bytes": prep["peak_anon_bytes"], **(prep["result"] or {})},
               "load_peak_anon_bytes": load.get("peak_anon_bytes"), "load_peak_file_bytes": load.get("peak_file_bytes"),
               "load_peak_rss_bytes": load.get("peak_rss_bytes"), "peak_anon_bytes": rep["peak_anon_bytes"],
               "peak_rss_bytes": rep["peak_rss_bytes"], **r}
        rows = [x for x in rows if not (x["folder"] == row["folder"] and x["variant"] == v)] + [row]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        al = r.get("after_load", {})
        print(f"{v:20s} load {r.get('load_s', float('nan')):6.2f} s (session {r.get('load_session_s', float('nan')):.2f})"
              f"  anon {al.get('anon', 0) / 1e6:7,.0f} MB  file {al.get('file', 0) / 1e6:7,.0f} MB"
              f"  load peak rss {row['load_peak_rss_bytes'] or 0:,.0f} B ({(row['load_peak_rss_bytes'] or 0) / weights:.2f}x)"
              f"  first call {r.get('first_call_s', float('nan')):.2f} s  decode {r.get('decode_tok_s', float('nan')):.1f} tok/s"
              + (f"  ERROR {rep.get('error')}" if rep.get("error") else ""), file=sys.stderr, flush=True)
    print(table([x for x in rows if x["folder"] == str(folder)]))
    return 0


def table(rows: list[dict]) -> str:
    out = ["| variant | load s | session s | anon after load MB | file after load MB | load peak anon MB | "
           "load peak RSS MB (× weights) | first prefill s | decode tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error") and "load_s" not in r:
            out.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        al = r.get("after_load", {})
        w = r["weights_bytes"]
        out.append(f"| {r['variant']} | {r['load_s']:.2f} | {r['load_session_s']:.2f} | {al.get('anon', 0) / 1e6:,.0f} | "
                   f"{al.get('file', 0) / 1e6:,.0f} | {(r.get('load_peak_anon_bytes') or 0) / 1e6:,.0f} | "
                   f"{(r.get('load_peak_rss_bytes') or 0) / 1e6:,.0f} ({(r.get('load_peak_rss_bytes') or 0) / w:.2f}×) | "
                   + (f"{r['first_call_s']:.2f} | {r['decode_tok_s']:.1f} |" if "first_call_s" in r else "– | – |"))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
