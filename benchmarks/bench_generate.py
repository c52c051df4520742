"""Generation speed: single-stream tokens/s of a preset (small by default) with the KV cache,
against the same model without a cache (a full forward pass over the last block_size tokens per
token, nanoGPT style) in the same run, and the time from launching `randygpt generate` to the
first byte of its output, imports included.

    .venv/bin/python benchmarks/bench_generate.py [--preset small] [--tokens 2000]
        [--launches 7] [--data PATH] [--no-torch]

The model is the preset's shape, briefly trained (a few AdamW steps, so that BOS/EOS become
unlikely and every run makes all of its tokens; speed does not depend on the weights' values)
on Tiny Shakespeare (../shared/data/tinyshakespeare.txt) or the built-in sample text. Every
figure samples at the CLI's defaults (temperature 0.8, no top-k/top-p). When PyTorch is
installed, the same weights are also sampled nanoGPT-style in PyTorch as an outside peer
(with PyTorch's own thread count). The randyGPT rows run OpenBLAS with --blas-threads threads
(default 1, as `randygpt generate` does; see randygpt/blas.py).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from randygpt.blas import get_blas_threads, set_blas_threads  # noqa: E402
from randygpt.checkpoint import save_checkpoint  # noqa: E402
from randygpt.config import PRESETS, ModelConfig  # noqa: E402
from randygpt.data import builtin_sample_text, get_batch  # noqa: E402
from randygpt.model import GPT  # noqa: E402
from randygpt.optim import AdamW  # noqa: E402
from randygpt.sample import (Decoder, SamplingConfig, generate_ids,  # noqa: E402
                             generate_uncached)
from randygpt.tokenizer import CharTokenizer  # noqa: E402

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
SAMPLING = SamplingConfig(temperature=0.8)


def briefly_trained_model(preset, text, steps=30):
    tok = CharTokenizer.from_text(text)
    p = PRESETS[preset]
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=p["block_size"],
                      n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"], dropout=0.0)
    model = GPT(cfg, seed=0)
    tokens = tok.encode(text[:200_000])
    opt = AdamW(model.params.flat, model.decay_mask())
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x, y = get_batch(tokens, 8, cfg.block_size, rng)
        model.forward(x, y)
        model.backward()
        opt.step(model.grads.flat, 3e-3)
    return model, tok


def tokens_per_second(fn, n, repeats):
    """Best of `repeats` runs of fn() making n tokens (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        made = fn()
        best = min(best, time.perf_counter() - t0)
        assert made == n, f"made {made} of {n} tokens"
    return n / best


def torch_peer(model, prompt_ids, n):
    """The same weights in PyTorch, sampled like nanoGPT's generate(): crop to the block, a full
    forward pass, softmax of the last logits / temperature, multinomial. None without torch."""
    try:
        import torch
    except ImportError:
        return None
    import torch.nn.functional as F
    cfg = model.cfg
    P = {k: torch.from_numpy(model.params[k].copy()) for k in model.params.names()}

    def rms(x, g):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    def forward(idx):                                                     # (1, T) -> (1, T, V)
        T, C, H = idx.shape[1], cfg.n_embd, cfg.n_head
        x = P["wte"][idx] + P["wpe"][:T]
        for i in range(cfg.n_layer):
            q, k, v = (rms(x, P[f"h.{i}.ln1.g"]) @ P[f"h.{i}.attn.qkv"]).split(C, dim=-1)
            q, k, v = (t.view(1, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + y.transpose(1, 2).reshape(1, T, C) @ P[f"h.{i}.attn.proj"]
            h = torch.relu(rms(x, P[f"h.{i}.ln2.g"]) @ P[f"h.{i}.mlp.fc"])
            x = x + (h * h) @ P[f"h.{i}.mlp.proj"]
        return rms(x, P["ln_f.g"]) @ P["lm_head"]

    with torch.no_grad():
        idx = torch.tensor([prompt_ids])
        ours, _ = model.forward(np.asarray([prompt_ids]))
        err = float(np.abs(forward(idx).numpy() - ours).max())
        torch.manual_seed(0)

        def sample():
            x = idx
            for _ in range(n):
                logits = forward(x[:, -cfg.block_size:])[:, -1, :] / SAMPLING.temperature
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
                x = torch.cat((x, nxt), dim=1)
            return x.shape[1] - idx.shape[1]
        return tokens_per_second(sample, n, 2), err, torch.get_num_threads()


def launch(checkpoint, prompt, n):
    """Start the real CLI; seconds to its first byte of output, to its end, and bytes."""
    cmd = [sys.executable, "-m", "randygpt", "generate", "--checkpoint", checkpoint,
           "--prompt", prompt, "--max-tokens", str(n), "--seed", "0"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            bufsize=0)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    t_end = time.perf_counter() - t0
    err = proc.stderr.read()
    if proc.wait() != 0 or not first:
        sys.exit(f"randygpt generate failed: {err.decode(errors='replace')}")
    return t_first, t_end, len((first + rest).decode("utf-8")) - 1    # minus the final newline


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--tokens", type=int, default=2000, help="tokens per cached run")
    ap.add_argument("--baseline-tokens", type=int, default=200, help="tokens per uncached run")
    ap.add_argument("--launches", type=int, default=7, help="CLI launches for the first token")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="OpenBLAS threads for the randyGPT rows (randygpt generate uses 1)")
    args = ap.parse_args()
    if os.path.exists(args.data):
        text, source = open(args.data, encoding="utf-8").read(), os.path.basename(args.data)
    else:
        text, source = builtin_sample_text(), "the built-in sample text"
    model, tok = briefly_trained_model(args.preset, text)
    default_threads = set_blas_threads(args.blas_threads)
    cfg = model.cfg
    prompt = text[:32]
    prompt_ids = tok.encode(prompt).tolist()
    print(f"{args.preset}: {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}h, block {cfg.block_size}, "
          f"vocab {cfg.vocab_size} ({source}), {model.num_params:,} parameters; "
          f"prompt {len(prompt_ids)} tokens; numpy {np.__version__}, OpenBLAS threads "
          f"{get_blas_threads()} (default {default_threads})")

    def cached(keep=None, n=args.tokens):
        return lambda: sum(1 for _ in generate_ids(model, prompt_ids, n, SAMPLING,
                                                   np.random.default_rng(0), keep=keep))

    def uncached():
        return len(generate_uncached(model, prompt_ids, args.baseline_tokens, SAMPLING,
                                     np.random.default_rng(0)))

    B = cfg.block_size
    rows = [("KV cache, keep block/2 (default)", tokens_per_second(cached(), args.tokens, 3)),
            ("KV cache, keep block-1 (exact window)*",
             tokens_per_second(cached(B - 1, args.baseline_tokens), args.baseline_tokens, 2)),
            ("no cache: forward over last block*", tokens_per_second(uncached,
                                                                    args.baseline_tokens, 2))]
    peer = None if args.no_torch else torch_peer(model, prompt_ids, args.baseline_tokens)
    if peer is not None:
        rows.append((f"PyTorch nanoGPT-style, no cache ({peer[2]} threads)*", peer[0]))

    # where a token's time goes: the model step alone vs sampling
    dec = Decoder(model)
    dec.start(prompt_ids)
    steps = min(B - len(prompt_ids), 30)
    t0 = time.perf_counter()
    for i in range(steps):
        dec.feed(i % (cfg.vocab_size - 2))
    step_us = (time.perf_counter() - t0) / steps * 1e6

    print(f"\nsingle-stream generation, library, {args.tokens} tokens (* {args.baseline_tokens}"
          f" tokens), best of runs:")
    base = rows[2][1]
    for name, rate in rows:
        print(f"  {name:<44} {rate:>9,.0f} tokens/s  ({rate / base:5.1f}x no-cache)")
    print(f"  (one decode_step alone: {step_us:.0f} us)")
    if peer is not None:
        print(f"  PyTorch peer logits match ours to {peer[1]:.1e}")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "checkpoint_best.safetensors")
        save_checkpoint(ckpt, model, tok)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare = time.perf_counter() - t0
        launches = [launch(ckpt, prompt, args.tokens) for _ in range(args.launches)]
    firsts = [t for t, _, _ in launches]
    cli_rates = [n / (end - first) for first, end, n in launches]
    print(f"\n`randygpt generate --checkpoint C --prompt <{len(prompt)} chars> --max-tokens "
          f"{args.tokens}`, {args.launches} launches:")
    print(f"  time to first token: median {statistics.median(firsts) * 1000:.0f} ms "
          f"(min {min(firsts) * 1000:.0f}, max {max(firsts) * 1000:.0f}); a bare "
          f"`python -c pass` takes {bare * 1000:.0f} ms")
    print(f"  streaming to a pipe after the first token: median "
          f"{statistics.median(cli_rates):,.0f} tokens/s")


if __name__ == "__main__":
    main()
