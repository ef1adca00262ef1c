"""What every peer runner shares (stdlib + numpy only, so it imports in every peer's virtualenv).

A runner is `python tests/bench/peer_X.py --variant V --model PATH --prompt-ids prompt.json --new-tokens N
--runs R --threads T [--score NAME=DIR ...] --out result.json`; it defines `measure(args) -> dict` and calls
`main_common(peer_name, measure)`. The measurement runs in a child process, so a crash still yields a row.
Scoring: DIR holds windows.json ({"ids", "windows": [[start, end, first_target], ...]}) and reference.npy
(float32 log-probabilities [n_targets, vocab] of the float32 reference, targets in window order).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import numpy as np

def parse_args(argv=None, extra=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--out")
    ap.add_argument("--in-child", action="store_true", help=argparse.SUPPRESS)
    if extra:
        extra(ap)
    return ap.parse_args(argv)


def stats(xs):
    return {"median": float(statistics.median(xs)), "min": float(min(xs)), "max": float(max(xs))}


def result(version, model_path, rss, load_s, ttft, prefill, decode, scores, greedy_ids, notes) -> dict:
    """The measurement part of a result.json, in the contract's field names (lists are per run)."""
    return {"version": version, "disk_bytes": disk_bytes(model_path), "peak_rss_bytes": rss, "load_s": load_s,
            "ttft_s": stats(ttft), "prefill_tok_s": stats(prefill), "decode_tok_s": stats(decode),
            "scores": scores, "greedy_ids": greedy_ids, "notes": notes}


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_bytes(path):
    path = os.path.realpath(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.realpath(os.path.join(root, f)))
    return total


def load_windows(spec):
    name, _, d = spec.partition("=")
    if not d:
        raise ValueError(f"--score wants NAME=DIR, got {spec!r}")
    with open(os.path.join(d, "windows.json")) as f:
        w = json.load(f)
    ref = np.load(os.path.join(d, "reference.npy"), mmap_mode="r")
    n = sum(end - ft for _, end, ft in w["windows"])
    if ref.shape[0] != n:
        raise ValueError(f"{d}: reference.npy has {ref.shape[0]} rows, windows.json has {n} targets")
    return name, w["ids"], w["windows"], ref


def score_windows(logits_fn, ids, windows, ref, notes, chunk=64):
    """logits_fn(list_of_ids) -> float32 [len, vocab] logits for every position of a fresh sequence."""
    nll, kl, agree = [], [], []
    row = 0
    vocab_noted = False
    for start, end, first in windows:
        logits = logits_fn(ids[start:end])
        if logits.shape[0] != end - start:
            raise RuntimeError(f"peer returned {logits.shape[0]} logit rows for a {end - start}-token window")
        if logits.shape[1] != ref.shape[1] and not vocab_noted:
            notes.append(f"peer vocab {logits.shape[1]} != reference {ref.shape[1]}: compared on the first "
                         f"{min(logits.shape[1], ref.shape[1])} columns")
            vocab_noted = True
        v = min(logits.shape[1], ref.shape[1])
        for t0 in range(first, end, chunk):
            t1 = min(t0 + chunk, end)
            lg = np.asarray(logits[t0 - 1 - start:t1 - 1 - start, :v], dtype=np.float32)
            m = lg.max(axis=1, keepdims=True)
            lp = lg - (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True)))
            r = np.asarray(ref[row:row + (t1 - t0), :v], dtype=np.float32)
            tgt = np.asarray(ids[t0:t1])
            nll.append(-lp[np.arange(t1 - t0), tgt])
            kl.append((np.exp(r) * (r - lp)).sum(axis=1))
            agree.append(lg.argmax(axis=1) == r.argmax(axis=1))
            row += t1 - t0
        del logits
    nll, kl, agree = (np.concatenate(x).astype(np.float64) for x in (nll, kl, agree))
    return {"ppl": float(np.exp(nll.mean())), "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1": float(agree.mean()), "n_targets": int(nll.size)}


def write_result(path, res):
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in res.items()) + "\n}"
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)


def supervise(args, peer, variant):
    """Run this script again as a child; turn a crash of the child into an ok=false result."""
    if args.in_child:
        return False
    if args.out and os.path.exists(args.out):
        os.remove(args.out)
    proc = subprocess.run([sys.executable, os.path.abspath(sys.argv[0]), "--in-child"] + sys.argv[1:])
    if not (args.out and os.path.exists(args.out)):
        why = (f"runner died with signal {-proc.returncode}" if proc.returncode < 0
               else f"runner exited {proc.returncode} without a result")
        write_result(args.out, {"peer": peer, "variant": variant, "ok": False, "why": why})
    return True


def main_common(peer, measure, extra_args=None, special=None):
    """special(args) -> exit code or None: a non-measuring mode handled before anything else."""
    args = parse_args(extra=extra_args)
    if special is not None and (rc := special(args)) is not None:
        return rc
    if supervise(args, peer, args.variant):
        return 0
    try:
        res = {"peer": peer, "variant": args.variant, "ok": True}
        res.update(measure(args))
    except Exception as e:  # noqa: BLE001 - any failure becomes a result row
        why = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
        res = {"peer": peer, "variant": args.variant, "ok": False, "why": why}
    write_result(args.out, res)
    return 0
