"""The training loop: data -> model -> AdamW, with evaluation, metrics and a progress bar.

`train()` is the library entry point; the CLI only turns flags into its arguments.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig, TrainConfig
from .data import Split, builtin_sample_text, get_batch, read_text, split_tokens
from .errors import UserError
from .model import GPT
from .optim import AdamW, clip_grad_norm, lr_at
from .sample import generate_simple
from .tokenizer import CharTokenizer


@dataclass
class TrainResult:
    model: GPT
    tokenizer: object
    iters_done: int
    train_loss: float
    val_loss: float
    history: list = field(default_factory=list)
    sample: str = ""


def load_corpus(data_path: str | None, log=print) -> str:
    """The text at data_path; or train.txt here; or the built-in sample (with a notice)."""
    if data_path is not None:
        return read_text(data_path)
    if os.path.exists("train.txt"):
        return read_text("train.txt")
    log("no train.txt here and no --data given: training on the built-in sample text "
        "(a few KB; pass --data PATH for your own)")
    return builtin_sample_text()


def encode_corpus(text: str, tokenizer) -> np.ndarray:
    """The whole text as one stream of ids, framed as a document: BOS text EOS."""
    ids = tokenizer.encode(text)
    return np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)


def rng_streams(seed: int):
    """Independent generators for weight init, batch sampling and dropout, all from one seed."""
    init, batches, dropout = np.random.SeedSequence(seed).spawn(3)
    return (np.random.default_rng(init), np.random.default_rng(batches),
            np.random.default_rng(dropout))


def estimate_loss(model: GPT, tokens: np.ndarray, tcfg: TrainConfig, seed: int) -> float:
    """Mean loss (no dropout) over eval_iters batches; the same batches every evaluation."""
    rng = np.random.default_rng([seed, 0xE7A1])
    losses = []
    for _ in range(tcfg.eval_iters):
        x, y = get_batch(tokens, tcfg.batch_size, model.cfg.block_size, rng)
        losses.append(model.loss(x, y))
    return float(np.mean(losses))


def train(mcfg: ModelConfig, tcfg: TrainConfig, data_path: str | None = None,
          out_dir: str | None = None, text: str | None = None, sample_tokens: int = 300,
          progress: bool | None = None, log=print) -> TrainResult:
    tcfg.validate()
    if text is None:
        text = load_corpus(data_path, log)
    tokenizer = CharTokenizer.from_text(text)
    mcfg.vocab_size = tokenizer.vocab_size
    mcfg.validate()
    split: Split = split_tokens(encode_corpus(text, tokenizer), mcfg.block_size,
                                source=repr(data_path) if data_path else "the text")

    init_rng, batch_rng, dropout_rng = rng_streams(tcfg.seed)
    model = GPT(mcfg, seed=None)
    model.init_weights(init_rng)
    opt = AdamW(model.params.flat, model.decay_mask(), tcfg.beta1, tcfg.beta2,
                weight_decay=tcfg.weight_decay)

    metrics_file = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
    log(f"model: {mcfg.n_layer} layers, {mcfg.n_embd} dim, {mcfg.n_head} heads, block "
        f"{mcfg.block_size}, vocab {mcfg.vocab_size}: {model.num_params:,} parameters; "
        f"{len(split.train):,} train / {len(split.val):,} val tokens")

    bar = _progress_bar(tcfg.iters, progress)
    tokens_per_iter = tcfg.batch_size * mcfg.block_size
    history, train_time, start = [], 0.0, time.perf_counter()
    train_loss = val_loss = float("nan")
    loss = float("nan")
    for it in range(tcfg.iters):
        lr = lr_at(it, tcfg.iters, tcfg.lr, tcfg.min_lr, tcfg.warmup, tcfg.decay_frac)
        t0 = time.perf_counter()
        x, y = get_batch(split.train, tcfg.batch_size, mcfg.block_size, batch_rng)
        _, loss = model.forward(x, y, rng=dropout_rng)
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at iteration {it}: training diverged; "
                            "lower --lr or raise --warmup")
        model.backward()
        clip_grad_norm(model.grads.flat, tcfg.grad_clip)
        opt.step(model.grads.flat, lr)
        train_time += time.perf_counter() - t0
        tok_s = tokens_per_iter * (it + 1) / train_time
        if bar is not None:
            bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s", refresh=False)
            bar.update(1)

        last = it + 1 == tcfg.iters
        if (it + 1) % tcfg.eval_interval == 0 or last:
            train_loss = estimate_loss(model, split.train, tcfg, tcfg.seed)
            val_loss = estimate_loss(model, split.val, tcfg, tcfg.seed + 1)
            row = dict(iter=it + 1, train_loss=round(train_loss, 6), val_loss=round(val_loss, 6),
                       val_ppl=round(math.exp(val_loss), 4), lr=lr,
                       tokens_per_sec=round(tok_s, 1),
                       elapsed_s=round(time.perf_counter() - start, 3))
            history.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            line = (f"iter {it + 1}/{tcfg.iters}: train loss {train_loss:.4f}, val loss "
                    f"{val_loss:.4f}, val ppl {math.exp(val_loss):.2f}, {tok_s:,.0f} tok/s")
            if bar is not None:
                bar.write(line)
            else:
                log(line)
    if bar is not None:
        bar.close()
    if metrics_file is not None:
        metrics_file.close()

    sample = ""
    if sample_tokens > 0:
        ids = generate_simple(model, [tokenizer.bos_id], sample_tokens,
                              np.random.default_rng(tcfg.seed), temperature=0.8,
                              stop_id=tokenizer.eos_id)
        sample = tokenizer.decode(ids)
    return TrainResult(model, tokenizer, tcfg.iters, train_loss, val_loss, history, sample)


def _progress_bar(total: int, enabled: bool | None):
    """A tqdm bar on a terminal; None (plain log lines) when output is not a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="it", dynamic_ncols=True, file=sys.stderr)
