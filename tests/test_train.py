"""The training loop as a library: it learns, it is deterministic, it writes metrics."""
import json
import math

import numpy as np

from randygpt.config import ModelConfig, TrainConfig
from randygpt.data import get_batch, split_tokens
from randygpt.train import train

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def tiny(**kw):
    m = ModelConfig(block_size=16, n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    t = TrainConfig(iters=60, batch_size=8, lr=3e-3, warmup=5, eval_interval=30, eval_iters=4,
                    seed=3)
    for k, v in kw.items():
        setattr(m if hasattr(m, k) else t, k, v)
    return m, t


def test_training_learns_a_repetitive_text(tmp_path):
    m, t = tiny(iters=150)
    r = train(m, t, text=TEXT, out_dir=str(tmp_path), sample_tokens=60, log=lambda *_: None)
    first, last = r.history[0], r.history[-1]
    assert math.log(m.vocab_size) > 2.5 and last["val_loss"] < 1.0   # from ~3.0 at init
    assert last["train_loss"] < first["train_loss"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [30, 60, 90, 120, 150]
    for key in ("iter", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_sec", "elapsed_s"):
        assert key in rows[-1]
    assert rows[-1]["val_ppl"] == round(math.exp(rows[-1]["val_loss"]), 4)
    assert len(r.sample) > 0 and set(r.sample) <= set(TEXT)


def test_same_seed_same_losses_different_seed_different():
    quiet = dict(text=TEXT, sample_tokens=0, log=lambda *_: None)
    a = train(*tiny(dropout=0.1), **quiet)
    b = train(*tiny(dropout=0.1), **quiet)
    c = train(*tiny(dropout=0.1, seed=4), **quiet)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    np.testing.assert_array_equal(a.model.params.flat, b.model.params.flat)
    assert a.history[-1]["train_loss"] != c.history[-1]["train_loss"]


def test_split_is_90_10_and_batches_are_shifted_windows():
    tokens = np.arange(1000, dtype=np.int32)
    s = split_tokens(tokens, block_size=8)
    assert len(s.train) == 900 and len(s.val) == 100 and s.val[0] == 900
    x, y = get_batch(s.train, 16, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (16, 8)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(x[:, 1:] - x[:, :-1], 1)       # contiguous windows
    assert x.max() < 900 and y.max() < 900
