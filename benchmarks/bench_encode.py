"""Encoding speed: time to tokenize Tiny Shakespeare, BPE and char, and the token cache.

    python benchmarks/bench_encode.py [--data PATH] [--vocab 1024] [--repeat 5]

Prints, for the text: BPE training time; the best-of-N time of BPETokenizer.encode (chunked,
see tokenizer._safe_chunks) next to its peer, one `tokenizers` encode call on the whole text
(the same ids), and the char tokenizer; the time to read the ids back from the token cache;
and characters per token for a few vocabulary sizes.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from randygpt.data import load_documents  # noqa: E402
from randygpt.tokenizer import BPETokenizer, CharTokenizer  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "tinyshakespeare.txt")


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"no data at {args.data}; pass --data PATH")
    text = open(args.data, encoding="utf-8").read()
    mb = len(text.encode("utf-8")) / 1e6
    print(f"text: {args.data} ({len(text):,} characters, {mb:.2f} MB)")

    t_train, bpe = best_of(lambda: BPETokenizer.train(text, args.vocab), 1)
    print(f"BPE training, vocab {args.vocab}: {t_train:.2f} s")

    t_ours, ids = best_of(lambda: bpe.encode(text), args.repeat)
    t_one, ref = best_of(lambda: np.asarray(
        bpe._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32), args.repeat)
    assert np.array_equal(ids, ref), "chunked encoding changed the ids"
    char = CharTokenizer.from_text(text)
    t_char, _ = best_of(lambda: char.encode(text), args.repeat)
    print(f"BPE encode (chunked, ours):      {t_ours:.3f} s  {mb / t_ours:6.1f} MB/s  "
          f"{len(ids):,} tokens")
    print(f"BPE encode (one tokenizers call): {t_one:.3f} s  {mb / t_one:6.1f} MB/s  "
          f"ratio {t_one / t_ours:.2f}x (same ids)")
    print(f"char encode:                     {t_char:.3f} s  {mb / t_char:6.1f} MB/s")

    with tempfile.TemporaryDirectory() as cache:
        quiet = dict(log=lambda *_: None, progress=False)
        t_miss, _ = best_of(lambda: load_documents(text, bpe, None, cache, **quiet), 1)
        t_hit, _ = best_of(lambda: load_documents(text, bpe, None, cache, **quiet), args.repeat)
    print(f"load_documents, BPE: {t_miss:.3f} s encoding + writing the cache, "
          f"{t_hit:.3f} s from the cache (hash + load), {t_miss / t_hit:.1f}x")

    print("characters per token:")
    for n in (512, 1024, 2048, 4096):
        tok = bpe if n == args.vocab else BPETokenizer.train(text, n)
        print(f"  vocab {n:5d}: {len(text) / len(tok.encode(text)):.2f}")
    print(f"  char  {char.vocab_size:5d}: 1.00")


if __name__ == "__main__":
    main()
