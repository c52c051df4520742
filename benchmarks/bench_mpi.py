"""Data-parallel training over MPI: 1 rank against 2 ranks, and what the communication costs.

    .venv/bin/python benchmarks/bench_mpi.py [--preset small] [--iters 30]

Runs the training step (step.train_step with the world's gradient reduction, as train.py does)
three ways on the same per-rank batch: one process; one process with --grad-accum 2 (the same
step's batch as 2 ranks, the peer that is bit-for-bit equal to them); `mpiexec -n 2` (each rank
gets half the cores). For the 2-rank run it reports the time spent in communication per step
(inside the step: the reduce-scatter + all-gather and the end-of-step exchange, which includes
waiting for the slower rank) and the reduction alone, timed back to back after the run.
On a 2-core machine 2 ranks cannot be faster than one process with 2 threads: the figure that
carries over to several machines is the communication share.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"


def worker(preset: str, iters: int, warmup: int, grad_accum: int) -> None:
    import numpy as np

    from randygpt.config import PRESETS, ModelConfig, TrainConfig
    from randygpt.data import builtin_sample_text, get_batch
    from randygpt.distributed import open_world
    from randygpt.model import GPT
    from randygpt.ops.contract import get_backend
    from randygpt.step import make_optimizer, train_step
    from randygpt.tokenizer import CharTokenizer

    world = open_world(timeout=300)
    text = open(SHAKESPEARE, encoding="utf-8").read() if os.path.exists(SHAKESPEARE) \
        else builtin_sample_text()
    tok = CharTokenizer.from_text(text)
    tokens = np.array(tok.encode(text), dtype=np.int32)
    p = PRESETS[preset]
    mcfg = ModelConfig(vocab_size=tok.vocab_size, block_size=p["block_size"],
                       n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"])
    tcfg = TrainConfig(batch_size=p["batch_size"], grad_accum=grad_accum)
    backend = get_backend("fused")
    model = GPT(mcfg, seed=0, backend=backend)
    opt = make_optimizer(model, tcfg, backend)
    batch_rng, dropout_rng = np.random.default_rng(1), np.random.default_rng(2)
    rows = tcfg.batch_size * grad_accum
    mine = slice(world.rank * rows, (world.rank + 1) * rows)
    hook = world.reduce_gradients if world.size > 1 else None
    times, comm = [], []
    for it in range(warmup + iters):
        c0, t0 = world.comm_seconds, time.perf_counter()
        x, y = get_batch(tokens, rows * world.size, mcfg.block_size, batch_rng)
        step = train_step(model, opt, x[mine], y[mine], 1e-3, grad_clip=1.0,
                          dropout_rng=dropout_rng, micro_batches=grad_accum, row0=mine.start,
                          n_targets=int((y >= 0).sum()), grad_hook=hook)
        world.exchange(step.loss, None)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
            comm.append(world.comm_seconds - c0)
    world.check_same_weights(model.params.flat, warmup + iters)
    alone = []
    if world.size > 1:                 # the reduction alone, back to back
        grad = model.grads.flat.copy()
        world.exchange(0.0, None)
        for _ in range(10):
            t0 = time.perf_counter()
            world.reduce_gradients(grad)
            alone.append(time.perf_counter() - t0)
    if world.is_root:
        med = lambda v: float(np.median(v)) if v else 0.0     # noqa: E731
        step_s = med(times)
        print(json.dumps(dict(
            ranks=world.size, grad_accum=grad_accum, params=model.num_params,
            threads=os.environ.get("NUMBA_NUM_THREADS", "all"), step_ms=1e3 * step_s,
            tokens_per_s=rows * world.size * mcfg.block_size / step_s,
            comm_ms=1e3 * med(comm), comm_pct=100 * med(comm) / step_s,
            reduce_alone_ms=1e3 * med(alone),
            bytes_per_rank=int(2 * (world.size - 1) / world.size * 4 * model.num_params))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.preset, args.iters, args.warmup, args.grad_accum)
        return 0
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", args.preset,
          "--iters", str(args.iters), "--warmup", str(args.warmup)]
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                           + os.environ.get("PATH", ""))
    runs = [("1 process", me), ("1 process, --grad-accum 2", me + ["--grad-accum", "2"])]
    if mpiexec is None:
        print("no mpiexec: install the extra, pip install -e '.[mpi]'")
    else:
        runs.append(("mpiexec -n 2", [mpiexec, "-n", "2", *me]))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                if line.startswith("Model name")), "unknown CPU")
    print(f"{args.preset} preset, {args.iters} timed steps (median), {cpu}, "
          f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    results = {}
    for name, cmd in runs:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr}")
            return 1
        results[name] = res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name:28s} {res['step_ms']:8.1f} ms/step {res['tokens_per_s']:9,.0f} tok/s"
              + (f"   communication {res['comm_ms']:.2f} ms/step = {res['comm_pct']:.1f} % "
                 f"of the step (reduction alone {res['reduce_alone_ms']:.2f} ms, "
                 f"{res['bytes_per_rank'] / 1e6:.2f} MB sent per rank)"
                 if res["ranks"] > 1 else ""))
    if "mpiexec -n 2" in results:
        two, peer = results["mpiexec -n 2"], results["1 process, --grad-accum 2"]
        print(f"2 ranks / 1 process with --grad-accum 2 (the same step): step time ratio "
              f"{two['step_ms'] / peer['step_ms']:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
