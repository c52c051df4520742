"""Generation speed of a preset's shape (small by default), through session.Session:

  - single stream: the reference backend (op-by-op NumPy, the path of `randygpt generate`)
    and the fused backend (one compiled numba call per token, ops/fused/decode.py), against
    PyTorch nanoGPT-style (tests/torch_twin.py's TorchGPT, a full forward over the window
    per token) when torch is installed;
  - 32 concurrent streams, each with its own sampling settings, in batched steps: aggregate
    tokens/s and the ratio to the single-stream figure of the same backend (the fused step
    on one or all threads, as timed here; the settings it chose are printed);
  - start-up: time from launching `randygpt generate` to the first byte of its output on
    stdout (the first token's text), against the first byte of a bare `python -c print()`,
    of `import numpy.random; print()` (what any NumPy program pays first) and of `import
    numba; print()`; and the cold compile of the fused decode step.

    .venv/bin/python benchmarks/bench_generate.py [--preset small] [--tokens 1000]
        [--streams 32] [--launches 11] [--no-torch] [--startup-only] [--python PY]

The launches are fair to an installed randyGPT: the checkpoint is a training checkpoint
(weights and AdamW moments, as `randygpt train` writes), every launch finds compiled
bytecode (written once, by an untimed launch, into a private PYTHONPYCACHEPREFIX: with
PYTHONDONTWRITEBYTECODE set and no __pycache__, each launch would compile randyGPT's
sources again, ~70 ms), and the four commands take turns, so that a change in the
machine's load falls on all of them.

The weights are the preset's initialisation (speed does not depend on their values) and the
tokenizer never ends a document, so every stream makes all of its tokens; only real tokens
count. Compilation is done (or loaded) before any timing. OpenBLAS runs one thread, as
`randygpt generate` does (randygpt/blas.py). Prints the CPU, its BLAS and the load first.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

import numba  # noqa: E402
import numpy as np  # noqa: E402

from machine import cpu_ticks, describe, steal_line  # noqa: E402
from randygpt.blas import set_blas_threads  # noqa: E402
from randygpt.checkpoint import save_checkpoint  # noqa: E402
from randygpt.config import PRESETS, ModelConfig  # noqa: E402
from randygpt.data import builtin_sample_text  # noqa: E402
from randygpt.model import GPT  # noqa: E402
from randygpt.optim import AdamW  # noqa: E402
from randygpt.sample import SamplingConfig  # noqa: E402
from randygpt.session import Session  # noqa: E402
from randygpt.tokenizer import CharTokenizer  # noqa: E402


def model_of(preset, tok, backend):
    p = PRESETS[preset]
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=p["block_size"],
                      n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"], dropout=0.0)
    return GPT(cfg, seed=0, backend=backend)


def sampling_of(i):
    """Stream i's own settings: temperatures, top-k and top-p all differ."""
    return SamplingConfig(temperature=0.6 + 0.05 * (i % 9), top_k=(0, 5, 20, 40)[i % 4],
                          top_p=(1.0, 0.9, 0.95)[i % 3])


def session_rate(model, tok, prompt, n, streams, repeats):
    """Best of `repeats` runs: real tokens made per second by `streams` concurrent streams."""
    best = 0.0
    for r in range(repeats):
        session = Session(model, tok, streams=streams)
        for i in range(streams):
            session.submit(prompt, n, sampling_of(i) if streams > 1 else SamplingConfig(0.8),
                           rng=np.random.default_rng(i))
        made, t0 = 0, time.perf_counter()
        while session.active:
            made += sum(e.token is not None for e in session.step())
        dt = time.perf_counter() - t0
        assert made == streams * n, f"made {made} of {streams * n} tokens"
        best = max(best, made / dt)
    return best


def products_bound(model, repeats=200):
    """One vector through every weight matrix a decode step reads (x @ W with OpenBLAS, one
    thread, nothing else): the fastest of `repeats` passes. Its time bounds the tokens/s of
    any float32 single stream here, and weight bytes / time is the rate the products read
    memory at (the whole set no longer fits in one core's L2 cache)."""
    names = model.params.names()
    mats = [model.params[n] for n in names if model.params[n].ndim == 2
            and n not in ("wte", "wpe")]                   # an untied lm_head among them
    if "lm_head" not in names:                             # tied: the head reads wte
        mats.append(model.params["wte"].T.copy())
    vectors = [np.ones(w.shape[0], w.dtype) for w in mats]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, w in zip(vectors, mats):
            x @ w
        best = min(best, time.perf_counter() - t0)
    return best, sum(w.nbytes for w in mats)


def print_settings(model):
    """The compiled step's setting for each batch size it met (DecodeStep.setting): the
    4-row product block's width and the threads, with the times of every candidate."""
    from randygpt.ops.fused.choose import decision_file, read_decisions
    step, decisions = model._decode_step(), read_decisions(decision_file())
    every = numba.config.NUMBA_NUM_THREADS
    print("  fused step's settings, timed here (rows of one call: block width, threads):")
    for (rows, split), (width, threads) in sorted(step.chosen.items()):
        one = "" if split else ", one stream"
        seconds = decisions.get(f"decode rows<={rows} of {every} threads{one}", {}).get(
            "seconds")
        times = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in (seconds or {}).items())
        print(f"    <= {rows} rows{one}: 4x{width} on {threads} thread(s)"
              + (f"  ({times})" if times else "  (decided by an earlier run)"))


def torch_rate(model, prompt_ids, n):
    """nanoGPT's generate() on the same weights: crop to the block, a full forward, sample."""
    try:
        import torch
        from torch_twin import TorchGPT
    except ImportError:
        return None
    twin, B = TorchGPT.from_randygpt(model), model.cfg.block_size
    torch.manual_seed(0)
    with torch.no_grad():
        x = torch.tensor([prompt_ids])
        t0 = time.perf_counter()
        for _ in range(n):
            logits = twin(x[:, -B:])[:, -1, :] / 0.8
            x = torch.cat((x, torch.multinomial(torch.softmax(logits, -1), 1)), dim=1)
        return n / (time.perf_counter() - t0), torch.get_num_threads()


def first_byte(argv, env, python=sys.executable):
    """Seconds from starting `python argv` to the first byte it writes to stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, env=env, cwd=ROOT)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait() != 0:
        sys.exit(f"{argv} failed: {proc.stderr.read().decode(errors='replace')}")
    return t_first


def startup(cfg, text, prompt, launches, tmp, python=sys.executable):
    """Median ms to the first byte of `randygpt generate` and of its baselines, in turns,
    each launched by `python` (an interpreter whose environment has randyGPT's
    dependencies; randyGPT itself comes from this checkout, on PYTHONPATH)."""
    model = GPT(cfg, seed=0)
    ckpt = os.path.join(tmp, "checkpoint.safetensors")
    save_checkpoint(ckpt, model, CharTokenizer.from_text(text),
                    AdamW(model.params.flat, model.decay_mask()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"))
    # randyGPT's thread settings (randygpt/threads.py) for the NumPy baseline too
    numpy_env = dict(env, OMP_WAIT_POLICY="passive", OPENBLAS_THREAD_TIMEOUT="4")
    commands = {
        "randygpt generate": (["-m", "randygpt", "generate", "--checkpoint", ckpt,
                               "--prompt", prompt, "--max-tokens", "50", "--seed", "0"], env),
        # the baselines print a byte too: the time to it leaves out the interpreter's exit
        "bare python": (["-c", "print()"], env),
        "import numpy.random": (["-c", "import numpy.random; print()"], numpy_env),
        "import numba": (["-c", "import numba; print()"], env),
    }
    for argv, e in commands.values():             # untimed: writes the bytecode
        first_byte(argv, e, python)
    times = {name: [] for name in commands}
    for _ in range(launches):
        for name, (argv, e) in commands.items():
            times[name].append(first_byte(argv, e, python))
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return medians, min(times["randygpt generate"]) * 1e3


def print_startup(medians, fastest, launches, python=sys.executable):
    gen = medians["randygpt generate"]
    print(f"\nstart-up, {python}, median of {launches} launches each: `randygpt generate` "
          f"(reference "
          f"path, a training checkpoint) first byte on stdout after {gen:.0f} ms (fastest "
          f"{fastest:.0f}); bare python {medians['bare python']:.0f} ms, `import "
          f"numpy.random` {medians['import numpy.random']:.0f} ms (randygpt's own part: "
          f"{gen - medians['import numpy.random']:.0f} ms), `import numba` "
          f"{medians['import numba']:.0f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--tokens", type=int, default=1000, help="tokens per stream")
    ap.add_argument("--streams", type=int, default=32, help="concurrent streams")
    ap.add_argument("--launches", type=int, default=11,
                    help="CLI launches for the first token (median)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--startup-only", action="store_true",
                    help="measure the start-up only (no generation speed, no compile)")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that launches start-up's commands (default: this "
                    "one); e.g. a venv made as the Quickstart makes one, without the test "
                    "extras, whose .pth files run at every start")
    args = ap.parse_args()
    print(describe())
    ticks = cpu_ticks()
    set_blas_threads(1)
    text = builtin_sample_text()
    tok = CharTokenizer.from_text(text)
    tok.eos_id = -1                               # never sampled: every stream runs to length
    prompt = text[:32]
    if args.startup_only:
        with tempfile.TemporaryDirectory() as tmp:
            print_startup(*startup(model_of(args.preset, tok, "reference").cfg, text, prompt,
                                   args.launches, tmp, args.python), args.launches,
                          args.python)
        return
    fused, ref = model_of(args.preset, tok, "fused"), model_of(args.preset, tok, "reference")
    ref.params.flat[...] = fused.params.flat
    cfg = fused.cfg
    from randygpt.ops.fused import decode
    decode.COMPILE_AFTER_S = 0            # the compiled step from the first token: its speed
    session_rate(fused, tok, prompt, 4, 2, 1)                         # compile / load first
    print(f"{args.preset}: {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}h, block {cfg.block_size}, "
          f"{fused.num_params:,} parameters; prompt {len(prompt)} chars; OpenBLAS 1 thread")

    n, S = args.tokens, args.streams
    rows = []
    for name, model in (("reference (NumPy ops)", ref), ("fused (compiled step)", fused)):
        one = session_rate(model, tok, prompt, n, 1, 3)
        many = session_rate(model, tok, prompt, max(n // 4, 1), S, 2)
        rows.append((name, one, many))
    print(f"\ntokens/s, best of runs ({n} tokens a stream; {S} streams x {max(n // 4, 1)}):")
    print(f"  {'backend':<24} {'1 stream':>10} {f'{S} streams':>12}  batched / single")
    for name, one, many in rows:
        print(f"  {name:<24} {one:>10,.0f} {many:>12,.0f}  {many / one:5.1f}x")
    print(f"  fused / reference: {rows[1][1] / rows[0][1]:.1f}x single, "
          f"{rows[1][2] / rows[0][2]:.1f}x batched")
    print_settings(fused)
    t, nbytes = products_bound(ref)
    print(f"  the products alone (one vector through all {nbytes / 1e6:.1f} MB of weight "
          f"matrices, OpenBLAS): {t * 1e6:.0f} us, so at most {1 / t:,.0f} tokens/s for one "
          f"stream on one core ({nbytes / t / 1e9:.1f} GB/s)")
    peer = None if args.no_torch else torch_rate(ref, tok.encode(prompt).tolist(),
                                                 min(n, 200))
    if peer is not None:
        print(f"  PyTorch nanoGPT-style, no cache ({peer[1]} threads): {peer[0]:,.0f} tokens/s "
              f"(fused single stream: {rows[1][1] / peer[0]:.1f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        code = ("import numpy as np, time; from randygpt.model import GPT, KVCache; "
                "from randygpt.config import ModelConfig; "
                f"c = ModelConfig(vocab_size={cfg.vocab_size}, block_size={cfg.block_size}, "
                f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_head={cfg.n_head}); "
                "from randygpt.ops.fused import decode; decode.COMPILE_AFTER_S = 0; "
                "m = GPT(c, backend='fused'); k = KVCache(c); m.prefill([1], k); "
                "t = time.perf_counter(); m.decode(np.array([1]), k, [0]); "
                "print(time.perf_counter() - t)")
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp, PYTHONPATH=ROOT)
        cold = float(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                    capture_output=True, text=True).stdout)
        warm = float(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                    capture_output=True, text=True).stdout)
    with tempfile.TemporaryDirectory() as tmp:
        print_startup(*startup(cfg, text, prompt, args.launches, tmp, args.python),
                      args.launches, args.python)
    print(f"fused decode step: first call {cold:.2f} s cold (compiling), {warm:.2f} s "
          f"with numba's disk cache")
    print(steal_line(ticks))


if __name__ == "__main__":
    main()
