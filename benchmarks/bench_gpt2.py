"""GPT-2 124M on this CPU: training tokens/s against PyTorch on the same architecture, the
memory estimate against the real peak, generation tokens/s with the KV cache.

    .venv/bin/python benchmarks/bench_gpt2.py [--block 64] [--batch 4] [--steps 3]
        [--rounds 2] [--gen-tokens 48]

The 124M shape (12 layers, 768 dim, 12 heads, 1024 positions, 50257-token vocabulary, GPT-2's
LayerNorm/GELU/biases/tied head) with random weights (GPT-2 init); the training windows are
--block tokens long (a short block keeps a step to seconds on a small CPU; the work per token
grows only slowly with the block at this width). Each implementation trains in its own
subprocess (its own peak memory, its own thread pools), and they alternate for --rounds
rounds, so a load change on the machine hits both: randyGPT's fused backend (what `randygpt
train` runs) and tests/torch_twin.py (the PyTorch twin of the same architecture, eager,
torch.optim.AdamW). A step is forward + backward + clip + AdamW; the first step is warm-up.
The randyGPT worker also reports its peak resident memory above what it held before the
model was allocated, next to randygpt/memory.py's estimate for the same run.

Generation: randyGPT's prefill of a 16-token prompt and then one token at a time through the
KV cache (the `randygpt generate` path, greedy, one BLAS thread as there), and, when
transformers is installed, its GPT2LMHeadModel.generate (use_cache) on the same shape.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
SHAPE = dict(vocab_size=50257, block_size=1024, n_layer=12, n_embd=768, n_head=12,
             dropout=0.0, norm="layernorm", activation="gelu", bias=True, tied_head=True)
LR, CLIP = 1e-4, 1.0


def rss_mb(field="VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def batches(B, T, seed=1):
    import numpy as np
    rng = np.random.default_rng(seed)
    while True:
        x = rng.integers(0, SHAPE["vocab_size"], (B, T + 1))
        yield x[:, :-1], x[:, 1:]


def worker_randygpt(B, T, steps):
    import numpy as np
    from randygpt.config import ModelConfig, TrainConfig
    from randygpt.memory import training_memory
    from randygpt.model import GPT
    from randygpt.ops.contract import get_backend
    from randygpt.optim import clip_grad_norm
    from randygpt.step import make_optimizer
    cfg = ModelConfig(**SHAPE)
    backend = get_backend("fused")
    before = rss_mb()
    model = GPT(cfg, seed=0, backend=backend)
    opt = make_optimizer(model, TrainConfig(), backend)
    data, times = batches(B, T), []
    for _ in range(steps + 1):
        x, y = next(data)
        t0 = time.perf_counter()
        model.forward(x, y)
        model.backward()
        clip_grad_norm(model.grads.flat, CLIP)
        opt.step(model.grads.flat, LR)
        times.append(time.perf_counter() - t0)
    from dataclasses import replace
    est = training_memory(replace(cfg, block_size=T), B)     # windows of T positions
    return dict(step_s=times[1:], peak_mb=rss_mb("VmHWM") - before,
                estimate_mb=est.total / 2**20, estimate=est.describe())


def worker_torch(B, T, steps):
    import torch
    from randygpt.config import ModelConfig
    from torch_twin import TorchGPT
    torch.manual_seed(0)
    model = TorchGPT(ModelConfig(**SHAPE))
    with torch.no_grad():
        for name in model.names:
            p = model.p(name)
            p.copy_(torch.ones_like(p) if name.endswith(".g") else torch.randn_like(p) * 0.02
                    if not name.endswith(".b") else torch.zeros_like(p))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01)
    data, times = batches(B, T), []
    for _ in range(steps + 1):
        x, y = (torch.from_numpy(a) for a in next(data))
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        times.append(time.perf_counter() - t0)
    return dict(step_s=times[1:], threads=torch.get_num_threads())


def worker_generate(n_tokens):
    import numpy as np
    from randygpt.blas import set_blas_threads
    from randygpt.config import ModelConfig
    from randygpt.model import GPT, KVCache
    set_blas_threads(1)       # as `randygpt generate` does: one vector at a time (blas.py)
    model = GPT(ModelConfig(**SHAPE), seed=0, backend="fused")
    prompt = np.random.default_rng(3).integers(0, SHAPE["vocab_size"], 16)
    out = {}
    for label in ("warm-up", "timed"):
        cache = KVCache(model.cfg)
        t0 = time.perf_counter()
        logits = model.prefill(prompt, cache)[-1]
        t1 = time.perf_counter()
        for _ in range(n_tokens):
            token = int(np.argmax(logits))
            logits = model.decode(np.array([token]), cache, [0])[0]
        t2 = time.perf_counter()
        out = dict(prefill_s=t1 - t0, decode_tok_s=n_tokens / (t2 - t1))
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return out
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    ids = torch.from_numpy(prompt)[None]
    with torch.no_grad():
        for _ in range(2):                                   # warm-up, then timed
            t0 = time.perf_counter()
            hf.generate(ids, do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                        pad_token_id=0, use_cache=True)
            t = time.perf_counter() - t0
    out["hf_tok_s"] = n_tokens / t                           # prefill included (16 tokens)
    return out


def spawn(*args) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"worker {args} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, *rest = a.worker
        fn = {"randygpt": worker_randygpt, "torch": worker_torch,
              "generate": worker_generate}[kind]
        print(json.dumps(fn(*map(int, rest))))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average at start: "
          f"{os.getloadavg()[0]:.2f} (other processes may be running)", flush=True)
    tokens = a.batch * a.block
    print(f"GPT-2 124M shape, random weights; training on {a.batch} x {a.block} = {tokens} "
          f"tokens per step, {a.steps} timed steps per round, {a.rounds} rounds", flush=True)
    results = {"randygpt": [], "torch": []}
    for r in range(a.rounds):
        order = ["randygpt", "torch"] if r % 2 == 0 else ["torch", "randygpt"]
        for kind in order:
            if kind == "torch":
                try:
                    import importlib.util
                    if importlib.util.find_spec("torch") is None:
                        continue
                except ImportError:
                    continue
            results[kind].append(spawn(kind, a.batch, a.block, a.steps))
            steps = ", ".join(f"{t:.2f}" for t in results[kind][-1]["step_s"])
            print(f"  round {r + 1} {kind}: steps {steps} s (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    speed = {}
    for kind, runs in results.items():
        if runs:
            step = statistics.median(s for run in runs for s in run["step_s"])
            speed[kind] = tokens / step
            print(f"  {kind:9s} {speed[kind]:8.1f} tokens/s (median step {step:.2f} s)")
    if len(speed) == 2:
        print(f"  randyGPT / PyTorch: {speed['randygpt'] / speed['torch']:.2f}x")
    mem = results["randygpt"][0]
    ratio = mem["estimate_mb"] / mem["peak_mb"]
    print(f"  memory: estimate {mem['estimate_mb']:.0f} MiB, measured peak {mem['peak_mb']:.0f} "
          f"MiB above the process before allocating (estimate / peak {ratio:.2f}); estimate "
          f"{mem['estimate']}")
    g = spawn("generate", a.gen_tokens)
    line = (f"generation (KV cache, 16-token prompt, {a.gen_tokens} new tokens): randyGPT "
            f"{g['decode_tok_s']:.1f} tokens/s (prefill {g['prefill_s']:.2f} s)")
    if "hf_tok_s" in g:
        line += f"; transformers generate {g['hf_tok_s']:.1f} tokens/s (prefill included)"
    print(line)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
