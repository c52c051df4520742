"""Shared by the serve tests: a tiny checkpoint and a real `randygpt serve` on 127.0.0.1."""
import functools
import os
import socket
import subprocess
import sys
import time

import numpy as np


from randygpt.checkpoint import save_checkpoint
from randygpt.config import ModelConfig
from randygpt.model import GPT
from randygpt.optim import AdamW
from randygpt.step import train_step
from randygpt.tokenizer import CharTokenizer

# every character the chat template and the tests type
TEXT = "the quick brown fox jumps over the lazy dog. THE END!\nUser: Assistant:"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(block=32, seed=1, iters=40):
    """A 2-layer char model trained `iters` steps on TEXT (never an end of document), so it
    writes letters and spaces, and long streams rarely end early at EOS. Trained once per
    process: each call gets its own copy."""
    model, tok = _trained(block, seed, iters)
    copy = GPT(model.cfg, seed=None)
    copy.params.flat[...] = model.params.flat
    return copy, tok


@functools.lru_cache(maxsize=None)
def _trained(block, seed, iters):
    tok = CharTokenizer(TEXT)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=2, n_embd=32,
                      n_head=4, dropout=0.0)
    model = GPT(cfg, seed=seed)
    data = tok.encode(TEXT * 8).astype(np.int64)
    rng = np.random.default_rng(seed)
    opt = AdamW(model.params.flat, model.decay_mask(), 0.9, 0.99, weight_decay=0.0,
                backend="reference")
    for _ in range(iters):
        starts = rng.integers(0, len(data) - block - 1, 8)
        x = np.stack([data[i:i + block] for i in starts])                  # (8, block)
        y = np.stack([data[i + 1:i + block + 1] for i in starts])
        train_step(model, opt, x, y, 1e-2, grad_clip=1.0, dropout_rng=None)
    return model, tok


def tiny_checkpoint(directory):
    model, tok = tiny_model()
    path = os.path.join(directory, "checkpoint.safetensors")
    save_checkpoint(path, model, tok)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m randygpt serve ...` in a subprocess, up once /health answers."""

    def __init__(self, checkpoint, *flags, env=None):
        import tempfile
        self.port = free_port()
        self.log = tempfile.TemporaryFile(mode="w+")     # a file, not a pipe nobody drains
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "randygpt", "serve", "--checkpoint", checkpoint,
             "--host", "127.0.0.1", "--port", str(self.port), *flags],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.log,
            stderr=subprocess.STDOUT, text=True)
        import httpx
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("serve exited: " + self.log.read())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("serve did not come up in 60 s")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
