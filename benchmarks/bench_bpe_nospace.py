"""BPE training time on text without spaces (issue 15 item 14): the byte-level pre-tokenizer
splits at spaces, so a text without any is one huge word, and the trainer's pair updates on
it were slow. Prints the seconds for text with spaces, without, and without spaces through
the old path (one piece per document), on the same machine in the same run.

    .venv/bin/python benchmarks/bench_bpe_nospace.py [KB]
"""
import os
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from randygpt.data import builtin_sample_text                      # noqa: E402
from randygpt.tokenizer import DEFAULT_BPE_VOCAB, BPETokenizer     # noqa: E402


def timed(texts, **kw):
    t0 = time.perf_counter()
    tok = BPETokenizer.train(texts, DEFAULT_BPE_VOCAB, **kw)
    return time.perf_counter() - t0, tok


def main():
    kb = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    base = builtin_sample_text()
    spaced = (base * (kb * 1000 // len(base) + 1))[:kb * 1000]
    letters = "".join(c for c in base if c.isalpha())    # like CJK text: one letter run
    spaceless = (letters * (kb * 1000 // len(letters) + 1))[:kb * 1000]
    for name, text, kw in (("with spaces", spaced, {}), ("no spaces", spaceless, {}),
                           ("no spaces, old path", spaceless, {"max_word": None})):
        s, tok = timed(text, **kw)
        ratio = len(text) / len(tok.encode(text))
        print(f"{name:22s} {len(text) / 1000:6.0f} KB  {s:7.2f} s  {ratio:.2f} chars/token")


if __name__ == "__main__":
    main()
