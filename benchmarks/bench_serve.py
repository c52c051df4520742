"""Serving throughput: 1, 8 and 32 concurrent streaming clients against `randygpt serve` on
127.0.0.1 — aggregate tokens/s and p50/p99 time to first token — beside the same clients
against a server that decodes one stream at a time (--max-batch 1: requests serialized, the
peer this compares with), and the server's RSS before and after 1,000 requests.

    .venv/bin/python benchmarks/bench_serve.py [--preset small] [--tokens 64] [--data PATH]
        [--requests 1000] [--round 32] [--backend fused|reference]

The model is the preset's shape, briefly trained (so that EOS is unlikely and every request
makes all its tokens) on Tiny Shakespeare (../shared/data/tinyshakespeare.txt) or the
built-in sample. Each client sends streaming /v1/completions requests one after another
(prompt "ROMEO:", max_tokens --tokens, temperature 0.8); tokens/s counts the completion
tokens the server reports (usage) over the wall time of the whole round. The clients run on
the same machine and take CPU from the server: each round prints how much.
"""
import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from randygpt.checkpoint import save_checkpoint  # noqa: E402
from randygpt.config import PRESETS, ModelConfig  # noqa: E402
from randygpt.data import builtin_sample_text  # noqa: E402
from randygpt.model import GPT  # noqa: E402
from randygpt.optim import AdamW  # noqa: E402
from randygpt.step import train_step  # noqa: E402
from randygpt.tokenizer import CharTokenizer  # noqa: E402
from servetools import Server  # noqa: E402

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")


def briefly_trained(preset, text, steps=30):
    tok = CharTokenizer.from_text(text)
    p = PRESETS[preset]
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=p["block_size"],
                      n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"], dropout=0.0)
    model = GPT(cfg, seed=0)
    data = tok.encode(text[:200_000]).astype(np.int64)
    opt = AdamW(model.params.flat, model.decay_mask())
    rng = np.random.default_rng(0)
    for _ in range(steps):
        i = rng.integers(0, len(data) - cfg.block_size - 1, 8)
        x = np.stack([data[j:j + cfg.block_size] for j in i])
        y = np.stack([data[j + 1:j + cfg.block_size + 1] for j in i])
        train_step(model, opt, x, y, 3e-3, grad_clip=1.0, dropout_rng=None)
    return model, tok


async def one_request(http, url, tokens):
    """(seconds to the first text chunk, completion tokens) of one streaming request."""
    body = {"prompt": "ROMEO:", "max_tokens": tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, used = time.perf_counter(), None, 0
    async with http.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None and '"text": "' in line and '"text": ""' not in line:
                first = time.perf_counter() - t0
            if '"usage"' in line and '"choices": []' in line:
                used = int(line.split('"completion_tokens": ')[1].split(",")[0])
    return first, used


async def round_of(url, clients, per_client, tokens):
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as http:
        async def client():
            out = []
            for _ in range(per_client):
                try:
                    out.append(await one_request(http, url, tokens))
                except httpx.TransportError:      # a pooled connection the server had closed
                    retries[0] += 1
                    out.append(await one_request(http, url, tokens))
            return out
        retries = [0]
        t0, cpu0 = time.perf_counter(), time.process_time()
        results = [r for rs in await asyncio.gather(*[client() for _ in range(clients)])
                   for r in rs]
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ttft = sorted(f for f, _ in results if f is not None)
    return {"tok_s": sum(u for _, u in results) / wall, "p50": ttft[len(ttft) // 2],
            "p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], "wall": wall,
            "requests": len(results), "retries": retries[0], "client_cores": cpu / wall}


def rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--requests", type=int, default=1000, help="requests for the RSS soak")
    ap.add_argument("--train-steps", type=int, default=30,
                    help="AdamW steps before serving (EOS becomes unlikely)")
    ap.add_argument("--backend", choices=("fused", "reference"), default="fused",
                    help="the servers' --backend (default fused, serve's default)")
    ap.add_argument("--round", type=int, default=32,
                    help="requests per measured round (at least 2 per client)")
    args = ap.parse_args()
    text = open(args.data, encoding="utf-8").read() if os.path.exists(args.data) \
        else builtin_sample_text()
    model, tok = briefly_trained(args.preset, text, args.train_steps)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((l.split(":", 1)[1].strip() for l in cpu.splitlines()
                 if l.startswith("Model name")), "unknown CPU")
    print(f"CPU: {name}, {os.cpu_count()} cores; load average before: "
          f"{os.getloadavg()[0]:.2f} (other processes may be running)")
    print(f"model: {args.preset} preset, {model.num_params:,} parameters, block "
          f"{model.cfg.block_size}; {args.tokens} tokens per request; --backend "
          f"{args.backend}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "checkpoint.safetensors")
        save_checkpoint(ckpt, model, tok)
        rows = {}
        for batch in (32, 1):
            server = Server(ckpt, "--max-batch", str(batch), "--queue", "1024",
                            "--backend", args.backend)
            try:
                asyncio.run(round_of(server.url, 2, 1, 8))                 # warm-up
                for clients in (1, 8, 32):
                    per = max(2, args.round // clients)
                    rows[batch, clients] = r = asyncio.run(
                        round_of(server.url, clients, per, args.tokens))
                    print(f"--max-batch {batch}, {clients} clients: {r['requests']} requests "
                          f"in {r['wall']:.1f} s, {r['tok_s']:.0f} tok/s (the clients used "
                          f"{r['client_cores']:.2f} of the {os.cpu_count()} cores)", flush=True)
                if batch == 32:
                    before = rss_mb(server.proc.pid)
                    t0 = time.perf_counter()
                    soak_round = asyncio.run(round_of(server.url, 16, args.requests // 16, 8))
                    soak = (time.perf_counter() - t0, rss_mb(server.proc.pid))
                    health = httpx.get(server.url + "/health").json()
            finally:
                server.close()
    print("\n| clients | batched tok/s | p50 TTFT | p99 TTFT | serialized tok/s | p50 TTFT "
          "| p99 TTFT | batched / serialized |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in (1, 8, 32):
        b, s = rows[32, clients], rows[1, clients]
        print(f"| {clients} | {b['tok_s']:.0f} | {b['p50'] * 1e3:.0f} ms | "
              f"{b['p99'] * 1e3:.0f} ms | {s['tok_s']:.0f} | {s['p50'] * 1e3:.0f} ms | "
              f"{s['p99'] * 1e3:.0f} ms | {b['tok_s'] / s['tok_s']:.2f}x |")
    n = args.requests // 16 * 16
    print(f"\nRSS of the --max-batch 32 server: {before:.1f} MB before {n} requests "
          f"(16 clients, 8 tokens each, {soak[0]:.1f} s), {soak[1]:.1f} MB after "
          f"({soak[1] - before:+.1f} MB); peak batch {health['peak_batch']}; "
          f"{soak_round['retries'] + sum(r['retries'] for r in rows.values())} retried "
          "requests")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
