"""randyGPT's cupy backend vs PyTorch on one NVIDIA GPU: training tokens/s, peak GPU memory,
single-stream generation tokens/s. benchmarks/gpu_check.sh runs it on a GPU.

    python3 benchmarks/gpu_bench.py [--configs A B 124M] [--seconds 6] [--json OUT.json]
    python3 benchmarks/gpu_bench.py --dry-run     (on a CPU: the same code, NumPy standing in
                                                   for CuPy, PyTorch on the CPU, a tiny config,
                                                   torch.compile left out unless --impls names
                                                   it; it checks the script, its figures mean
                                                   nothing)

Configs: A = 6L/128d/8h, block 64, batch 32; B = 6L/256d/8h, block 256, batch 64 (both vocab
67, as benchmarks/compare_pytorch.py); 124M = GPT-2 small's shape, 12L/768d/12h, block 1024,
batch 8, vocab 50304 (124M parameters with GPT-2's tied head; 163M here, whose head is its
own matrix). Dropout 0.1, AdamW (0.9, 0.99, eps 1e-8, wd 0.01 on matrices), clipping at 1.0.

Implementations, each in its own subprocess (its own GPU memory pool, so its own peak):
    randygpt-fp32    the cupy backend, float32 products
    randygpt-bf16    the cupy backend, --dtype bf16 (bf16 operands, float32 accumulation)
    torch-eager      tests/torch_twin.py's TorchGPT (the same architecture), bf16 autocast,
                     fused AdamW
    torch-compile    the same under torch.compile (reported as failed if it does not build)
Each warms up, then trains for --seconds; the GPU is synchronised before the clock starts
and before it stops, so tokens/s is what the GPU did. Peak memory: the bytes the process's
allocator held at the end (CuPy's pool never gives memory back by itself; PyTorch's
max_memory_reserved), i.e. the high-water mark of each allocator. Generation: one stream,
greedy, prefill 1 token then --gen-tokens decodes, logits to the host each token.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

CONFIGS = {
    "A": dict(n_layer=6, n_embd=128, n_head=8, block_size=64, batch_size=32, vocab_size=67),
    "B": dict(n_layer=6, n_embd=256, n_head=8, block_size=256, batch_size=64, vocab_size=67),
    "124M": dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, batch_size=8,
                 vocab_size=50304),
    "dry": dict(n_layer=2, n_embd=32, n_head=4, block_size=16, batch_size=4, vocab_size=67),
}
IMPLS = ("randygpt-fp32", "randygpt-bf16", "torch-eager", "torch-compile")
DROPOUT, LR, BETAS, EPS, WD, CLIP = 0.1, 1e-3, (0.9, 0.99), 1e-8, 0.01, 1.0
WARMUP = 3


def model_config(cfg):
    from randygpt.config import ModelConfig
    return ModelConfig(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"],
                       n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], n_head=cfg["n_head"],
                       dropout=DROPOUT)


def host_batches(cfg, seed=1):
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg["vocab_size"], 1 << 20)
    B, T = cfg["batch_size"], cfg["block_size"]
    while True:
        rows = rng.integers(0, len(tokens) - T - 1, B)[:, None] + np.arange(T)
        yield tokens[rows], tokens[rows + 1]


def timed(step, sync, seconds):
    """Warm up, then step for about `seconds`; (steps, elapsed) with the GPU drained."""
    for _ in range(WARMUP):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    return n, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# workers: one implementation on one config, printing one JSON line

def randygpt_worker(cfg, impl, seconds, dry, gen_tokens):
    import numpy as np
    from randygpt.model import GPT, KVCache
    from randygpt.ops.contract import get_backend
    from randygpt.optim import AdamW
    from randygpt.step import train_step
    dtype = "bf16" if impl.endswith("bf16") else "float32"
    if dry:
        backend = get_backend("cupy", xp=np, kernels=False, dtype=dtype)

        def sync():
            pass

        def pool_bytes():
            return None
    else:
        import cupy
        backend = get_backend("cupy", dtype=dtype)
        sync = cupy.cuda.Device().synchronize

        def pool_bytes():
            return int(cupy.get_default_memory_pool().total_bytes())
    mcfg = model_config(cfg)
    model = GPT(mcfg, seed=0, backend=backend)
    opt = AdamW(model.params.flat, model.decay_mask(), *BETAS, eps=EPS, weight_decay=WD,
                backend=backend)
    data, drop = host_batches(cfg), np.random.default_rng(2)
    last = {}

    def step():
        x, y = next(data)
        last["loss"] = train_step(model, opt, backend.to_device(x), backend.to_device(y), LR,
                                  grad_clip=CLIP, dropout_rng=drop).loss
    n, elapsed = timed(step, sync, seconds)
    out = dict(impl=impl, steps=n, seconds=elapsed,
               tokens_per_s=n * cfg["batch_size"] * cfg["block_size"] / elapsed,
               loss=float(last["loss"]), peak_bytes=pool_bytes(), params=model.num_params)
    if gen_tokens and impl == "randygpt-fp32":
        cache = KVCache(mcfg, 1, np.float32, model.xp)
        logits = model.prefill([0], cache)
        token, t0 = int(np.argmax(logits[-1])), time.perf_counter()
        n = min(gen_tokens, mcfg.block_size - 1)
        for _ in range(n):
            token = int(np.argmax(model.decode(np.array([token]), cache, np.array([0]))[0]))
        out["generate_tokens_per_s"] = n / (time.perf_counter() - t0)   # argmax on the host
    return out                                                             # synchronises


def torch_worker(cfg, impl, seconds, dry):
    import numpy as np
    import torch
    from randygpt.model import GPT
    from torch_twin import TorchGPT
    device = "cpu" if dry else "cuda"
    mcfg = model_config(cfg)
    twin = TorchGPT.from_randygpt(GPT(mcfg, seed=0, backend="reference")).to(device).train()
    named = [(n, twin.p(n)) for n in twin.names]
    groups = [dict(params=[p for n, p in named if p.dim() == 2], weight_decay=WD),
              dict(params=[p for n, p in named if p.dim() != 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=not dry)
    run = twin
    if impl == "torch-compile":
        run = torch.compile(twin)
    data, last = host_batches(cfg), {}

    def step():
        x, y = (torch.from_numpy(a).to(device, non_blocking=True) for a in next(data))
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = run(x, y, dropout=DROPOUT)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()
    sync = (lambda: None) if dry else torch.cuda.synchronize
    n, elapsed = timed(step, sync, seconds)
    return dict(impl=impl, steps=n, seconds=elapsed,
                tokens_per_s=n * cfg["batch_size"] * cfg["block_size"] / elapsed,
                loss=float(last["loss"]), params=sum(p.numel() for _, p in named),
                peak_bytes=None if dry else int(torch.cuda.max_memory_reserved()))


def worker(args):
    cfg = CONFIGS[args.worker_config]
    if args.worker.startswith("randygpt"):
        out = randygpt_worker(cfg, args.worker, args.seconds, args.dry_run, args.gen_tokens)
    else:
        out = torch_worker(cfg, args.worker, args.seconds, args.dry_run)
    print("RESULT " + json.dumps(out))


# --------------------------------------------------------------------------------------------

def run_one(config, impl, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--worker-config",
           config, "--seconds", str(args.seconds), "--gen-tokens", str(args.gen_tokens)]
    if args.dry_run:
        cmd.append("--dry-run")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return dict(impl=impl, error=f"timed out after {args.worker_timeout} s")
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(impl=impl, error=f"exit {r.returncode}: {tail[:200]}")


def describe_device(dry):
    if dry:
        return "DRY RUN on the CPU (NumPy standing in for CuPy): no GPU figures"
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    return (f"{props['name'].decode()}, {props['totalGlobalMem'] / 2**30:.0f} GiB, CUDA "
            f"runtime {cupy.cuda.runtime.runtimeGetVersion()}, CuPy {cupy.__version__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["A", "B", "124M"], choices=list(CONFIGS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--gen-tokens", type=int, default=200)
    ap.add_argument("--worker-timeout", type=int, default=150)
    ap.add_argument("--json", default=None, help="write every result here")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.dry_run:                     # torch.compile on a CPU takes minutes: asked only
        args.configs, args.seconds = ["dry"], min(args.seconds, 1.0)
        if "--impls" not in sys.argv:
            args.impls = [i for i in args.impls if i != "torch-compile"]
    print(describe_device(args.dry_run), flush=True)
    results = {}
    for config in args.configs:
        rows = results[config] = [run_one(config, impl, args) for impl in args.impls]
        eager = next((r["tokens_per_s"] for r in rows
                      if r["impl"] == "torch-eager" and "error" not in r), None)
        print(f"config {config} {CONFIGS[config]}")
        for r in rows:
            if "error" in r:
                print(f"  {r['impl']:14s} failed: {r['error']}")
                continue
            ratio = f"{r['tokens_per_s'] / eager:5.2f}x torch-eager" if eager else ""
            mem = (f"{r['peak_bytes'] / 2**30:6.2f} GiB peak" if r.get("peak_bytes")
                   else "peak n/a")
            gen = (f", generation {r['generate_tokens_per_s']:,.0f} tok/s (1 stream)"
                   if "generate_tokens_per_s" in r else "")
            print(f"  {r['impl']:14s} {r['tokens_per_s']:>12,.0f} tok/s  {ratio:20s} {mem}  "
                  f"loss {r['loss']:.3f} ({r['steps']} steps, {r['params']:,} params){gen}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=describe_device(args.dry_run), results=results), f, indent=1)


if __name__ == "__main__":
    main()
