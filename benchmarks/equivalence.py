"""Behaviour fingerprint of training and generation, to prove a refactor changed nothing.

    .venv/bin/python benchmarks/equivalence.py record OUT.json
    .venv/bin/python benchmarks/equivalence.py compare BASELINE.json

For several configurations (char and BPE tokenizers, documents, dropout, both backends, a
resumed run) it trains through the command line, then records every logged loss, the SHA-256
of every tensor of the final checkpoint (weights and both AdamW moments), the end-of-run
sample, and a greedy and a seeded sample from `randygpt generate`. `compare` runs the same
and reports every difference, exiting 1 if there is any. Only the command line is used, so
the same script measures the code before and after a redesign (`--reference-ops` became
`--backend reference`; the script asks `train --help` which one exists).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SAMPLE = os.path.join(ROOT, "randygpt", "sample_text.txt")
BASE = ["--data", SAMPLE, "--preset", "tiny", "--iters", "150", "--eval-interval", "50",
        "--warmup", "20", "--eval-iters", "4", "--sample-tokens", "80", "--no-progress", "--seed", "7"]
CONFIGS = {
    "char-fused-dropout": [],
    "char-reference": ["@reference"],
    "char-nodropout-wide": ["--dropout", "0", "--dim", "96", "--heads", "6", "--block", "48"],
    "bpe-documents": ["--bpe", "300", "--doc-separator", "\\n\\n", "--dropout", "0.2"],
    "char-documents-reference": ["--doc-separator", "\\n", "@reference"],
}


def cli(*args, check=True):
    # OpenBLAS for every product, as when the baseline was recorded: the measured kernel
    # choice (ops/fused/choose.py) would make the bits depend on which kernel won here
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.setdefault("RANDYGPT_SGEMM", "blas")
    r = subprocess.run([sys.executable, "-m", "randygpt", *args], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=900)
    if check and r.returncode != 0:
        raise SystemExit(f"randygpt {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


def reference_flag() -> list[str]:
    help_text = cli("train", "--help").stdout
    return ["--backend", "reference"] if "--backend" in help_text else ["--reference-ops"]


def tensor_hashes(path: str) -> dict:
    from safetensors.numpy import load_file
    return {k: hashlib.sha256(v.tobytes()).hexdigest()[:16]
            for k, v in sorted(load_file(path).items())}


def losses(run_dir: str) -> list:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in rows]


def fingerprint(name: str, extra: list[str], workdir: str) -> dict:
    ref = reference_flag()
    flags = [f for e in extra for f in (ref if e == "@reference" else [e])]
    out = os.path.join(workdir, name)
    stdout = cli("train", *BASE, *flags, "--out", out).stdout
    sample = stdout.split("--- sample ---\n", 1)[-1]
    ckpt = os.path.join(out, "checkpoint.safetensors")
    greedy = cli("generate", "--checkpoint", ckpt, "--temperature", "0", "--max-tokens", "60",
                 "--prompt", "The ").stdout
    seeded = cli("generate", "--checkpoint", ckpt, "--temperature", "0.9", "--top-k", "20",
                 "--seed", "3", "--max-tokens", "60", "--num-samples", "2").stdout
    record = dict(losses=losses(out), tensors=tensor_hashes(ckpt), train_sample=sample,
                  greedy=greedy, seeded=seeded)
    if name == "char-fused-dropout":
        # a run stopped by SIGINT after its first evaluation and resumed must end where the
        # uninterrupted run ended
        out2 = os.path.join(workdir, name + "-resumed")
        env = dict(os.environ, PYTHONHASHSEED="0")
        env.setdefault("RANDYGPT_SGEMM", "blas")
        p = subprocess.Popen([sys.executable, "-m", "randygpt", "train", *BASE, *flags,
                              "--out", out2], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        metrics = os.path.join(out2, "metrics.jsonl")
        while p.poll() is None and not (os.path.exists(metrics) and os.path.getsize(metrics)):
            time.sleep(0.005)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=300)
        cli("train", "--resume", "--out", out2, "--no-progress", "--sample-tokens", "0")
        record["resumed_tensors"] = tensor_hashes(os.path.join(out2, "checkpoint.safetensors"))
    return record


def run_all() -> dict:
    with tempfile.TemporaryDirectory() as d:
        return {name: fingerprint(name, extra, d) for name, extra in CONFIGS.items()}


def diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'baseline' if k in a else 'now'}")
            else:
                out += diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        a, b = [list(x) if isinstance(x, tuple) else x for x in a], list(b)
    return [] if a == b else [f"{path}: baseline {a!r} != now {b!r}"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("record", "compare"):
        print(__doc__)
        return 2
    now = json.loads(json.dumps(run_all()))
    if argv[0] == "record":
        with open(argv[1], "w") as f:
            json.dump(now, f, indent=1, sort_keys=True)
        print(f"recorded {len(now)} configurations in {argv[1]}")
        return 0
    with open(argv[1]) as f:
        baseline = json.load(f)
    problems = diff(baseline, now)
    for p in problems:
        print(p)
    n = sum(len(r["tensors"]) + len(r.get("resumed_tensors", {})) for r in now.values())
    print(f"{len(now)} configurations, {n} tensor hashes, losses and 4 samples each: "
          + ("IDENTICAL" if not problems else f"{len(problems)} differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
