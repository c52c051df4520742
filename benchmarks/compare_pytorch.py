"""randyGPT vs PyTorch on this CPU: training tokens/s, MFU, peak memory, generation tokens/s.

    .venv/bin/python benchmarks/compare_pytorch.py [--configs A B] [--rounds 5]
        [--round-seconds 4] [--no-reference] [--no-generation] [--no-startup]
    .venv/bin/python benchmarks/compare_pytorch.py --ablation [--ablations kernel-threads ...]
        [--configs A] [--rounds 5]
        (what each optimisation is worth: the fast path with one of them taken out at a time)

Configs: A = the small preset (6L/128d/8h, block 64, batch 32), B = 6L/256d/8h, block 256,
batch 64; vocabulary 67 (Tiny Shakespeare's characters + BOS/EOS), dropout 0.1, AdamW
(0.9, 0.99, eps 1e-8, weight decay 0.01 on matrices only), global-norm clipping at 1.0.

Each implementation trains in its own subprocess, so each has its own peak RSS (whole process,
imports included) and its own thread pools: randyGPT with the fused numba kernels (the path
`randygpt train` uses), randyGPT's readable NumPy reference, and a PyTorch model of the same
architecture (eager, F.scaled_dot_product_attention, F.rms_norm, fused AdamW,
clip_grad_norm_). After warm-up steps the parent runs rounds: in each, every implementation
in turn (the order rotates) trains for about --round-seconds while the others sit idle. It
prints the median tokens/s per implementation and the median of the per-round ratios.

Before timing, one small check shows the PyTorch model is the same function: from the same
weights it gives randyGPT's loss and gradients.

MFU = training FLOPs per token x tokens/s / peak, with FLOPs per token = 6 x (parameters
outside the two embedding tables) + 12 x layers x block x dim (attention scores and their
weighted sum, forward and backward, as in the PaLM paper's accounting), and the peak = the
best float32 matmul rate measured in the same run: NumPy/OpenBLAS and PyTorch/MKL at 2048^3,
and randyGPT's own sgemm at (4096 x 512) @ (512 x 128), its best shape (the fused path runs it
on the product shapes where it measured faster than OpenBLAS on this machine: ops/fused/
choose.py; the fused worker prints which kernel each product ran). The CPU, the BLAS and
its kernel family (threadpoolctl) and the load are printed first.
PyTorch is optional: without it the script says so and reports randyGPT alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
CONFIGS = {
    "A": dict(n_layer=6, n_embd=128, n_head=8, block_size=64, batch_size=32),
    "B": dict(n_layer=6, n_embd=256, n_head=8, block_size=256, batch_size=64),
}
VOCAB, DROPOUT, LR, BETAS, EPS, WD, CLIP = 67, 0.1, 1e-3, (0.9, 0.99), 1e-8, 0.01, 1.0
IMPL_NAMES = {"fused": "randyGPT fused", "reference": "randyGPT reference", "torch": "PyTorch"}


def have_torch() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def token_stream(n=200_000):
    """Tiny Shakespeare as ids 0..65 when it is here, else random ids (speed is the same)."""
    import numpy as np
    if os.path.exists(DATA):
        text = open(DATA, encoding="utf-8").read()[:n]
        chars = sorted(set(text))
        return np.array([chars.index(c) for c in text], dtype=np.int64) % VOCAB
    return np.random.default_rng(0).integers(0, VOCAB, n)


def batches(tokens, B, T, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - T - 1, B)
        rows = starts[:, None] + np.arange(T)
        yield tokens[rows], tokens[rows + 1]


def flops_per_token(cfg) -> float:
    C, L, T = cfg["n_embd"], cfg["n_layer"], cfg["block_size"]
    non_embedding = L * (12 * C * C + 2 * C) + C + C * VOCAB
    return 6 * non_embedding + 12 * L * T * C


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Linux's VmHWM belongs to the address space
    the process runs in now; getrusage's ru_maxrss also keeps, across exec, the high-water
    mark of the parent it was forked from (here: the benchmark's parent, with numba loaded)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024                          # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024             # KiB -> MiB


def best_gflops(matmul, a, b, repeats) -> float:
    """Best float32 GFLOP/s of matmul(a, b) over `repeats` calls (after one warm-up)."""
    matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


def own_sgemm_peak(repeats=20) -> float:
    """Best GFLOP/s of randyGPT's own sgemm (ops/fused/sgemm.py) at its best shape."""
    import numpy as np
    from randygpt.ops.fused import sgemm
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, 512), dtype=np.float32)
    b = rng.standard_normal((512, 128), dtype=np.float32)
    out = np.empty((4096, 128), np.float32)
    return best_gflops(lambda a, b: sgemm.sgemm(a, b, out), a, b, repeats)


def sgemm_peak(matmul, make, n=2048, repeats=5) -> float:
    """Best float32 GFLOP/s of an n x n x n matmul."""
    return best_gflops(matmul, make(n), make(n), repeats)


# --------------------------------------------------------------------------------------------
# Workers: one implementation, one config, in its own process. They read commands on stdin
# ("run N" -> train N steps; "quit") and answer one JSON line each on stdout.

# --ablation: the fused path with one optimisation taken back out at a time. Each entry is
# (what it removes, environment overrides, ops replaced by the reference's (name prefixes),
# fused backend options).
_ELEMENTWISE = ["embedding", "rmsnorm", "squared_relu", "residual_dropout", "cross_entropy"]
ABLATIONS = {
    "fused": ("nothing (the full fast path)", {}, [], {}),
    # libgomp's default when OMP_WAIT_POLICY is unset: spin 300k iterations, then sleep
    "-omp-passive": ("numba threads sleep when idle (libgomp default: spin first)",
                     {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "300000"}, [], {}),
    "-blas-timeout": ("OpenBLAS threads sleep when idle (back to 2^28 cycles of spinning)",
                      {"OPENBLAS_THREAD_TIMEOUT": "28"}, [], {}),
    "-keep-memory": ("freed memory kept for reuse (glibc mallopt)", {}, [],
                     {"keep_freed_memory": False}),
    "-buffer-pool": ("large arrays recycled by size (ops/fused/memory.py)", {}, [],
                     {"buffer_pool": False}),
    "-attention": ("fused attention (reference: stores B*H*T*T probabilities)", {},
                   ["attention"], {}),
    "-kernel-threads": ("one thread for a parallel kernel where it measured faster (all "
                        "threads always instead)", {"RANDYGPT_KERNEL_THREADS": "all"}, [], {}),
    "-kernel-choice": ("own sgemm where it measured faster (OpenBLAS everywhere instead)", {},
                       [], {"kernels": "blas"}),
    "-linear-2d": ("2-D matmuls (reference: one sgemm per batch item)", {}, ["linear"], {}),
    "-elementwise": ("fused norm/ReLU^2/dropout/embedding/cross-entropy kernels", {},
                     _ELEMENTWISE, {}),
    "-fused-adamw": ("one-pass AdamW", {}, ["adamw"], {}),
}


def ablated_backend(name):
    """The fused backend minus one optimisation: its options changed, or some of its ops
    left to the reference (make_backend fills in what the table lacks)."""
    from randygpt.ops import contract
    _, _, replaced, options = ABLATIONS[name]
    fused = contract.get_backend("fused", **options)
    table = {op: getattr(fused, op) for op in fused.own if not op.startswith(tuple(replaced))}
    return contract.make_backend(f"fused{name}", table, fused.options)


def model_config(cfg, dropout=DROPOUT):
    from randygpt.config import ModelConfig
    return ModelConfig(vocab_size=VOCAB, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                       n_embd=cfg["n_embd"], n_head=cfg["n_head"], dropout=dropout)


def randygpt_trainer(cfg, impl):
    """randyGPT's training step as `randygpt train` takes it: step.train_step."""
    import numpy as np
    from randygpt.config import TrainConfig
    from randygpt.model import GPT
    from randygpt.step import make_optimizer, train_step
    # the backend `randygpt train` uses: fused (with its default options) or the reference
    backend = ablated_backend(impl) if impl in ABLATIONS and impl != "fused" else impl
    model = GPT(model_config(cfg), seed=0, backend=backend)
    tcfg = TrainConfig(beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, grad_clip=CLIP)
    opt = make_optimizer(model, tcfg, model.backend)
    assert opt.eps == EPS
    data = batches(token_stream(), cfg["batch_size"], cfg["block_size"], seed=1)
    dropout_rng = np.random.default_rng(2)

    def step():
        x, y = next(data)
        return train_step(model, opt, x, y, LR, grad_clip=CLIP, dropout_rng=dropout_rng).loss
    step.kernels = model.backend.options.get("kernels")      # the fused backend's choices
    return step


def torch_model(cfg, dtype=None):
    """The randyGPT architecture in PyTorch: tests/torch_twin.py's TorchGPT (the one twin),
    initialised like randyGPT (N(0, 0.02) matrices, norm gains 1)."""
    import torch       # first: the twin imports randygpt, whose thread policy must not
    sys.path.insert(0, os.path.join(ROOT, "tests"))   # reach PyTorch's own pools
    from torch_twin import TorchGPT
    twin = TorchGPT(model_config(cfg), dtype or torch.float32)
    with torch.no_grad():
        for name in twin.names:
            p = twin.p(name)
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02)
    return twin


def torch_optimizer(model):
    import torch
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True), "fused"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS), "default"


def torch_trainer(cfg):
    import torch
    torch.manual_seed(0)
    model = torch_model(cfg)
    model.train()
    opt, _ = torch_optimizer(model)
    data = batches(token_stream(), cfg["batch_size"], cfg["block_size"], seed=1)

    def step():
        x, y = next(data)
        loss = model(torch.from_numpy(x), torch.from_numpy(y), DROPOUT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss.item()
    return step


def worker(impl, config_name, warmup):
    t_start = time.perf_counter()
    if impl != "torch":
        import randygpt  # noqa: F401  first: its thread policy must precede NumPy's OpenBLAS
    cfg = CONFIGS[config_name]
    step = torch_trainer(cfg) if impl == "torch" else randygpt_trainer(cfg, impl)
    t0 = time.perf_counter()
    step()                                           # numba: compile or load the cache here
    first_step = time.perf_counter() - t0
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t0)
    info = dict(ready=True, startup_s=t_start - float(os.environ.get("RANDYGPT_BENCH_T0", t_start)),
                setup_s=time.perf_counter() - t_start, first_step_s=first_step,
                step_s=statistics.median(warm) if warm else first_step)
    kernels = getattr(step, "kernels", None)
    if kernels is not None:
        from randygpt.ops.fused import choose
        threads = choose.thread_choice()
        info["kernels"] = [f"{kernels.mode}: " + ("; ".join(kernels.summary())
                                                  or f"every product on {kernels.mode}"),
                           f"threads {threads.mode}: " + "; ".join(threads.summary())]
    if impl == "torch":
        import torch
        info.update(threads=torch.get_num_threads(),
                    peak_gflops=sgemm_peak(torch.mm, lambda n: torch.randn(n, n)))
    print(json.dumps(info), flush=True)
    tokens_per_step = cfg["batch_size"] * cfg["block_size"]
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            n = int(cmd[1])
            t0 = time.perf_counter()
            for _ in range(n):
                loss = step()
            dt = time.perf_counter() - t0
            print(json.dumps(dict(tokens_per_s=n * tokens_per_step / dt, steps=n, seconds=dt,
                                  loss=float(loss))), flush=True)
        elif cmd[0] == "quit":
            rss = peak_rss_mb()
            print(json.dumps(dict(peak_rss_mb=rss)), flush=True)
            return


def check_same_model():
    """The PyTorch model and randyGPT on the same weights and batch (no dropout, float64):
    largest relative differences of the loss and of the gradients (every parameter)."""
    import numpy as np
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from randygpt.model import GPT
    from torch_twin import TorchGPT
    cfg = dict(n_layer=2, n_embd=32, n_head=4, block_size=16, batch_size=3)
    ours = GPT(model_config(cfg, dropout=0.0), seed=3, dtype=np.float64)
    theirs = TorchGPT.from_randygpt(ours)
    x, y = next(batches(token_stream(5000), 3, 16, seed=4))
    loss = ours.forward(x, y)[1]
    ours.backward()
    t_loss = theirs(torch.from_numpy(x), torch.from_numpy(y), 0.0)
    t_loss.backward()
    t_grads = theirs.grads()
    grad_err = max(float(np.abs(ours.grads[k] - t_grads[k]).max() / np.abs(ours.grads[k]).max())
                   for k in theirs.names)
    return abs(loss - float(t_loss.detach())) / abs(loss), grad_err


def generation_worker(impl, n_tokens):
    """Single-stream tokens/s on config A's shape: randyGPT's KV-cache decoder (the path of
    `randygpt generate`), or PyTorch nanoGPT-style (full forward over the window per token)."""
    import numpy as np
    sys.path[:0] = [os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")]
    from randygpt.config import ModelConfig
    from randygpt.model import GPT
    cfg = CONFIGS["A"]
    mcfg = ModelConfig(vocab_size=VOCAB, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                       n_embd=cfg["n_embd"], n_head=cfg["n_head"], dropout=0.0)
    model = GPT(mcfg, seed=0, backend="reference" if impl == "torch" else impl)
    prompt = list(range(1, 17))
    if impl == "torch":
        from bench_generate import torch_rate
        rate = torch_rate(model, prompt, n_tokens)[0]
    else:
        from randygpt.blas import set_blas_threads
        from randygpt.sample import SamplingConfig
        from randygpt.session import generate
        from randygpt.tokenizer import CharTokenizer
        set_blas_threads(1)                       # as `randygpt generate` does
        if impl == "fused":
            from randygpt.ops.fused import decode
            decode.COMPILE_AFTER_S = 0            # the compiled step from the first token
        tok = CharTokenizer("".join(chr(65 + i) for i in range(VOCAB - 2)))
        tok.eos_id = -1                           # never sampled: every run makes n tokens
        list(generate(model, tok, prompt, 4))     # compile / load kernels first
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            made = sum(e.token is not None for e in generate(
                model, tok, prompt, n_tokens, SamplingConfig(temperature=0.8),
                rng=np.random.default_rng(0)))
            best = min(best, time.perf_counter() - t0)
        rate = made / best
    print(json.dumps(dict(tokens_per_s=rate)), flush=True)


# --------------------------------------------------------------------------------------------
# The parent: start workers, alternate rounds, print the table.

class Worker:
    def __init__(self, impl, config_name, warmup):
        env = dict(os.environ, PYTHONPATH=ROOT, RANDYGPT_BENCH_T0=repr(time.perf_counter()))
        env.update(ABLATIONS[impl][1] if impl in ABLATIONS else {})
        self.impl = impl
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={impl}", "--config",
             config_name, "--warmup", str(warmup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self.read()

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.impl} worker died (exit code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        out = self.ask("quit")
        self.proc.wait()
        return out


def label(impl):
    return IMPL_NAMES.get(impl, impl)


def run_config(name, impls, rounds, round_seconds, peak, baseline="torch"):
    """Alternating rounds of every implementation on one config: medians, and the median of
    the per-round ratios to `baseline`."""
    cfg = CONFIGS[name]
    print(f"\nconfig {name}: {cfg['n_layer']}L/{cfg['n_embd']}d/{cfg['n_head']}h, block "
          f"{cfg['block_size']}, batch {cfg['batch_size']}: "
          f"{flops_per_token(cfg) / 1e6:.2f} MFLOP per token", flush=True)
    workers = []
    try:
        for impl in impls:          # one at a time, so start-up is not timed under load
            w = Worker(impl, name, warmup=2)
            workers.append(w)
            print(f"  {label(impl):<19} ready: first step {w.info['first_step_s']:.2f} s, "
                  f"then {w.info['step_s'] * 1000:.0f} ms/step", flush=True)
            for line in w.info.get("kernels", []):
                print(f"    kernels ({line})", flush=True)
        if "torch" in impls:
            peak = max(peak, workers[impls.index("torch")].info["peak_gflops"])
        rates = {w.impl: [] for w in workers}
        for r in range(rounds):
            order = workers[r % len(workers):] + workers[:r % len(workers)]
            for w in order:
                time.sleep(0.3)     # let the previous worker's threads go idle
                n = max(1, round(round_seconds / w.info["step_s"]))
                rates[w.impl].append(w.ask(f"run {n}")["tokens_per_s"])
            print(f"  round {r + 1}: " + ", ".join(f"{label(i)} {rates[i][-1]:,.0f}"
                                                  for i in rates), flush=True)
        rss = {w.impl: w.close()["peak_rss_mb"] for w in workers}
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    result = {}
    for impl in rates:
        med = statistics.median(rates[impl])
        result[impl] = dict(tokens_per_s=med, mfu=med * flops_per_token(cfg) / (peak * 1e9),
                            peak_rss_mb=rss[impl], first_step_s=workers[impls.index(impl)]
                            .info["first_step_s"])
    if baseline in rates:
        for impl in rates:
            ratios = [a / b for a, b in zip(rates[impl], rates[baseline])]
            result[impl]["ratio"] = statistics.median(ratios)
    return result, peak


def run_ablation(configs, rounds, round_seconds, only=None):
    """What each optimisation is worth: the full fast path against itself with one
    optimisation taken out, alternating, as the speed-up that optimisation gives."""
    impls = ["fused"] + [a for a in ABLATIONS if a != "fused" and (not only or a in only)]
    for name in configs:
        res, _ = run_config(name, impls, rounds, round_seconds, 1.0, baseline="fused")
        print(f"\nablation, config {name} (medians over {rounds} alternating rounds):")
        print(f"  {'taken out':<66}{'tokens/s':>10}{'it is worth':>13}")
        for impl in impls:
            what = ABLATIONS[impl][0]
            worth = "-" if impl == "fused" else f"{1 / res[impl]['ratio']:.2f}x"
            print(f"  {what:<66}{res[impl]['tokens_per_s']:>10,.0f}{worth:>13}")


def startup_times():
    """Seconds to the end of the first fused training step (config A) with an empty numba
    cache and then with the cache written by that run."""
    import tempfile
    times = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):
            env = dict(os.environ, PYTHONPATH=ROOT, NUMBA_CACHE_DIR=cache)
            t0 = time.perf_counter()
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "fused",
                                  "--config", "A", "--warmup", "0"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
            p.stdout.readline()
            times.append(time.perf_counter() - t0)
            p.communicate("quit\n")
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["A", "B"], choices=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-seconds", type=float, default=4.0,
                    help="training time per implementation per round")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip randyGPT's NumPy reference (it is slow on config B)")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--no-startup", action="store_true",
                    help="skip the cold/warm numba cache start-up measurement")
    ap.add_argument("--ablation", action="store_true",
                    help="instead: the fused path with each optimisation taken out in turn")
    ap.add_argument("--ablations", nargs="+", metavar="NAME",
                    choices=[a.lstrip("-") for a in ABLATIONS if a != "fused"],
                    help="with --ablation: only these, named without their '-' (default: all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker and args.generate:
        return generation_worker(args.worker, args.generate)
    if args.worker:
        return worker(args.worker, args.config, args.warmup)

    if args.ablation:
        return run_ablation(args.configs, args.rounds, args.round_seconds,
                            ["-" + a for a in args.ablations or []])
    sys.path.insert(0, ROOT)
    import randygpt  # noqa: F401  first: its thread policy, so this process's pools sleep too
    import numpy as np
    torch_ok = have_torch()
    impls = ["fused"] + ([] if args.no_reference else ["reference"]) + (["torch"] if torch_ok else [])
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from machine import cpu_ticks, describe, steal_line
    print(describe())
    ticks = cpu_ticks()
    print(f"{os.cpu_count()} CPU(s); numpy {np.__version__}; "
          + (f"torch {__import__('torch').__version__}" if torch_ok else
             "PyTorch is not installed: reporting randyGPT alone "
             "(`.venv/bin/pip install torch==2.13.0` adds the comparison)"))
    if torch_ok:
        rel_loss, rel_grad = subprocess_check()
        print(f"same model check (float64, same weights and batch): PyTorch's loss differs by "
              f"{rel_loss:.1e}, its gradients by {rel_grad:.1e} (relative)")
    peak = sgemm_peak(np.matmul, lambda n: np.random.default_rng(0).standard_normal(
        (n, n), dtype=np.float32))
    own = own_sgemm_peak()
    print(f"float32 matmul peak: NumPy/OpenBLAS {peak:.0f} GFLOP/s (2048^3), randyGPT's own "
          f"sgemm {own:.0f} GFLOP/s ((4096 x 512) @ (512 x 128))")
    peak = max(peak, own)

    results = {}
    for name in args.configs:
        results[name], peak = run_config(name, impls, args.rounds, args.round_seconds, peak)

    print(f"\nmedians over {args.rounds} alternating rounds; MFU against a {peak:.0f} GFLOP/s "
          "float32 matmul peak:")
    print(f"{'config':<7}{'implementation':<20}{'tokens/s':>10}{'vs PyTorch':>12}{'MFU':>7}"
          f"{'peak RSS':>11}")
    for name, res in results.items():
        for impl, r in res.items():
            ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
            print(f"{name:<7}{label(impl):<20}{r['tokens_per_s']:>10,.0f}{ratio:>12}"
                  f"{r['mfu'] * 100:>6.1f}%{r['peak_rss_mb']:>8,.0f} MiB")
        if "torch" in res:
            print(f"{'':<7}memory: randyGPT fused uses "
                  f"{res['fused']['peak_rss_mb'] / res['torch']['peak_rss_mb']:.2f}x PyTorch's "
                  "peak RSS")

    if not args.no_startup:
        cold, warm = startup_times()
        print(f"\nstart-up to the end of the first fused training step (config A): "
              f"{cold:.1f} s with an empty numba cache (compiling), {warm:.1f} s with it warm")
    if not args.no_generation:
        print("\nsingle-stream generation, config A shape, 500 tokens, best of 3:")
        for impl in ["reference", "fused"] + (["torch"] if torch_ok else []):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", impl,
                                  "--generate", "500"], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=ROOT))
            rate = json.loads(out.stdout.splitlines()[-1])["tokens_per_s"] if out.returncode == 0 \
                else float("nan")
            what = {"reference": "randyGPT reference (KV cache, `randygpt generate`)",
                    "fused": "randyGPT fused (KV cache, one compiled step)",
                    "torch": "PyTorch (nanoGPT-style, no cache)"}[impl]
            print(f"  {what:<50} {rate:>8,.0f} tokens/s")
    print(steal_line(ticks))


def subprocess_check():
    out = subprocess.run([sys.executable, "-c",
                          "import sys; sys.path.insert(0, sys.argv[1]); "
                          "import compare_pytorch as c; print(*c.check_same_model())",
                          os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                         check=True)
    return tuple(float(v) for v in out.stdout.split())


if __name__ == "__main__":
    main()
