"""Training throughput of randyGPT: tokens/s for a preset on Tiny Shakespeare.

    python benchmarks/train_throughput.py [--preset small] [--iters 30] [--data PATH]

Times whole training steps (forward, backward, clipping, AdamW) after a few warm-up steps, for
the path `randygpt train` uses (fused numba kernels) and for the readable NumPy reference,
alternating the two, and prints the median step time, tokens/s and their ratio. Uses
../shared/data/tinyshakespeare.txt by default. For the PyTorch comparison see
compare_pytorch.py.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from randygpt.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from randygpt.data import get_batch  # noqa: E402
from randygpt.model import GPT  # noqa: E402
from randygpt.ops.contract import get_backend  # noqa: E402
from randygpt.step import make_optimizer, train_step  # noqa: E402
from randygpt.tokenizer import CharTokenizer  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "tinyshakespeare.txt")


def step_times(model, opt, tokens, batch, iters):
    batch_rng, drop_rng = np.random.default_rng(0), np.random.default_rng(1)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        x, y = get_batch(tokens, batch, model.cfg.block_size, batch_rng)
        train_step(model, opt, x, y, 1e-3, grad_clip=1.0, dropout_rng=drop_rng)
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--data", default=DEFAULT_DATA)
    args = ap.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"no corpus at {args.data}: pass --data PATH (see the README for Tiny Shakespeare)")
    text = open(args.data, encoding="utf-8").read()
    tok = CharTokenizer.from_text(text)
    tokens = tok.encode(text)
    p = PRESETS[args.preset]
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=p["block_size"], n_layer=p["n_layer"],
                      n_embd=p["n_embd"], n_head=p["n_head"], dropout=0.1)
    runs = {}
    for name in ("fused", "reference"):
        backend = get_backend(name)
        model = GPT(cfg, seed=0, backend=backend)
        opt = make_optimizer(model, TrainConfig(), backend)
        step_times(model, opt, tokens, p["batch_size"], 3)          # warm-up (and compilation)
        runs[name] = (model, opt, [])
    for _ in range(args.iters):                                    # alternate, one step each
        for model, opt, times in runs.values():
            times += step_times(model, opt, tokens, p["batch_size"], 1)
    tokens_per_step = p["batch_size"] * cfg.block_size
    print(f"preset {args.preset}: {runs['fused'][0].num_params:,} params, batch "
          f"{p['batch_size']} x block {cfg.block_size} = {tokens_per_step} tokens/step")
    median = {name: statistics.median(times) for name, (_, _, times) in runs.items()}
    for name, step in median.items():
        print(f"  {name:9s} median step {step * 1000:7.1f} ms  ->  "
              f"{tokens_per_step / step:8,.0f} tokens/s")
    print(f"  fused / reference: {median['reference'] / median['fused']:.2f}x")


if __name__ == "__main__":
    main()
