"""The training loop: data -> model -> AdamW, with evaluation, metrics, checkpoints, signals.

`train()` is the library entry point; the CLI only turns flags into its arguments. It runs:
  1. tokenizer and data: a new tokenizer, or the checkpoint's when resuming or fine-tuning;
  2. model and optimizer: fresh, or restored from a checkpoint (weights, AdamW moments, RNG
     streams, iteration), so that a resumed run continues bit for bit;
  3. the loop: one step per iteration; every eval_interval (and at the end) it evaluates and
     writes checkpoint.safetensors (+ checkpoint_best.safetensors when val loss improves) and a
     metrics.jsonl row. Between evaluations it touches no disk;
  4. SIGINT / SIGTERM only set a flag: the loop finishes its step, writes a checkpoint and
     returns with `signal` set (the CLI exits 130 / 143).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .checkpoint import (BEST, LATEST, Checkpoint, check_resumable, check_run_dir,
                         encode_checkpoint, restore_optimizer, rng_from_state, rng_state,
                         write_atomic)
from .config import ModelConfig, TrainConfig
from .data import (Split, bits_per_char, builtin_sample_text, get_batch, load_documents,
                   read_text, split_documents, split_text)
from .errors import UserError
from .model import GPT
from .optim import AdamW, FusedAdamW, clip_grad_norm, lr_at
from .sample import generate_simple
from .tokenizer import BPETokenizer, CharTokenizer


@dataclass
class TrainResult:
    model: GPT
    tokenizer: object
    iters_done: int
    train_loss: float
    val_loss: float
    history: list = field(default_factory=list)
    sample: str = ""
    checkpoint: str | None = None   # the latest checkpoint written, if any
    signal: int | None = None       # the signal that stopped the run early, if one did


def load_corpus(data_path: str | None, log=print) -> str:
    """The text at data_path; or train.txt here; or the built-in sample (with a notice)."""
    if data_path is not None:
        return read_text(data_path)
    if os.path.exists("train.txt"):
        return read_text("train.txt")
    log("no train.txt here and no --data given: training on the built-in sample text "
        "(a few KB; pass --data PATH for your own)")
    return builtin_sample_text()


def rng_streams(seed: int):
    """Independent generators for weight init, batch sampling and dropout, all from one seed."""
    init, batches, dropout = np.random.SeedSequence(seed).spawn(3)
    return (np.random.default_rng(init), np.random.default_rng(batches),
            np.random.default_rng(dropout))


def estimate_loss(model: GPT, tokens, tcfg: TrainConfig, seed: int) -> float:
    """Mean loss per predicted token (no dropout) over eval_iters batches, the same batches
    every evaluation. Batches are weighted by their targets (padding after a short document
    predicts nothing)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    total, count = 0.0, 0
    for _ in range(tcfg.eval_iters):
        x, y = get_batch(tokens, tcfg.batch_size, model.cfg.block_size, rng)
        n = int((y >= 0).sum())
        total += model.loss(x, y) * n
        count += n
    return total / count


def training_ops(reference: bool = False):
    """The ops module and optimizer for training: the fused numba kernels and FusedAdamW (the
    same math, much faster; compiled on the first run, then loaded from numba's cache), or the
    readable reference. numba loads only here, so generation never pays its start-up."""
    if reference:
        from .ops import reference as ops
        return ops, AdamW
    from . import threads
    from .ops import fused as ops
    threads.keep_freed_memory()
    return ops, FusedAdamW


def train(mcfg: ModelConfig, tcfg: TrainConfig, data_path: str | None = None,
          out_dir: str | None = None, text: str | None = None, sample_tokens: int = 300,
          progress: bool | None = None, log=print, *, resume: Checkpoint | None = None,
          fine_tune: Checkpoint | None = None, stop_after: int | None = None,
          bpe_vocab_size: int | None = None, doc_separator: str | None = None,
          cache_dir: str | None = None, reference_ops: bool = False) -> TrainResult:
    """Train to tcfg.iters total iterations. `resume`: continue that checkpoint's run exactly
    (mcfg/tcfg must be its configs, only iters may differ). `fine_tune`: start from its weights
    and tokenizer with a fresh optimizer and counter. `stop_after`: stop as a signal would,
    after that many total iterations (for scripted runs and tests). `bpe_vocab_size`: train a
    byte-level BPE tokenizer of that size (else char; never with resume / fine-tune, which keep
    the checkpoint's). `doc_separator`: split the text into documents there; no training window
    spans two. `cache_dir`: keep the encoded text there (data.load_documents).
    `reference_ops`: train on the readable NumPy ops instead of the fused kernels."""
    tcfg.validate()
    if resume is not None and fine_tune is not None:
        raise UserError("resume or fine-tune, not both")
    origin = resume or fine_tune
    if out_dir is not None:
        check_run_dir(out_dir, resume)
    if resume is not None:
        check_resumable(resume, mcfg, tcfg)
    if text is None:
        text = load_corpus(data_path, log)
    if origin is not None:
        if bpe_vocab_size is not None:
            raise UserError("--bpe trains a new tokenizer, but resume and fine-tune keep the "
                            f"checkpoint's ({origin.tokenizer.kind}): drop --bpe")
        tokenizer = origin.tokenizer
        if resume is not None and doc_separator is None:    # resume keeps the run's documents
            doc_separator = resume.meta.get("data", {}).get("doc_separator")
    elif bpe_vocab_size is not None:
        t0 = time.perf_counter()
        tokenizer = BPETokenizer.train(split_text(text, doc_separator), bpe_vocab_size)
        log(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens, trained in "
            f"{time.perf_counter() - t0:.2f} s")
    else:
        tokenizer = CharTokenizer.from_text(text)
    mcfg.vocab_size = tokenizer.vocab_size
    mcfg.validate()
    docs = load_documents(text, tokenizer, doc_separator, cache_dir, progress=progress, log=log)
    split: Split = split_documents(docs, mcfg.block_size, tokenizer.decode,
                                   source=repr(data_path) if data_path else "the text")
    data_info = dict(path=os.path.abspath(data_path) if data_path else None,
                     sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                     doc_separator=doc_separator, documents=docs.n_docs,
                     train_tokens=len(split.train), val_tokens=len(split.val))

    init_rng, batch_rng, dropout_rng = rng_streams(tcfg.seed)
    ops, Optimizer = training_ops(reference_ops)
    model = GPT(mcfg, seed=None, ops=ops)
    model.init_weights(init_rng)
    opt = Optimizer(model.params.flat, model.decay_mask(), tcfg.beta1, tcfg.beta2,
                weight_decay=tcfg.weight_decay)
    start_iter, best_val_loss, provenance = 0, float("inf"), {}
    if resume is not None:
        if data_info["sha256"] != resume.meta.get("data", {}).get("sha256"):
            raise UserError(f"the training text is not the one {resume.path} was trained on; "
                            "resume with the same --data, or use --fine-tune to go on with "
                            "new text")
        if doc_separator != resume.meta.get("data", {}).get("doc_separator"):
            raise UserError(f"--doc-separator differs from {resume.path}'s "
                            f"({resume.meta.get('data', {}).get('doc_separator')!r}); resume "
                            "with the same documents")
        model.params.flat[...] = resume.model.params.flat
        restore_optimizer(opt, resume.optimizer_state)
        batch_rng = rng_from_state(resume.meta["rng"]["batch"])
        dropout_rng = rng_from_state(resume.meta["rng"]["dropout"])
        start_iter = resume.iter
        best_val_loss = _as_loss(resume.meta.get("best_val_loss"))
        provenance = {k: resume.meta[k] for k in ("fine_tuned_from",) if k in resume.meta}
        log(f"resuming from {resume.path} at iteration {start_iter} of {tcfg.iters}")
    elif fine_tune is not None:
        if replace(fine_tune.model_config, dropout=mcfg.dropout) != mcfg:
            raise UserError(f"the model config differs from {fine_tune.path}'s: fine-tuning "
                            "keeps the checkpoint's model shape")
        model.params.flat[...] = fine_tune.model.params.flat
        provenance = {"fine_tuned_from": os.path.abspath(fine_tune.path)}
        log(f"fine-tuning from {fine_tune.path} (iteration {fine_tune.iter} there)")

    metrics_file = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        if resume is not None:
            _trim_metrics(metrics_path, start_iter)   # rows a killed run wrote past its checkpoint
        metrics_file = open(metrics_path, "a", encoding="utf-8")
    log(f"model: {mcfg.n_layer} layers, {mcfg.n_embd} dim, {mcfg.n_head} heads, block "
        f"{mcfg.block_size}, vocab {mcfg.vocab_size} ({tokenizer.kind}): "
        f"{model.num_params:,} parameters; "
        f"{len(split.train):,} train / {len(split.val):,} val tokens")

    def save(names) -> str:
        """Write the state after `done` iterations to out_dir/name for each name (one encoding)."""
        blob = encode_checkpoint(model, tokenizer, opt, dict(
            iter=done, train_config=tcfg, best_val_loss=best_val_loss, val_loss=val_loss,
            train_loss=train_loss, data=data_info, **provenance,
            rng={"batch": rng_state(batch_rng), "dropout": rng_state(dropout_rng)}))
        for name in names:
            write_atomic(os.path.join(out_dir, name), blob)
        return os.path.join(out_dir, names[0])

    bar = _progress_bar(tcfg.iters, progress, initial=start_iter)
    tokens_per_iter = tcfg.batch_size * mcfg.block_size
    history, train_time, start = [], 0.0, time.perf_counter()
    train_loss = val_loss = float("nan")
    done, saved_at, checkpoint = start_iter, None, None
    stop = _StopFlag()
    # overflow warnings would bury the one-line divergence error: the loop checks every loss
    with stop, np.errstate(over="ignore", invalid="ignore"):
        for it in range(start_iter, tcfg.iters):
            lr = lr_at(it, tcfg.iters, tcfg.lr, tcfg.min_lr, tcfg.warmup, tcfg.decay_frac)
            t0 = time.perf_counter()
            x, y = get_batch(split.train, tcfg.batch_size, mcfg.block_size, batch_rng)
            _, loss = model.forward(x, y, rng=dropout_rng)
            if not math.isfinite(loss):
                raise UserError(_diverged(f"the loss became {loss} at iteration {it}", checkpoint))
            model.backward()
            clip_grad_norm(model.grads.flat, tcfg.grad_clip)
            opt.step(model.grads.flat, lr)
            done = it + 1
            train_time += time.perf_counter() - t0
            tok_s = tokens_per_iter * (done - start_iter) / train_time
            if bar is not None:
                bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s",
                                    refresh=False)
                bar.update(1)

            if done % tcfg.eval_interval == 0 or done == tcfg.iters:
                train_loss = estimate_loss(model, split.train, tcfg, tcfg.seed)
                val_loss = estimate_loss(model, split.val, tcfg, tcfg.seed + 1)
                if not math.isfinite(val_loss):
                    raise UserError(_diverged(f"the val loss became {val_loss} at iteration "
                                              f"{done}", checkpoint))
                # bits per character: loss per token x tokens per character, in bits
                val_bpc = bits_per_char(val_loss * split.val.n_targets, split.val.n_chars)
                row = dict(iter=done, train_loss=round(train_loss, 6),
                           val_loss=round(val_loss, 6), val_ppl=round(math.exp(val_loss), 4),
                           val_bpc=round(val_bpc, 6), lr=lr, tokens_per_sec=round(tok_s, 1),
                           elapsed_s=round(time.perf_counter() - start, 3))
                history.append(row)
                if metrics_file is not None:   # before the checkpoint: a resume trims extras
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                is_best = val_loss < best_val_loss
                best_val_loss = min(best_val_loss, val_loss)
                if out_dir is not None:
                    checkpoint = save([LATEST, BEST] if is_best else [LATEST])
                    saved_at = done
                line = (f"iter {done}/{tcfg.iters}: train loss {train_loss:.4f}, val loss "
                        f"{val_loss:.4f}, val ppl {math.exp(val_loss):.2f}, val bpc "
                        f"{val_bpc:.4f}, {tok_s:,.0f} tok/s")
                if bar is not None:
                    bar.write(line)
                else:
                    log(line)

            if stop.signum is not None or done == stop_after:
                if out_dir is not None and saved_at != done:
                    checkpoint = save([LATEST])
                break
    if bar is not None:
        bar.close()
    if metrics_file is not None:
        metrics_file.close()
    if done < tcfg.iters:
        why = (f"stopped by {signal.Signals(stop.signum).name}" if stop.signum is not None
               else "stopped")
        log(f"{why} at iteration {done}/{tcfg.iters}" + (
            f": checkpoint written to {checkpoint}; continue with --resume" if checkpoint
            else " (no run directory: nothing saved)"))
        return TrainResult(model, tokenizer, done, train_loss, val_loss, history, "",
                           checkpoint, stop.signum)

    sample = ""
    if sample_tokens > 0:
        ids = generate_simple(model, [tokenizer.bos_id], sample_tokens,
                              np.random.default_rng(tcfg.seed), temperature=0.8,
                              stop_id=tokenizer.eos_id)
        sample = tokenizer.decode(ids)
    return TrainResult(model, tokenizer, done, train_loss, val_loss, history, sample, checkpoint)


# ---------------------------------------------------------------------------------------------
# helpers of train(): metrics, divergence, signals, progress

def _trim_metrics(path: str, upto_iter: int) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["iter"] <= upto_iter:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass     # a torn last line from a killed run
    if keep != lines:
        write_atomic(path, "".join(line + "\n" for line in keep).encode("utf-8"))


def _diverged(what: str, checkpoint: str | None) -> str:
    kept = (f"the last good checkpoint ({checkpoint}) is kept" if checkpoint
            else "no checkpoint of this session was written")
    return f"{what}: training diverged; {kept}; lower --lr or raise --warmup"


def _as_loss(v) -> float:
    return float("inf") if v is None else float(v)


class _StopFlag:
    """While active, SIGINT and SIGTERM only record themselves, so the loop can finish its step
    and save. A second signal aborts at once (KeyboardInterrupt): writes are atomic, so the last
    checkpoint stays whole. Only the main thread can own signal handlers."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def _progress_bar(total: int, enabled: bool | None, initial: int = 0):
    """A tqdm bar on a terminal; None (plain log lines) when output is not a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, file=sys.stderr)
