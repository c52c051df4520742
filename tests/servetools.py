"""Shared by the serve tests: a tiny checkpoint and a real `randygpt serve` on 127.0.0.1."""
import os
import socket
import subprocess
import sys
import time


from randygpt.checkpoint import save_checkpoint
from randygpt.config import ModelConfig
from randygpt.model import GPT
from randygpt.tokenizer import CharTokenizer

# every character the chat template and the tests type
TEXT = "the quick brown fox jumps over the lazy dog. THE END!\nUser: Assistant:"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(block=32, seed=1):
    tok = CharTokenizer(TEXT)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=2, n_embd=32,
                      n_head=4, dropout=0.0)
    model = GPT(cfg, seed=seed)
    model.params.flat[...] *= 3       # random weights far from uniform: varied, seedable text
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
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "randygpt", "serve", "--checkpoint", checkpoint,
             "--host", "127.0.0.1", "--port", str(self.port), *flags],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        import httpx
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("serve exited: " + self.proc.stderr.read())
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
