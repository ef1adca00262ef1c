"""Soak test of `qwen-edge serve` (not run in CI; loopback only; bounded in time and requests).

    .venv/bin/python tests/bench/soak.py [MODEL] [--seconds 300] [--clients 32] [--max-queue 16]

Starts the server on a free loopback port (MODEL defaults to models/sample-int4, else a tiny export is made),
then `--clients` threads send requests back to back for `--seconds`: about a third stream, a tenth hang up
mid-answer (a stream closed after its first piece, or a plain request given up after a short read timeout),
some send malformed (400) or oversized (413) bodies; the rest are plain. Prompts are short ("Repeat exactly:
MARK"), greedy, 16-48 new tokens. A 503 (queue full) makes the client wait half a second.

Checks: no answer carries another request's marker, response ids are unique and every stream's chunks share
one id, no 5xx, /health answers at the end, and the server's RSS (VmRSS) at the end is within 5 % of its RSS
after a warm-up request. Writes tests/bench/results/soak.json and prints a markdown table; exits 1 if a check
fails.
"""
import argparse
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).parent / "qwen-edge")
MARK = re.compile(r"QE-\d{3}-\d{5}")
RESULTS = Path(__file__).parent / "results" / "soak.json"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def model_folder(given: str | None) -> Path:
    if given:
        return Path(given)
    sample = ROOT / "models" / "sample-int4"
    if (sample / "qwen-edge.json").exists():
        return sample
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_checkpoint
    from export import QuantSpec, export

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    print(f"{sample} is missing: exporting a tiny random model to {work}", file=sys.stderr)
    return export(make_checkpoint(work / "ckpt", tied=True, dtype="float32", sharded=False), work / "tiny",
                  QuantSpec(4, 32, True), log=lambda m: None)


def start_server(folder: Path, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([EXE, "serve", str(folder), "--port", str(port), "--threads", str(args.threads),
                             "--max-length", "2048", "--max-queue", str(args.max_queue)], stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            sys.exit(f"the server did not start: {proc.stderr.read()}")
        time.sleep(0.2)


def body(mark: str, max_tokens: int, stream: bool) -> dict:
    return {"model": "soak", "messages": [{"role": "user", "content": f"Repeat exactly: {mark}"}],
            "temperature": 0, "max_tokens": max_tokens, "stream": stream}


MALFORMED = [b"{not json", b"[1, 2]", b'{"messages": []}', b'{"messages": [{"role": "user", "content": "x"}], '
             b'"temperature": 9}', b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}',
             b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}',
             b'{"messages": [{"role": "user", "content": "\xff"}]}', b"[" * 50000]


def one_request(http: httpx.Client, kind: str, mark: str, max_tokens: int) -> dict:
    """Send one request of `kind`; returns what happened (status, times, text, ids)."""
    out = {"kind": kind, "mark": mark, "status": None, "ttft": None, "ids": [], "text": ""}
    t0 = time.perf_counter()
    try:
        if kind in ("malformed", "oversized"):
            content = (random.choice(MALFORMED) if kind == "malformed"
                       else json.dumps(body("x" * (3 << 19), max_tokens, False)).encode())  # 1.5 MiB
            r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            out["status"] = r.status_code
        elif kind == "stream" or kind == "hang-up-stream":
            with http.stream("POST", "/v1/chat/completions", json=body(mark, max_tokens, True)) as r:
                out["status"] = r.status_code
                if r.status_code == 200:
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            out["status"] = 500
                            break
                        out["ids"].append(chunk["id"])
                        piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                        if piece:
                            out["ttft"] = out["ttft"] or time.perf_counter() - t0
                            out["text"] += piece
                            if kind == "hang-up-stream":
                                out["status"] = "hung up"
                                break  # leaving the block closes the connection
        elif kind == "hang-up-plain":
            try:
                http.post("/v1/chat/completions", json=body(mark, max_tokens, False),
                          timeout=httpx.Timeout(30, read=random.uniform(0.2, 2.0)))
                out["status"] = 200  # answered before the client gave up
            except httpx.ReadTimeout:
                out["status"] = "hung up"
        else:
            r = http.post("/v1/chat/completions", json=body(mark, max_tokens, False))
            out["status"] = r.status_code
            if r.status_code == 200:
                answer = r.json()
                out["ids"], out["text"] = [answer["id"]], answer["choices"][0]["message"]["content"]
    except httpx.TransportError as e:  # e.g. a 413 sent while the client was still writing its body
        out["status"] = f"transport error: {e.__class__.__name__}"
    out["seconds"] = time.perf_counter() - t0
    return out


def client(n: int, base: str, deadline: float, rows: list, lock: threading.Lock, seed: int) -> None:
    rng = random.Random(seed * 1000 + n)
    with httpx.Client(base_url=base, timeout=httpx.Timeout(300, connect=10)) as http:
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            u = rng.random()
            kind = ("oversized" if u < 0.02 else "malformed" if u < 0.07 else "hang-up-stream" if u < 0.12
                    else "hang-up-plain" if u < 0.17 else "stream" if u < 0.50 else "plain")
            row = one_request(http, kind, f"QE-{n:03d}-{seq:05d}", rng.randint(16, 48))
            with lock:
                rows.append(row)
            if row["status"] == 503:
                time.sleep(0.5)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="model folder (default: models/sample-int4, else a tiny export)")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue (below --clients: 503s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    folder = model_folder(args.model)
    proc, base = start_server(folder, args)
    try:
        with httpx.Client(base_url=base, timeout=300) as http:  # warm-up: the first call's allocations
            http.post("/v1/chat/completions", json=body("QE-000-00000", 48, False)).raise_for_status()
        rss_start = rss_kb(proc.pid)
        rss_samples = [rss_start]
        rows, lock = [], threading.Lock()
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [threading.Thread(target=client, args=(n, base, deadline, rows, lock, args.seed), daemon=True)
                   for n in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 600:
            time.sleep(1)
            rss_samples.append(rss_kb(proc.pid))
        wall = time.monotonic() - started
        health = httpx.get(f"{base}/health", timeout=10).json()
        rss_end = rss_kb(proc.pid)
        with httpx.Client(base_url=base, timeout=300) as http:  # still answering
            alive = http.post("/v1/chat/completions", json=body("QE-999-99999", 16, False)).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    answered = [r for r in rows if r["status"] == 200 and r["kind"] in ("plain", "stream")]
    issued = {r["mark"] for r in rows}
    mixed = [r for r in rows if r["text"] and set(MARK.findall(r["text"])) & (issued - {r["mark"]})]
    all_ids = [r["ids"][0] for r in rows if r["ids"]]
    ttft = [r["ttft"] for r in rows if r["kind"] == "stream" and r["status"] == 200 and r["ttft"]]
    latency = [r["seconds"] for r in answered]
    count = lambda pred: sum(1 for r in rows if pred(r))  # noqa: E731
    report = {
        "model": str(folder), "seconds": args.seconds, "clients": args.clients, "max_queue": args.max_queue,
        "wall_seconds": round(wall, 1), "requests": len(rows),
        "answered": len(answered),
        "answered_streams": sum(1 for r in answered if r["kind"] == "stream"),
        "echoed_own_marker": sum(1 for r in answered if r["mark"] in r["text"]),
        "queue_full_503": count(lambda r: r["status"] == 503),
        "client_hang_ups": count(lambda r: r["status"] == "hung up"),
        "server_cancelled": health.get("cancelled"),
        "malformed_4xx": count(lambda r: r["kind"] == "malformed" and r["status"] == 400),
        "oversized_413": count(lambda r: r["kind"] == "oversized" and r["status"] == 413),
        "oversized_reset": count(lambda r: r["kind"] == "oversized" and str(r["status"]).startswith("transport")),
        "5xx": count(lambda r: isinstance(r["status"], int) and r["status"] >= 500 and r["status"] != 503),
        "other": count(lambda r: r["status"] not in (200, 400, 413, 503, "hung up")
                       and not str(r["status"]).startswith("transport")),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
        "rss_start_mb": round(rss_start / 1024, 1), "rss_end_mb": round(rss_end / 1024, 1),
        "rss_max_mb": round(max(rss_samples) / 1024, 1),
        "rss_growth_pct": round(100 * (rss_end / rss_start - 1), 2),
        "mixed_answers": len(mixed),
        "ids_unique": len(all_ids) == len(set(all_ids)),
        "streams_one_id": all(len(set(r["ids"])) <= 1 for r in rows),
        "alive_after": alive, "health_after": health,
    }
    checks = {"no mixed answers": not mixed, "ids unique": report["ids_unique"],
              "one id per stream": report["streams_one_id"], "no 5xx": report["5xx"] == 0,
              "answers after": alive, "RSS growth <= 5 %": report["rss_growth_pct"] <= 5}
    report["checks"] = checks
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"soak: {args.clients} clients for {args.seconds:g} s on {folder} (--max-queue {args.max_queue})\n")
    print("| measure | value |\n|---|---|")
    for key, value in report.items():
        if key not in ("health_after", "checks", "model"):
            print(f"| {key} | {f'{value:.3f}' if isinstance(value, float) else value} |")
    print(f"| /health after | {json.dumps(health)} |")
    for name, ok in checks.items():
        print(f"| check: {name} | {'ok' if ok else 'FAILED'} |")
    if mixed:
        print("mixed:", [(r["mark"], r["text"][:80]) for r in mixed[:5]])
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
