"""Issue 15, item 1: on a corpus of short documents, does the logged val loss match the exact
per-token val loss, and do generated documents have the corpus's length?

    .venv/bin/python benchmarks/names_weighting.py [CODE_DIR] [--iters N]

Makes ~30k names-like words (a seeded letter Markov source, one per line), trains a tiny model
on them with the CODE_DIR's randygpt (default: this tree) and --doc-separator '\\n', then
prints the val loss the run logged, what that estimator averages to (its batches over 300
batches instead of 20), the exact loss over every token of its validation split (each
document BOS ... EOS in one window, each target once) and the mean length of 2000
generated documents against the corpus's mean. Run it on two trees to compare them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VOWELS, CONSONANTS = "aeiouy", "bcdfghjklmnprstvwz"


def make_names(n: int = 30000, seed: int = 0) -> list[str]:
    """Names-like words: alternating consonant/vowel runs with a skewed letter choice and a
    length that is geometric-ish (mean about 6), so lengths spread from 2 to ~15."""
    rng = np.random.default_rng(seed)
    pv = rng.dirichlet(np.ones(len(VOWELS)) * 0.7)
    pc = rng.dirichlet(np.ones(len(CONSONANTS)) * 0.5)
    names = []
    for _ in range(n):
        length = 2 + min(rng.geometric(0.22), 14)
        vowel = rng.random() < 0.35
        s = []
        while len(s) < length:
            s.append(rng.choice(list(VOWELS), p=pv) if vowel else
                     rng.choice(list(CONSONANTS), p=pc))
            vowel = not vowel if rng.random() < 0.8 else vowel
        names.append("".join(s))
    return names


def main() -> None:
    args = sys.argv[1:]
    iters = "800"
    if "--iters" in args:
        i = args.index("--iters")
        iters = args[i + 1]
        del args[i:i + 2]
    code = os.path.abspath(args[0]) if args else ROOT
    sys.path.insert(0, code)
    work = tempfile.mkdtemp(prefix="names-")
    names = make_names()
    data = os.path.join(work, "names.txt")
    with open(data, "w") as f:
        f.write("\n".join(names) + "\n")
    out = os.path.join(work, "run")
    cmd = [sys.executable, "-m", "randygpt", "train", "--data", data, "--doc-separator", "\\n",
           "--preset", "tiny", "--block", "32", "--iters", iters, "--eval-interval", iters,
           "--warmup", "50", "--dropout", "0", "--sample-tokens", "0", "--no-progress",
           "--out", out]
    r = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    logged = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])

    from randygpt.checkpoint import load_checkpoint
    from randygpt.data import load_documents, split_documents
    from randygpt.evaluate import token_nats
    from randygpt.session import complete
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.safetensors"))
    model, tok = ckpt.model, ckpt.tokenizer
    docs = load_documents(open(data).read(), tok, "\n", log=lambda *a: None)
    try:        # a tree with the seeded random split of documents
        split = split_documents(docs, 32, tok.decode, seed=ckpt.train_config.seed,
                                shuffle=True)
    except TypeError:
        split = split_documents(docs, 32, tok.decode)
    val = split.val
    total, count = 0.0, 0
    for d in range(val.n_docs):      # each piece BOS ... EOS fits one window (names are short)
        ids = val.tokens[val.bounds[d]:val.bounds[d + 1]].astype(np.int64)
        nats = token_nats(model, ids[None, :-1], ids[None, 1:])
        total += float(nats.sum())
        count += len(ids) - 1
    # what the logged estimate averages to: the training loop's estimator (batches of
    # get_batch, weighted by their targets) over many more batches than one evaluation
    from randygpt.data import get_batch
    brng, est_total, est_count = np.random.default_rng(2), 0.0, 0
    for _ in range(300):
        x, y = get_batch(val, 32, 32, brng)
        keep = y >= 0
        nats = token_nats(model, x, np.where(keep, y, 0))
        est_total += float(nats[keep].sum())
        est_count += int(keep.sum())
    rng = np.random.default_rng(1)
    lengths = [len(complete(model, tok, "", max_tokens=60, rng=rng)) for _ in range(2000)]
    print(json.dumps(dict(code=code, iters=int(iters), logged_val_loss=logged["val_loss"],
                          estimator_mean_300_batches=round(est_total / est_count, 4),
                          exact_val_loss=round(total / count, 4), val_targets=count,
                          generated_mean_len=round(float(np.mean(lengths)), 3),
                          corpus_mean_len=round(float(np.mean([len(n) for n in names])), 3))))


if __name__ == "__main__":
    main()
