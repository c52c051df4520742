"""The training loop: a RunPlan (runs.py) in, a trained model, metrics and checkpoints out.

`train(plan)` runs in two parts:
  1. prepare(): the tokenizer (new, or the checkpoint's), the documents and their split, the
     model and its optimizer, fresh or restored from a checkpoint (weights, AdamW moments, RNG
     streams, iteration), so that a resumed run continues bit for bit;
  2. the loop: one train_step (step.py) per iteration. A Reporter does everything else: the
     progress bar; every eval_interval (and at the end) an evaluation, a metrics.jsonl row,
     checkpoint.safetensors (+ checkpoint_best.safetensors when val loss improves) and
     loss.png (plot.py); and the signals: SIGINT / SIGTERM only set a flag, the loop finishes
     its step, writes a checkpoint and returns with `signal` set (the CLI exits 130 / 143).
     Between evaluations nothing touches the disk.

Under mpiexec (a `world` of N ranks, distributed.py) every rank runs this loop on its share of
each step's batch; rank 0 alone evaluates, writes and prints, and the ranks agree on the loss
and on stopping after every step.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import numpy as np

from . import plot
from .checkpoint import (BEST, LATEST, CheckpointMeta, DataInfo, encode_checkpoint,
                         restore_optimizer, rng_from_state, rng_state, write_atomic)
from .data import (Split, bits_per_char, get_batch, load_documents, split_documents,
                   split_text)
from .distributed import World
from .errors import UserError
from .evaluate import evaluate_documents
from .memory import check_fits, training_memory
from .model import GPT
from .ops.contract import get_backend
from .runs import RunPlan, lock_run_dir
from .sample import SamplingConfig
from .schedule import Schedule
from .session import complete, generate
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


def estimate_batches(tokens, tcfg, block_size: int) -> int:
    """eval_iters, or fewer for a split with fewer targets than eval_iters batches hold: about
    one batch position per target is enough there (more would re-score the same targets;
    on the 5 KB built-in sample, 20 batches were a third of the demo's time)."""
    n = tokens.n_targets if hasattr(tokens, "n_targets") else len(tokens) - 1
    return max(1, min(tcfg.eval_iters, -(-n // (tcfg.batch_size * block_size))))


def estimate_loss(model: GPT, tokens, tcfg, seed: int) -> float:
    """Mean loss per predicted token (no dropout) over estimate_batches batches, the same
    batches every evaluation. Batches are weighted by their targets (padding after a short
    document predicts nothing)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    total, count = 0.0, 0
    for _ in range(estimate_batches(tokens, tcfg, model.cfg.block_size)):
        x, y = get_batch(tokens, tcfg.batch_size, model.cfg.block_size, rng)
        n = int((y >= 0).sum())
        total += model.loss(x, y) * n       # a GPU's losses add up on the GPU
        count += n
    return float(total / count)


def prepare(plan: RunPlan, backend=None, progress: bool | None = None,
            log=print, world: World | None = None) -> PreparedRun:
    """Tokenizer, data, model and optimizer of the plan, restored from its checkpoint."""
    for line in plan.notices:
        log(line)
    origin = plan.resume or plan.fine_tune
    if origin is not None:
        tokenizer = origin.tokenizer
    elif plan.bpe_vocab_size is not None:
        log(f"tokenizer: training a byte-level BPE of {plan.bpe_vocab_size} tokens on "
            f"{len(plan.text):,} characters ...")
        t0 = time.perf_counter()
        tokenizer = BPETokenizer.train(split_text(plan.text, plan.doc_separator),
                                       plan.bpe_vocab_size)
        log(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens, trained in "
            f"{time.perf_counter() - t0:.2f} s")
    else:
        tokenizer = CharTokenizer.from_text(plan.text)
    mcfg, tcfg = replace(plan.model, vocab_size=tokenizer.vocab_size), plan.train
    mcfg.validate()
    backend = backend or plan.backend or "fused"      # None: the plan's, else fused
    # before any allocation: the step's memory, and the text, its int32 tokens and their int64
    # batches (~16 bytes a character); a run that cannot fit is refused with the estimate
    estimate = training_memory(mcfg, tcfg.batch_size, getattr(backend, "name", backend))
    estimate.parts["data"] = 16 * len(plan.text)
    log(f"memory: about {estimate.describe()}")
    check_fits(estimate)
    if origin is not None:
        _check_known_characters(plan.text, tokenizer, "resume" if plan.resume else "fine_tune")
    source = repr(plan.data_path) if plan.data_path else "the text"
    splits = []         # the split is made before the token cache is written: a refused run
    docs = load_documents(plan.text, tokenizer, plan.doc_separator, plan.cache_dir,
                          progress=progress, log=log, check=lambda d: splits.append(
                              split_documents(d, mcfg.block_size, tokenizer.decode,
                                              source=source, seed=tcfg.seed,
                                              shuffle=plan.val_split == "random")))
    split = splits[0]
    data = DataInfo(path=os.path.abspath(plan.data_path) if plan.data_path else None,
                    sha256=plan.text_sha256, doc_separator=plan.doc_separator,
                    documents=docs.n_docs, train_tokens=len(split.train),
                    val_tokens=len(split.val), val_split=plan.val_split)

    init_rng, batch_rng, dropout_rng = rng_streams(tcfg.seed)
    backend = get_backend(backend)       # numba loads only for the fused backend
    model = GPT(mcfg, seed=None, backend=backend)
    model.init_weights(init_rng)
    run = PreparedRun(plan, tokenizer, split, data, model, make_optimizer(model, tcfg, backend),
                      batch_rng, dropout_rng)
    if origin is not None:               # a fine-tune with a shorter block: wpe's first rows
        for name in model.params.names():
            model.params[name][...] = model.xp.asarray(
                origin.model.params[name][:len(model.params[name])])
    if plan.resume is not None:
        meta = plan.resume.meta
        restore_optimizer(run.optimizer, plan.resume.optimizer_state)
        run.batch_rng = rng_from_state(meta.rng["batch"])
        run.dropout_rng = rng_from_state(meta.rng["dropout"])
        run.start_iter = meta.iter
        run.best_val_loss = float("inf") if meta.best_val_loss is None else meta.best_val_loss
        run.fine_tuned_from = meta.fine_tuned_from
        log(f"resuming from {plan.resume.path} at iteration {run.start_iter}"
            + ("" if tcfg.time_budget else f" of {tcfg.iters}"))
        ranks, size = meta.ranks or 1, (world or World()).size
        if ranks != size:
            log(f"note: the checkpoint was trained on {ranks} rank(s), this run has {size}: a "
                f"step's batch is now {tcfg.batch_size * tcfg.grad_accum * size} rows (batch x "
                "grad-accum x ranks); the run goes on from the same state but no longer "
                "repeats an uninterrupted one")
    elif plan.fine_tune is not None:
        run.fine_tuned_from = os.path.abspath(plan.fine_tune.path)
        log(f"fine-tuning from {plan.fine_tune.path} (iteration {plan.fine_tune.iter} there)")
    log(f"model: {mcfg.n_layer} layers, {mcfg.n_embd} dim, {mcfg.n_head} heads, block "
        f"{mcfg.block_size}, vocab {mcfg.vocab_size} ({tokenizer.kind}): "
        f"{model.num_params:,} parameters; "
        f"{len(split.train):,} train / {len(split.val):,} val tokens")
    return run


def _check_known_characters(text: str, tokenizer, field: str) -> None:
    unknown = tokenizer.unknown_chars(text) if hasattr(tokenizer, "unknown_chars") else []
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise UserError(f"the text has {len(unknown)} character(s) the checkpoint's tokenizer "
                        f"does not know: {shown}; {{field}} keeps the checkpoint's tokenizer, so "
                        "remove them from the text, or start a new run to train a new one", field)


def train(plan: RunPlan, *, backend=None, sample_tokens: int = 300,
          progress: bool | None = None, log=print, stop_after: int | None = None,
          world: World | None = None, exact_eval: bool = False,
          started: float | None = None) -> TrainResult:
    """Train the plan on `backend` (a name or a Backend; None: the plan's, else fused) up to its schedule's end (schedule.py):
    plan.train.iters total iterations, or what fits its time budget, or an early stop.
    `stop_after`: stop as a signal would, after that many total iterations (for scripted runs
    and tests). `progress`: a bar (None: when stderr is a terminal). `world`: the ranks of an
    MPI job (distributed.open_world); None: this process alone. The last evaluation also
    scores the whole validation split exactly (each target once); `exact_eval`: every
    evaluation does, and the best checkpoint is chosen by that exact loss. `started`: the
    time.monotonic() at which the session began (a time budget counts from it; None: now)."""
    world = world or World()
    if not world.is_root:                 # the other ranks print only errors
        log, progress = _silent, False
    with ExitStack() as held:             # rank 0 alone holds (and writes) the run directory
        world.together(lambda: held.enter_context(
            lock_run_dir(plan.out_dir if world.is_root else None, plan.resume)))
        return _train(plan, backend, sample_tokens, progress, log, stop_after, exact_eval, world,
                      time.monotonic() if started is None else started)


def _train(plan, backend, sample_tokens, progress, log, stop_after, exact_eval,
           world, started) -> TrainResult:
    run = world.together(lambda: prepare(plan, backend, progress, log, world))
    model, tcfg, tokenizer = run.model, plan.train, run.tokenizer
    # the final work a time budget must leave room for, in forward tokens at an evaluation's
    # cost per token: the exact validation pass (measured on Tiny Shakespeare, small preset:
    # 6.7 s for 111k targets, against 5.4 s for an evaluation's 82k tokens, so one a target)
    # and the sample (a decode step is one row, priced as ~10 batched forward tokens)
    schedule = Schedule(tcfg, model.cfg.block_size,
                        plan.resume.meta.schedule if plan.resume is not None else None, started,
                        final_tokens=len(run.split.val) + 10 * sample_tokens,
                        eval_batches=sum(estimate_batches(part, tcfg, model.cfg.block_size)
                                         for part in (run.split.train, run.split.val)))
    if tcfg.time_budget:
        log(f"time budget: {tcfg.time_budget:g} s in all"
            + (f", {schedule.used_before:.0f} s used by earlier sessions"
               if schedule.used_before else "")
            + "; the LR schedule is fitted to the time left as steps are measured")
    share = world.size > 1 and schedule.adaptive
    rows = tcfg.batch_size * tcfg.grad_accum          # this rank's share of a step's batch
    mine = slice(world.rank * rows, (world.rank + 1) * rows)
    to_device = model.backend.to_device
    # a loss on a GPU is checked where it is looked at (evaluations), not each step: reading
    # it would make the host wait for the GPU every step. A non-finite step there shows up as
    # a non-finite val loss at the next evaluation, and no checkpoint takes NaN weights.
    check_each_step = model.xp is np
    compiling = model.backend.options.get("compile_seconds", lambda: 0)()
    if compiling:
        log(f"compiling fast kernels once, ~{compiling:.0f} s (later runs load them from disk)")
    # tok/s: real (non-padded) target tokens of the whole step's batch (every rank's) per
    # second of training steps, the first step of the process left out (it compiles kernels
    # and times the kernel choice), unless only one
    tokens = train_time = 0.0
    first = None
    # overflow warnings would bury the one-line divergence error: the loop checks every loss
    with Reporter(run, progress, log, world, exact_eval, schedule) as report, \
            np.errstate(over="ignore", invalid="ignore"):
        it = run.start_iter
        while not schedule.done(it):
            lr = schedule.lr(it)
            t0 = time.perf_counter()
            # the step's whole batch, drawn alike on every rank: a row's data is its row's
            x, y = get_batch(run.split.train, rows * world.size, model.cfg.block_size,
                             run.batch_rng)
            step = train_step(model, run.optimizer, to_device(x[mine]), to_device(y[mine]), lr,
                              grad_clip=tcfg.grad_clip, dropout_rng=run.dropout_rng,
                              check_loss=(lambda loss: report.check("loss", loss, it))
                              if check_each_step else None,
                              micro_batches=tcfg.grad_accum, row0=mine.start,
                              n_targets=int((y >= 0).sum()),
                              grad_hook=world.reduce_gradients if world.size > 1 else None)
            loss, signum = world.exchange(step.loss, report.signum)
            done = it = it + 1
            real, seconds = int((y >= 0).sum()), time.perf_counter() - t0
            schedule.stepped(done, seconds, first_of_session=first is None)
            if first is None:
                first = (real, seconds)
            else:
                tokens, train_time = tokens + real, train_time + seconds
            tok_s = tokens / train_time if train_time else first[0] / first[1]
            report.stepped(done, loss, lr, tok_s, real)
            if share:      # rank 0's clock may end the run at this step: every rank must
                schedule.share(world)    # agree before the evaluation (its collectives)
            if done % tcfg.eval_interval == 0 or schedule.done(done):
                t_eval = time.perf_counter()
                report.evaluate(done, lr, tok_s, final=schedule.done(done))
                schedule.evaluated(time.perf_counter() - t_eval, report.forward_s)
                if share:                # rank 0's plateau and early-stop decisions
                    schedule.share(world)
            if signum is not None or done == stop_after:
                report.signum = signum if signum is not None else report.signum
                report.stop(done)
                break
    result = TrainResult(model, tokenizer, report.done, report.train_loss, report.val_loss,
                         report.history, "", report.checkpoint, report.signum)
    if not schedule.done(report.done):
        log(report.stopped_line())
        return result
    if schedule.state.stopped == "time":
        log(schedule.stop_line())
    if sample_tokens <= 0 or not world.is_root:
        return result
    rng = np.random.default_rng(tcfg.seed)
    if plan.doc_separator is None:
        sample = complete(model, tokenizer, "", max_tokens=sample_tokens,
                          sampling=SamplingConfig(temperature=0.8), rng=rng)
    else:
        sample = sample_documents(model, tokenizer, sample_tokens, plan.doc_separator, rng)
    return replace(result, sample=sample)


def sample_documents(model, tokenizer, max_tokens: int, separator: str, rng,
                     max_docs: int = 10) -> str:
    """Several new documents (each from BOS to EOS) within max_tokens in all, joined by the
    corpus's separator: one document of a corpus of short ones shows little."""
    docs, left = [], max_tokens
    while left > 0 and len(docs) < max_docs:
        events = list(generate(model, tokenizer, "", max_tokens=left,
                               sampling=SamplingConfig(temperature=0.8), rng=rng))
        left -= sum(e.token is not None for e in events)
        docs.append("".join(e.text for e in events))
    return separator.join(docs)


class Reporter:
    """What the loop tells the world: the progress bar, evaluations (history, metrics.jsonl,
    a log line), checkpoints, divergence errors and the stop signals. While active, SIGINT and
    SIGTERM only record themselves, so the loop can finish its step and save; a second signal
    aborts at once (KeyboardInterrupt): writes are atomic, so the last checkpoint stays whole.
    Only the main thread can own signal handlers."""

    def __init__(self, run: PreparedRun, progress: bool | None, log, world: World,
                 exact_eval: bool, schedule: Schedule):
        self.run, self.log, self.progress, self.exact_eval = run, log, progress, exact_eval
        self.schedule = schedule
        self.world = world
        self.writes = self.world.is_root      # of several ranks, rank 0 alone writes
        self.forward_s = None                 # the last evaluation's loss-estimate seconds
        self.out_dir = run.plan.out_dir
        self.done = run.start_iter
        self.best_val_loss = run.best_val_loss
        self.train_loss = self.val_loss = float("nan")
        self.history, self.checkpoint, self.saved_at = [], None, None
        self.signum, self._previous = None, {}
        self.metrics = self.bar = None
        self.tokens_seen = 0            # training targets seen, since iteration 0
        self.picture_notes = set()      # why loss.png could not be drawn, each said once
        self.start = time.perf_counter()

    def __enter__(self):
        path = None
        if self.out_dir is not None and self.writes:
            os.makedirs(self.out_dir, exist_ok=True)
            path = os.path.join(self.out_dir, "metrics.jsonl")
            if self.run.plan.resume is not None:
                _trim_metrics(path, self.done)    # rows a killed run wrote past its checkpoint
            self.metrics = open(path, "a", encoding="utf-8")
        self.tokens_seen = _tokens_before(self.run, path)
        self.bar = _progress_bar(self.schedule.target, self.progress, initial=self.done)
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
        """Refuse a non-finite loss, or one far above guessing (10 x ln V nats; a fresh model
        is at ln V): training diverged; the last good checkpoint is kept."""
        if not math.isfinite(loss) or loss > 10 * math.log(self.run.model.cfg.vocab_size):
            kept = (f"the last good checkpoint ({self.checkpoint}) is kept" if self.checkpoint
                    else "no checkpoint of this session was written" if self.writes
                    else "rank 0 keeps the last good checkpoint")
            raise UserError(f"the {what} became {loss} at iteration {it}: training diverged; "
                            f"{kept}; lower {{field}} or lengthen the warmup", "lr")

    def stepped(self, done: int, loss: float, lr: float, tok_s: float, tokens: int) -> None:
        """`tokens`: the real (non-padded) targets of the step's whole batch, every rank's."""
        self.done, self.tokens_seen = done, self.tokens_seen + tokens
        if self.bar is not None and self.bar.total != self.schedule.target:
            self.bar.total = self.schedule.target      # a time budget refits the target
        if self.bar is not None:    # a GPU's loss is not read here (it would wait for it)
            shown = f"loss {loss:.4f} " if isinstance(loss, float) else ""
            self.bar.set_postfix_str(f"{shown}lr {lr:.2e} {tok_s:,.0f} tok/s", refresh=False)
            self.bar.update(1)

    def evaluate(self, done: int, lr: float, tok_s: float, final: bool = False) -> None:
        """Estimate train and val loss (and, when `final` or --exact-eval, the exact val
        loss), log them, feed the schedule's plateau and early-stop counters, checkpoint."""
        run, tcfg = self.run, self.run.plan.train
        self.world.check_same_weights(run.model.params.flat, done)
        if not self.writes:        # rank 0 evaluates alone: the others go on to the next step
            return
        started = time.perf_counter()
        self.train_loss = estimate_loss(run.model, run.split.train, tcfg, tcfg.seed)
        self.val_loss = estimate_loss(run.model, run.split.val, tcfg, tcfg.seed + 1)
        self.forward_s = time.perf_counter() - started     # the time budget prices tokens so
        self.check("val loss", self.val_loss, done)
        # bits per character: loss per token x tokens per character, in bits
        val = run.split.val
        val_bpc = bits_per_char(self.val_loss * val.n_targets, val.n_chars)
        row = dict(iter=done, tokens=self.tokens_seen, train_loss=round(self.train_loss, 6),
                   val_loss=round(self.val_loss, 6), val_ppl=round(math.exp(self.val_loss), 4),
                   # (check above: a finite loss under 10 ln V, so exp cannot overflow)
                   val_bpc=round(val_bpc, 6), lr=lr, tokens_per_sec=round(tok_s, 1),
                   elapsed_s=round(time.perf_counter() - self.start, 3))
        exact = None
        if self.exact_eval or final:     # every validation target, once
            exact = evaluate_documents(run.model, val)
            self.check("exact val loss", exact.loss, done)
            row.update(val_loss_exact=round(exact.loss, 6),
                       val_bpc_exact=round(exact.bits_per_char, 6))
        self.history.append(row)
        row_at = None
        if self.metrics is not None:      # before the checkpoint: a resume trims extras
            row_at = self.metrics.tell()
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        score = exact.loss if self.exact_eval else self.val_loss
        said = self.schedule.after_evaluation(score)
        is_best = score < self.best_val_loss
        best_before, self.best_val_loss = self.best_val_loss, min(self.best_val_loss, score)
        try:
            self.save([LATEST, BEST] if is_best else [LATEST])
        except UserError:       # the row must not outlive its checkpoint
            self.best_val_loss = best_before
            if row_at is not None and self.saved_at != done:
                self.metrics.truncate(row_at)
                self.history.pop()
            raise
        line = (f"iter {done}/{self.schedule.target}: train loss {self.train_loss:.4f}, val loss "
                f"{self.val_loss:.4f}, val ppl {math.exp(self.val_loss):.2f}, val bpc "
                f"{val_bpc:.4f}, {tok_s:,.0f} tok/s") + (
                    f"; exact val loss {exact.loss:.4f} (every one of {exact.tokens:,} "
                    f"targets), bpc {exact.bits_per_char:.4f}" if exact is not None else "")
        self.say(line)
        if said:
            self.say(said)
        self.draw()

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.log(line)

    def draw(self) -> None:
        """Redraw <out>/loss.png from metrics.jsonl (the whole run's, resumes included). A
        picture that cannot be drawn (no matplotlib, a full disk) is said once and never stops
        training; a second signal (KeyboardInterrupt) still does. RANDYGPT_NO_PLOT=1 turns
        it off (a redraw costs ~0.5 s, a lot for runs that evaluate every few steps)."""
        if self.metrics is None or os.environ.get("RANDYGPT_NO_PLOT", "") not in ("", "0"):
            return
        try:
            plot.write_run_picture(self.out_dir)
        except Exception as e:
            why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            why = " ".join(why.split())         # one line
            if why not in self.picture_notes:
                self.picture_notes.add(why)
                self.say(f"note: {plot.PICTURE} not drawn: {why}")

    def save(self, names) -> None:
        """Write the state after `done` iterations to out_dir/name for each name (one
        encoding); nothing without a run directory."""
        if self.out_dir is None or not self.writes:
            return
        run = self.run
        blob = encode_checkpoint(run.model, run.tokenizer, run.optimizer, CheckpointMeta(
            iter=self.done, train_config=run.plan.train, best_val_loss=self.best_val_loss,
            val_loss=self.val_loss, train_loss=self.train_loss, data=run.data,
            fine_tuned_from=run.fine_tuned_from,
            rng={"batch": rng_state(run.batch_rng), "dropout": rng_state(run.dropout_rng)},
            ranks=self.world.size if self.world.size > 1 else None,
            schedule=self.schedule.snapshot()))
        for name in names:
            try:
                write_atomic(os.path.join(self.out_dir, name), blob)
            except UserError as e:    # disk full, I/O error: say what is safe and what to do
                kept = (f"the checkpoint of iteration {self.saved_at} ({self.checkpoint}) is "
                        "intact: free some space and continue it with {field}"
                        if self.checkpoint else "no checkpoint of this run was written")
                raise UserError(f"{e.message}; {kept}", "resume") from None
            if name == LATEST:
                self.checkpoint, self.saved_at = os.path.join(self.out_dir, name), self.done

    def stop(self, done: int) -> None:
        """The run stops early (a signal, or stop_after): its state must be on disk."""
        if self.saved_at != done:
            self.save([LATEST])

    def stopped_line(self) -> str:
        why = (f"stopped by {signal.Signals(self.signum).name}" if self.signum is not None
               else "stopped")
        return f"{why} at iteration {self.done}/{self.schedule.target}" + (
            f": checkpoint written to {self.checkpoint}; continue by resuming it"
            if self.checkpoint else " (no run directory: nothing saved)")


# ---------------------------------------------------------------------------------------------
# metrics and progress

def _silent(*args, **kwargs):
    pass


def _tokens_before(run: PreparedRun, metrics: str | None) -> int:
    """Training targets seen before this session: none for a new run; for a resume, the
    last metrics row's count, plus full batches (rows x ranks x block) for the iterations
    after it (the checkpoint may be a stop's, past the last evaluation), or full batches
    throughout when no row has a count (a run from before they existed)."""
    if run.start_iter == 0:
        return 0
    tcfg, ranks = run.plan.train, run.plan.resume.meta.ranks or 1
    full = tcfg.batch_size * tcfg.grad_accum * ranks * run.model.cfg.block_size
    try:
        rows = plot.read_metrics(metrics) if metrics else []
    except UserError:
        rows = []
    last = next((r for r in reversed(rows) if isinstance(r.get("tokens"), int)),
                {"iter": 0, "tokens": 0})
    return last["tokens"] + (run.start_iter - last["iter"]) * full


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
