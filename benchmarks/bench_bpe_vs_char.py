"""Char vs byte-level BPE at equal wall time: validation bits per character.

    python benchmarks/bench_bpe_vs_char.py [--minutes 4] [--preset small] [--bpe 1024]

For each tokenizer: time a few training steps, choose --iters so the run takes about
--minutes (so the LR schedule completes), train with randygpt.train.train, and measure bits
per character two ways: the run's own last val estimate (random windows of its val split), and
a full pass (randygpt.evaluate.evaluate_text) over the text that both runs held out: the
characters after the later of the two val split starts. Loss per token is not comparable
between tokenizers; bits per character is. The machine may be shared, which makes timing
noisy: both are calibrated before either trains (each keeps its fastest of three alternating
short runs), and the report prints the wall time each run really took.
"""
import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from randygpt.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from randygpt.data import load_documents, split_documents  # noqa: E402
from randygpt.evaluate import evaluate_text  # noqa: E402
from randygpt.runs import plan_run  # noqa: E402
from randygpt.tokenizer import BPETokenizer, CharTokenizer  # noqa: E402
from randygpt.train import train  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "tinyshakespeare.txt")


def configs(preset: str, vocab_size: int, iters: int = 1):
    p = PRESETS[preset]
    mcfg = ModelConfig(vocab_size=vocab_size, n_layer=p["n_layer"], n_embd=p["n_embd"],
                       n_head=p["n_head"], block_size=p["block_size"])
    tcfg = TrainConfig(iters=iters, batch_size=p["batch_size"], warmup=min(100, iters // 10),
                       eval_interval=max(1, iters // 4), eval_iters=20)
    return mcfg, tcfg


def step_seconds(mcfg, tcfg, text, bpe) -> float:
    """Seconds per training step of this shape, from a short train() run (the same code path)."""
    tcfg = replace(tcfg, iters=20, eval_interval=20, eval_iters=1)
    r = train(plan_run(mcfg, tcfg, text=text, bpe_vocab_size=bpe), sample_tokens=0,
              progress=False, log=lambda *_: None)
    return tcfg.batch_size * mcfg.block_size / r.history[-1]["tokens_per_sec"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--bpe", type=int, default=1024)
    args = ap.parse_args()
    text = open(args.data, encoding="utf-8").read()
    quiet = dict(log=lambda *_: None)

    tokenizers = {"char": CharTokenizer.from_text(text), "bpe": BPETokenizer.train(text, args.bpe)}
    val_start = {}
    for name, tok in tokenizers.items():
        docs = load_documents(text, tok, progress=False, **quiet)
        split = split_documents(docs, PRESETS[args.preset]["block_size"], tok.decode)
        val_start[name] = len(text) - split.val.n_chars
    held_out = text[max(val_start.values()):]
    print(f"{args.data}: {len(text):,} characters; common held-out text: the last "
          f"{len(held_out):,} characters; preset {args.preset}; budget {args.minutes} min each")

    # calibrate both before training either, alternating, and keep each one's fastest: on a
    # shared machine the fastest is the least disturbed by other work
    bpe_of = {"char": None, "bpe": args.bpe}
    steps = {name: [] for name in tokenizers}
    for _ in range(3):
        for name, tok in tokenizers.items():
            steps[name].append(step_seconds(*configs(args.preset, tok.vocab_size), text,
                                            bpe_of[name]))
    for name, tok in tokenizers.items():
        bpe, step = bpe_of[name], min(steps[name])
        iters = max(10, int(args.minutes * 60 / step))
        mcfg, tcfg = configs(args.preset, tok.vocab_size, iters)
        t0 = time.perf_counter()
        r = train(plan_run(mcfg, tcfg, text=text, bpe_vocab_size=bpe), sample_tokens=0,
                  progress=False, **quiet)
        wall = time.perf_counter() - t0
        ev = evaluate_text(r.model, r.tokenizer, held_out)
        seen = iters * tcfg.batch_size * mcfg.block_size
        print(f"{name:4s} vocab {tok.vocab_size:5d}: {iters} iters ({step * 1e3:.0f} ms/step "
              f"calibrated) in {wall:.0f} s, {seen:,} tokens seen; val loss "
              f"{r.history[-1]['val_loss']:.4f}/token, val bpc {r.history[-1]['val_bpc']:.4f} "
              f"(estimate); held-out pass: {ev.bits_per_char:.4f} bpc over {ev.tokens:,} tokens")


if __name__ == "__main__":
    main()
