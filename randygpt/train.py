"""The training loop: a RunPlan (runs.py) in, a trained model, metrics and checkpoints out.

`train(plan)` runs in two parts:
  1. prepare(): the tokenizer (new, or the checkpoint's), the documents and their split, the
     model and its optimizer, fresh or restored from a checkpoint (weights, AdamW moments, RNG
     streams, iteration), so that a resumed run continues bit for bit;
  2. the loop: one train_step (step.py) per iteration. A Reporter does everything else: the
     progress bar; every eval_interval (and at the end) an evaluation, a metrics.jsonl row and
     checkpoint.safetensors (+ checkpoint_best.safetensors when val loss improves); and the
     signals: SIGINT / SIGTERM only set a flag, the loop finishes its step, writes a checkpoint
     and returns with `signal` set (the CLI exits 130 / 143). Between evaluations nothing
     touches the disk.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .checkpoint import (BEST, LATEST, CheckpointMeta, DataInfo, encode_checkpoint,
                         restore_optimizer, rng_from_state, rng_state, write_atomic)
from .data import (Split, bits_per_char, get_batch, load_documents, split_documents,
                   split_text)
from .errors import UserError
from .memory import check_fits, training_memory
from .model import GPT
from .ops.contract import get_backend
from .optim import lr_at
from .runs import RunPlan
from .sample import SamplingConfig
from .session import complete
from .step import make_optimizer, train_step
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


@dataclass
class PreparedRun:
    """Everything the loop needs, ready to step."""
    plan: RunPlan
    tokenizer: object
    split: Split
    data: DataInfo
    model: GPT
    optimizer: object
    batch_rng: np.random.Generator
    dropout_rng: np.random.Generator
    start_iter: int = 0
    best_val_loss: float = float("inf")
    fine_tuned_from: str | None = None


def rng_streams(seed: int):
    """Independent generators for weight init, batch sampling and dropout, all from one seed."""
    init, batches, dropout = np.random.SeedSequence(seed).spawn(3)
    return (np.random.default_rng(init), np.random.default_rng(batches),
            np.random.default_rng(dropout))


def estimate_loss(model: GPT, tokens, tcfg, seed: int) -> float:
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


def prepare(plan: RunPlan, backend="fused", progress: bool | None = None,
            log=print) -> PreparedRun:
    """Tokenizer, data, model and optimizer of the plan, restored from its checkpoint."""
    for line in plan.notices:
        log(line)
    origin = plan.resume or plan.fine_tune
    if origin is not None:
        tokenizer = origin.tokenizer
    elif plan.bpe_vocab_size is not None:
        t0 = time.perf_counter()
        tokenizer = BPETokenizer.train(split_text(plan.text, plan.doc_separator),
                                       plan.bpe_vocab_size)
        log(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens, trained in "
            f"{time.perf_counter() - t0:.2f} s")
    else:
        tokenizer = CharTokenizer.from_text(plan.text)
    mcfg, tcfg = replace(plan.model, vocab_size=tokenizer.vocab_size), plan.train
    mcfg.validate()
    docs = load_documents(plan.text, tokenizer, plan.doc_separator, plan.cache_dir,
                          progress=progress, log=log)
    source = repr(plan.data_path) if plan.data_path else "the text"
    split = split_documents(docs, mcfg.block_size, tokenizer.decode, source=source)
    data = DataInfo(path=os.path.abspath(plan.data_path) if plan.data_path else None,
                    sha256=plan.text_sha256, doc_separator=plan.doc_separator,
                    documents=docs.n_docs, train_tokens=len(split.train),
                    val_tokens=len(split.val))

    estimate = training_memory(mcfg, tcfg.batch_size, getattr(backend, "name", backend))
    log(f"memory: about {estimate.describe()}")
    check_fits(estimate)                 # before allocating: refuse a run that cannot fit
    init_rng, batch_rng, dropout_rng = rng_streams(tcfg.seed)
    backend = get_backend(backend)       # numba loads only for the fused backend
    model = GPT(mcfg, seed=None, backend=backend)
    model.init_weights(init_rng)
    run = PreparedRun(plan, tokenizer, split, data, model, make_optimizer(model, tcfg, backend),
                      batch_rng, dropout_rng)
    if origin is not None:               # a fine-tune with a shorter block: wpe's first rows
        for name in model.params.names():
            model.params[name][...] = origin.model.params[name][:len(model.params[name])]
    if plan.resume is not None:
        meta = plan.resume.meta
        restore_optimizer(run.optimizer, plan.resume.optimizer_state)
        run.batch_rng = rng_from_state(meta.rng["batch"])
        run.dropout_rng = rng_from_state(meta.rng["dropout"])
        run.start_iter = meta.iter
        run.best_val_loss = float("inf") if meta.best_val_loss is None else meta.best_val_loss
        run.fine_tuned_from = meta.fine_tuned_from
        log(f"resuming from {plan.resume.path} at iteration {run.start_iter} of {tcfg.iters}")
    elif plan.fine_tune is not None:
        run.fine_tuned_from = os.path.abspath(plan.fine_tune.path)
        log(f"fine-tuning from {plan.fine_tune.path} (iteration {plan.fine_tune.iter} there)")
    log(f"model: {mcfg.n_layer} layers, {mcfg.n_embd} dim, {mcfg.n_head} heads, block "
        f"{mcfg.block_size}, vocab {mcfg.vocab_size} ({tokenizer.kind}): "
        f"{model.num_params:,} parameters; "
        f"{len(split.train):,} train / {len(split.val):,} val tokens")
    return run


def train(plan: RunPlan, *, backend="fused", sample_tokens: int = 300,
          progress: bool | None = None, log=print, stop_after: int | None = None) -> TrainResult:
    """Train the plan to plan.train.iters total iterations on `backend` (a name or a Backend).
    `stop_after`: stop as a signal would, after that many total iterations (for scripted runs
    and tests). `progress`: a bar (None: when stderr is a terminal)."""
    run = prepare(plan, backend, progress, log)
    model, tcfg, tokenizer = run.model, plan.train, run.tokenizer
    tokens_per_iter = tcfg.batch_size * model.cfg.block_size
    train_time = 0.0
    # overflow warnings would bury the one-line divergence error: the loop checks every loss
    with Reporter(run, progress, log) as report, np.errstate(over="ignore", invalid="ignore"):
        for it in range(run.start_iter, tcfg.iters):
            lr = lr_at(it, tcfg.iters, tcfg.lr, tcfg.min_lr, tcfg.warmup, tcfg.decay_frac)
            t0 = time.perf_counter()
            x, y = get_batch(run.split.train, tcfg.batch_size, model.cfg.block_size,
                             run.batch_rng)
            step = train_step(model, run.optimizer, x, y, lr, grad_clip=tcfg.grad_clip,
                              dropout_rng=run.dropout_rng,
                              check_loss=lambda loss: report.check("loss", loss, it))
            done = it + 1
            train_time += time.perf_counter() - t0
            tok_s = tokens_per_iter * (done - run.start_iter) / train_time
            report.stepped(done, step.loss, lr, tok_s)
            if done % tcfg.eval_interval == 0 or done == tcfg.iters:
                report.evaluate(done, lr, tok_s)
            if report.signum is not None or done == stop_after:
                report.stop(done)
                break
    result = TrainResult(model, tokenizer, report.done, report.train_loss, report.val_loss,
                         report.history, "", report.checkpoint, report.signum)
    if report.done < tcfg.iters:
        log(report.stopped_line())
        return result
    if sample_tokens <= 0:
        return result
    sample = complete(model, tokenizer, "", max_tokens=sample_tokens,
                      sampling=SamplingConfig(temperature=0.8),
                      rng=np.random.default_rng(tcfg.seed))
    return replace(result, sample=sample)


class Reporter:
    """What the loop tells the world: the progress bar, evaluations (history, metrics.jsonl,
    a log line), checkpoints, divergence errors and the stop signals. While active, SIGINT and
    SIGTERM only record themselves, so the loop can finish its step and save; a second signal
    aborts at once (KeyboardInterrupt): writes are atomic, so the last checkpoint stays whole.
    Only the main thread can own signal handlers."""

    def __init__(self, run: PreparedRun, progress: bool | None, log):
        self.run, self.log, self.progress = run, log, progress
        self.out_dir = run.plan.out_dir
        self.done = run.start_iter
        self.best_val_loss = run.best_val_loss
        self.train_loss = self.val_loss = float("nan")
        self.history, self.checkpoint, self.saved_at = [], None, None
        self.signum, self._previous = None, {}
        self.metrics = self.bar = None
        self.start = time.perf_counter()

    def __enter__(self):
        if self.out_dir is not None:
            os.makedirs(self.out_dir, exist_ok=True)
            path = os.path.join(self.out_dir, "metrics.jsonl")
            if self.run.plan.resume is not None:
                _trim_metrics(path, self.done)    # rows a killed run wrote past its checkpoint
            self.metrics = open(path, "a", encoding="utf-8")
        self.bar = _progress_bar(self.run.plan.train.iters, self.progress, initial=self.done)
        # handlers last: a failure above must not leave them installed
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
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        return False

    def check(self, what: str, loss: float, it: int) -> None:
        """Refuse a non-finite loss: training diverged; the last good checkpoint is kept."""
        if not math.isfinite(loss):
            kept = (f"the last good checkpoint ({self.checkpoint}) is kept" if self.checkpoint
                    else "no checkpoint of this session was written")
            raise UserError(f"the {what} became {loss} at iteration {it}: training diverged; "
                            f"{kept}; lower {{field}} or lengthen the warmup", "lr")

    def stepped(self, done: int, loss: float, lr: float, tok_s: float) -> None:
        self.done = done
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s",
                                     refresh=False)
            self.bar.update(1)

    def evaluate(self, done: int, lr: float, tok_s: float) -> None:
        run, tcfg = self.run, self.run.plan.train
        self.train_loss = estimate_loss(run.model, run.split.train, tcfg, tcfg.seed)
        self.val_loss = estimate_loss(run.model, run.split.val, tcfg, tcfg.seed + 1)
        self.check("val loss", self.val_loss, done)
        # bits per character: loss per token x tokens per character, in bits
        val = run.split.val
        val_bpc = bits_per_char(self.val_loss * val.n_targets, val.n_chars)
        row = dict(iter=done, train_loss=round(self.train_loss, 6),
                   val_loss=round(self.val_loss, 6), val_ppl=round(math.exp(self.val_loss), 4),
                   val_bpc=round(val_bpc, 6), lr=lr, tokens_per_sec=round(tok_s, 1),
                   elapsed_s=round(time.perf_counter() - self.start, 3))
        self.history.append(row)
        if self.metrics is not None:      # before the checkpoint: a resume trims extras
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        is_best = self.val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, self.val_loss)
        self.save([LATEST, BEST] if is_best else [LATEST])
        line = (f"iter {done}/{tcfg.iters}: train loss {self.train_loss:.4f}, val loss "
                f"{self.val_loss:.4f}, val ppl {math.exp(self.val_loss):.2f}, val bpc "
                f"{val_bpc:.4f}, {tok_s:,.0f} tok/s")
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.log(line)

    def save(self, names) -> None:
        """Write the state after `done` iterations to out_dir/name for each name (one
        encoding); nothing without a run directory."""
        if self.out_dir is None:
            return
        run = self.run
        blob = encode_checkpoint(run.model, run.tokenizer, run.optimizer, CheckpointMeta(
            iter=self.done, train_config=run.plan.train, best_val_loss=self.best_val_loss,
            val_loss=self.val_loss, train_loss=self.train_loss, data=run.data,
            fine_tuned_from=run.fine_tuned_from,
            rng={"batch": rng_state(run.batch_rng), "dropout": rng_state(run.dropout_rng)}))
        for name in names:
            write_atomic(os.path.join(self.out_dir, name), blob)
        self.checkpoint, self.saved_at = os.path.join(self.out_dir, names[0]), self.done

    def stop(self, done: int) -> None:
        """The run stops early (a signal, or stop_after): its state must be on disk."""
        if self.saved_at != done:
            self.save([LATEST])

    def stopped_line(self) -> str:
        why = (f"stopped by {signal.Signals(self.signum).name}" if self.signum is not None
               else "stopped")
        return f"{why} at iteration {self.done}/{self.run.plan.train.iters}" + (
            f": checkpoint written to {self.checkpoint}; continue by resuming it"
            if self.checkpoint else " (no run directory: nothing saved)")


# ---------------------------------------------------------------------------------------------
# metrics and progress

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


def _progress_bar(total: int, enabled: bool | None, initial: int = 0):
    """A tqdm bar on a terminal; None (plain log lines) when output is not a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, file=sys.stderr)
