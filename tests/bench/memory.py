"""Wall time and peak memory of a command or of a Python function in a fresh process (Linux; not run in CI).

    .venv/bin/python tests/bench/memory.py [--interval 0.02] [--out FILE] -- .venv/bin/qwen-edge export SRC OUT ...

prints one JSON line:

    {"cmd": [...], "rc": 0, "wall_s": 41.2, "peak_anon_bytes": ..., "peak_file_bytes": ..., "peak_rss_bytes": ...,
     "vm_hwm_bytes": ..., "ru_maxrss_bytes": ..., "samples": 2051, "processes": 1, "phases": [...]}

Every `interval` seconds (default 20 ms) the sampler walks the process tree under the command
(/proc/PID/task/*/children) and sums, over its processes, the RssAnon, RssFile and RssShmem lines of
/proc/PID/status; the peaks of those sums are reported separately:

- peak_anon_bytes: anonymous resident memory (heap, numpy arrays, ORT's arenas and prepacked weights).
  This is what a laptop must have free: it cannot be dropped, only swapped.
- peak_file_bytes: file-backed resident pages mapped by the processes (an mmapped checkpoint or weights
  file, shared libraries). The kernel can drop them under pressure and read them again.
- peak_rss_bytes: the peak of anon + file + shmem (the sum at one instant, not the sum of the peaks).
- vm_hwm_bytes: the largest VmHWM (the kernel's own RSS high-water mark, anon + file) of any sampled
  process; ru_maxrss_bytes: the same from wait4 for the command and the descendants it waited for. These
  two catch a peak shorter than the interval, which the sampled sums may miss by a little.

Phases: a measured Python process may call `memory.phase("load")` (from this module); the sampler then
also reports, per phase, its start, duration and peaks, and the process's own exact RssAnon / RssFile at
the moment it entered the phase (`at_start`). The marks go through the file named in $QE_MEMORY_PHASES.

From Python: `measure(cmd)` runs a command, `measure_call("module:function", kwargs)` runs a function in
a fresh interpreter (so nothing of the caller's memory is inherited) and returns its JSON-able result under
"result" along with the measurements.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIELDS = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem", "VmHWM": "hwm", "VmRSS": "rss"}
PHASE_ENV = "QE_MEMORY_PHASES"


def status(pid) -> dict:
    """{anon, file, shmem, hwm, rss} in bytes from /proc/PID/status ({} if the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in FIELDS:
                    out[FIELDS[key]] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants (threads' children included)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def phase(name: str) -> None:
    """Mark the start of phase `name` in a process run by `measure` (no-op otherwise)."""
    path = os.environ.get(PHASE_ENV)
    if not path:
        return
    s = status("self")
    with open(path, "a") as f:
        f.write(json.dumps({"phase": name, "t": time.time(), "anon": s.get("anon"), "file": s.get("file"),
                            "hwm": s.get("hwm")}) + "\n")


def _read_marks(path: str, pos: int) -> tuple[list[dict], int]:
    try:
        with open(path) as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:
        return [], pos
    end = data.rfind("\n") + 1  # only whole lines
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], pos + end


def measure(cmd: list, interval: float = 0.02, env: dict | None = None, cwd=None, stdout=None, stderr=None,
            timeout: float | None = None, max_anon_bytes: int | None = None) -> dict:
    """Run `cmd` and sample its process tree's memory until it exits; the report as a dict.

    timeout / max_anon_bytes: kill the tree when it runs longer, or when its anonymous RSS passes this
    (a guard on a shared machine); report["killed"] then says why."""
    marks_file = tempfile.NamedTemporaryFile(prefix="qe-phases-", suffix=".jsonl", delete=False)
    marks_file.close()
    env = dict(os.environ if env is None else env)
    env[PHASE_ENV] = marks_file.name
    peak = {"anon": 0, "file": 0, "shmem": 0, "rss": 0}
    hwm, samples, pids_seen = 0, 0, set()
    phases, pos, current = [], 0, None
    t0 = time.time()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=stdout, stderr=stderr)
    rusage = None
    status_code = None
    killed = None
    try:
        while True:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status_code, rusage = st, ru
                break
            if timeout is not None and time.time() - t0 > timeout and not killed:
                killed = f"ran past the timeout of {timeout:.0f} s"
                _kill_tree(proc.pid)
            total = {"anon": 0, "file": 0, "shmem": 0}
            pids = tree(proc.pid)
            for p in pids:
                s = status(p)
                if not s:
                    continue
                pids_seen.add(p)
                for k in total:
                    total[k] += s.get(k, 0)
                hwm = max(hwm, s.get("hwm", 0))
            total["rss"] = total["anon"] + total["file"] + total["shmem"]
            if max_anon_bytes is not None and total["anon"] > max_anon_bytes and not killed:
                killed = f"anonymous RSS {total['anon'] / 1e9:.1f} GB passed the limit of {max_anon_bytes / 1e9:.1f} GB"
                _kill_tree(proc.pid, pids)
            samples += 1
            marks, pos = _read_marks(marks_file.name, pos)
            for m in marks:
                current = {"phase": m["phase"], "start_s": m["t"] - t0,
                           "at_start": {"anon_bytes": m["anon"], "file_bytes": m["file"], "hwm_bytes": m["hwm"]},
                           "peak_anon_bytes": 0, "peak_file_bytes": 0, "peak_rss_bytes": 0}
                phases.append(current)
            for k in peak:
                peak[k] = max(peak[k], total[k])
            if current is not None:
                for k in ("anon", "file", "rss"):
                    current[f"peak_{k}_bytes"] = max(current[f"peak_{k}_bytes"], total[k])
            time.sleep(interval)
    finally:
        if status_code is None:  # interrupted: do not leave the command running
            proc.kill()
            os.wait4(proc.pid, 0)
        proc.returncode = -1 if status_code is None else os.waitstatus_to_exitcode(status_code)
    wall = time.time() - t0
    marks, pos = _read_marks(marks_file.name, pos)  # marks written after the last sample
    for m in marks:
        phases.append({"phase": m["phase"], "start_s": m["t"] - t0,
                       "at_start": {"anon_bytes": m["anon"], "file_bytes": m["file"], "hwm_bytes": m["hwm"]}})
    os.unlink(marks_file.name)
    for a, b in zip(phases, phases[1:] + [None]):
        a["duration_s"] = (b["start_s"] if b else wall) - a["start_s"]
    return {"cmd": [str(c) for c in cmd], "rc": proc.returncode, "wall_s": wall,
            "peak_anon_bytes": peak["anon"], "peak_file_bytes": peak["file"], "peak_shmem_bytes": peak["shmem"],
            "peak_rss_bytes": peak["rss"], "vm_hwm_bytes": hwm,
            "ru_maxrss_bytes": rusage.ru_maxrss * 1024 if rusage else None,
            "samples": samples, "interval_s": interval, "processes": len(pids_seen), "phases": phases,
            "killed": killed}


def _kill_tree(pid: int, pids: list[int] | None = None) -> None:
    for p in reversed(pids or tree(pid)):  # children first
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


def measure_call(target: str, kwargs: dict | None = None, interval: float = 0.02, env: dict | None = None,
                 cwd=None, python: str = sys.executable, stderr=None, timeout: float | None = None) -> dict:
    """Run `target` ("package.module:function" or "path/to/file.py:function") with `kwargs` in a fresh
    interpreter under `measure`; its JSON-able return value comes back as report["result"] (None if it
    failed; report["error"] then says why)."""
    with tempfile.TemporaryDirectory(prefix="qe-call-") as d:
        result = Path(d) / "result.json"
        cmd = [python, os.path.abspath(__file__), "--call-child", target, json.dumps(kwargs or {}), str(result)]
        report = measure(cmd, interval=interval, env=env, cwd=cwd, stderr=stderr, timeout=timeout)
        report["cmd"] = [f"{target}(**{json.dumps(kwargs or {})})"]
        if result.exists():
            out = json.loads(result.read_text())
            report["result"], report["error"] = out.get("result"), out.get("error")
        else:
            report["result"], report["error"] = None, f"child exited {report['rc']} without a result"
    return report


def _call_child(target: str, kwargs_json: str, result_path: str) -> int:
    import importlib
    import importlib.util
    import traceback

    where, _, func = target.rpartition(":")
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        out = {"result": getattr(module, func)(**json.loads(kwargs_json))}
        rc = 0
    except Exception as e:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        out = {"result": None, "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:1000]}
        rc = 1
    Path(result_path).write_text(json.dumps(out))
    return rc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--call-child"]:
        return _call_child(*argv[1:4])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between samples (default 0.02)")
    ap.add_argument("--out", help="also append the JSON line to this file")
    ap.add_argument("--label", help="a label stored in the JSON")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (memory.py [options] -- COMMAND ARGS...)")
    report = measure(cmd, interval=args.interval, stdout=sys.stderr)
    if args.label:
        report = {"label": args.label, **report}
    line = json.dumps(report)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0 if report["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
