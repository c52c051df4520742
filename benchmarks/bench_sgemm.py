"""randyGPT's own sgemm (ops/fused/sgemm.py) against NumPy's OpenBLAS, on the training step's shapes.

    .venv/bin/python benchmarks/bench_sgemm.py [--configs A B] [--repeats 30]

For each linear layer of configs A (small preset, 2048 positions, 128 channels) and B (16384
positions, 256 channels): the forward x @ W and the input gradient dout @ W^T (sgemm.sgemm),
and the weight gradient x^T dout (sgemm.sgemm_deep, split over positions). Both run in this
process, alternating call by call; prints median GFLOP/s, the ratio, which one training
runs for that shape (the fused backend's measured decision, ops/fused/choose.py: read from
its decision file, or timed now and kept there, as a training run would), and the sum over
one training step. Prints the CPU, the BLAS and its kernel family, and the load first.
"""
import argparse
import os
import statistics
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]

import randygpt  # noqa: E402,F401  (thread policy before NumPy)
import numpy as np  # noqa: E402

from machine import describe  # noqa: E402
from randygpt.ops.fused import choose, sgemm  # noqa: E402

CONFIGS = {"A": (2048, 128, 6), "B": (16384, 256, 6)}     # positions, channels, layers
VOCAB = 67


def timed_pair(f, g, repeats):
    f(), g()
    tf, tg = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        t1 = time.perf_counter()
        g()
        tg.append(time.perf_counter() - t1)
        tf.append(t1 - t0)
    return statistics.median(tf), statistics.median(tg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["A", "B"], choices=sorted(CONFIGS))
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    print(describe())
    choice = choose.KernelChoice()
    print(f"kernel choice: {choice.mode} (RANDYGPT_SGEMM), decisions in {choice.path}")
    rng = np.random.default_rng(0)
    for name in args.configs:
        N, C, L = CONFIGS[name]
        print(f"\nconfig {name}: {N} positions, {C} channels")
        print(f"  {'layer':<12}{'product':<16}{'OpenBLAS':>10}{'own':>10}{'ratio':>8}")
        step = {"OpenBLAS": 0.0, "own": 0.0}
        for layer, (i, o) in {"qkv": (C, 3 * C), "attn.proj": (C, C), "mlp.fc": (C, 4 * C),
                              "mlp.proj": (4 * C, C), "lm_head": (C, VOCAB)}.items():
            x = rng.standard_normal((N, i)).astype(np.float32)
            w = rng.standard_normal((i, o)).astype(np.float32)
            d = rng.standard_normal((N, o)).astype(np.float32)
            for product, a, b in (("x @ W", x, w), ("dout @ W^T", d, w.T), ("x^T dout", x.T, d)):
                out = np.empty((a.shape[0], b.shape[1]), np.float32)
                deep = product == "x^T dout"
                own = sgemm.sgemm_deep if deep else sgemm.sgemm
                t_ob, t_own = timed_pair(lambda: np.matmul(a, b, out=out),
                                         lambda: own(a, b, out), args.repeats)
                flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
                takes_own = choice.kernel("deep" if deep else "rows", a, b, out) == "own"
                times = L if layer != "lm_head" else 1
                step["OpenBLAS"] += times * t_ob
                step["own"] += times * (t_own if takes_own else t_ob)
                note = "  (training: own)" if takes_own else "  (training: OpenBLAS)"
                print(f"  {layer:<12}{product:<16}{flops / t_ob / 1e9:>7.0f} GF"
                      f"{flops / t_own / 1e9:>7.0f} GF{t_ob / t_own:>7.2f}x{note}")
        print(f"  one training step's matmuls: OpenBLAS only {step['OpenBLAS'] * 1e3:.1f} ms, "
              f"as training runs them {step['own'] * 1e3:.1f} ms "
              f"({step['OpenBLAS'] / step['own']:.2f}x)")


if __name__ == "__main__":
    main()
