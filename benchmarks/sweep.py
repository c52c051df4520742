"""A hyper-parameter sweep at equal wall time: which settings learn most in a time budget?

    .venv/bin/python benchmarks/sweep.py [--data tinyshakespeare.txt] [--budget 90s]
        [--seeds 1337 1338] [--points base lr=3e-3 ...] [--results sweep.jsonl]

Each point is the base settings with a few flags changed (`name=flag:value,flag:value`, or one
of the named points below), trained by the real CLI (`randygpt train --time-budget ...`, the
fused backend, one run at a time on the whole machine) once per seed. The score is the exact
validation loss of the final evaluation (every validation target once). Results are appended
to --results as JSON lines, and a point already there is not run again, so an interrupted
sweep continues. The table printed at the end has the mean over seeds and the difference to
the base point; a difference smaller than the spread between seeds is noise.

The CPU, its BLAS and the load are printed first: a budget buys a different number of steps
on another machine, so the best settings can differ too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")

# the base: the small preset with the defaults; every other point changes one thing (or, for
# batch/block, keeps the tokens per step: batch x block = 2048)
POINTS = {
    "base": {},
    "lr=2e-3": {"lr": "2e-3"},
    "lr=3e-3": {"lr": "3e-3"},
    "lr=5e-3": {"lr": "5e-3"},
    "beta2=0.95": {"beta2": "0.95"},
    "warmup=30": {"warmup": "30"},
    "decay=0.6": {"decay-frac": "0.6"},
    "decay=1.0": {"decay-frac": "1.0"},
    "dropout=0": {"dropout": "0"},
    "block=128,batch=16": {"block": "128", "batch": "16"},
    "block=32,batch=64": {"block": "32", "batch": "64"},
    "batch=16": {"batch": "16"},
}


def parse_point(text: str) -> tuple[str, dict]:
    if text in POINTS:
        return text, POINTS[text]
    flags = {}
    for part in text.split(","):
        if "=" not in part:
            sys.exit(f"sweep: point {text!r}: write flag=value[,flag=value] or one of "
                     f"{', '.join(POINTS)}")
        k, v = part.split("=", 1)
        flags[k.strip().lstrip("-")] = v.strip()
    return text, flags


def run_point(data, budget, flags, seed, base_flags, lock=None) -> dict:
    if lock is not None:
        import fcntl
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            return run_point(data, budget, flags, seed, base_flags)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        args = [sys.executable, "-m", "randygpt", "train", "--data", data, "--time-budget",
                budget, "--seed", str(seed), "--out", out, "--no-progress",
                "--sample-tokens", "0"]
        for k, v in {**base_flags, **flags}.items():
            args += [f"--{k}", v]
        from machine import cpu_ticks, steal_since
        t0, ticks = time.monotonic(), cpu_ticks()
        r = subprocess.run(args, capture_output=True, text=True, cwd=tmp,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        wall, steal = time.monotonic() - t0, steal_since(ticks)
        if r.returncode != 0:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        last = rows[-1]
        return {"val_loss": last.get("val_loss_exact", last["val_loss"]),
                "train_loss": last["train_loss"], "iters": last["iter"],
                "tokens_per_sec": last["tokens_per_sec"], "wall_s": round(wall, 1),
                **({"steal_pct": round(steal, 1)} if steal is not None else {})}


def main():
    from machine import describe
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DATA, help="training text (default: Tiny Shakespeare)")
    ap.add_argument("--budget", default="90s", help="wall time of each run (default 90s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    ap.add_argument("--points", nargs="+", default=list(POINTS),
                    help="points to run (named, or flag=value,flag=value)")
    ap.add_argument("--base", default="",
                    help="flags every point starts from, as flag=value,flag=value "
                    "(default: the defaults, small preset)")
    ap.add_argument("--results", default="sweep.jsonl", help="JSON lines, appended")
    ap.add_argument("--lock", default=None, metavar="FILE",
                    help="hold an flock on FILE during each run (to keep other heavy jobs of "
                    "this machine out of the timed runs)")
    args = ap.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"sweep: no {args.data}; fetch Tiny Shakespeare (README) or pass --data")
    print(describe())
    base_flags = parse_point(args.base)[1] if args.base else {}
    done = {}
    if os.path.exists(args.results):
        for line in open(args.results):
            r = json.loads(line)
            done[(r["point"], r["seed"], r["budget"], r["base"])] = r
    with open(args.results, "a") as log:
        for text in args.points:
            name, flags = parse_point(text)
            for seed in args.seeds:
                key = (name, seed, args.budget, args.base)
                if key in done:
                    continue
                r = {"point": name, "seed": seed, "budget": args.budget, "base": args.base,
                     **run_point(args.data, args.budget, flags, seed, base_flags, args.lock)}
                print(json.dumps(r), flush=True)
                log.write(json.dumps(r) + "\n")
                log.flush()
                done[key] = r
    table = {}
    for (name, seed, budget, base), r in done.items():
        if budget == args.budget and base == args.base and "val_loss" in r:
            table.setdefault(name, []).append(r)
    ref = statistics.mean(r["val_loss"] for r in table["base"]) if "base" in table else None
    print(f"\nbudget {args.budget} per run, base {args.base or 'defaults'}; exact val loss "
          "(mean over seeds), lower is better:")
    print("| point | seeds | val loss | spread | vs base | iterations | tokens/s | CPU steal |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in sorted(table.items(), key=lambda kv: statistics.mean(
            r["val_loss"] for r in kv[1])):
        v = [r["val_loss"] for r in rs]
        mean = statistics.mean(v)
        print(f"| {name} | {len(v)} | {mean:.4f} | {max(v) - min(v):.4f} | "
              + (f"{mean - ref:+.4f}" if ref is not None else "") + " | "
              f"{statistics.mean(r['iters'] for r in rs):.0f} | "
              f"{statistics.mean(r['tokens_per_sec'] for r in rs):,.0f} | "
              + (f"{statistics.mean(r['steal_pct'] for r in rs):.0f} %"
                 if all("steal_pct" in r for r in rs) else "-") + " |")


if __name__ == "__main__":
    main()
